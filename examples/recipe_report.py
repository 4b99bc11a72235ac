#!/usr/bin/env python
"""The ending of examples/run_recipe.sh: a table per stage (steps, first and last loss or metric,
wall time, checkpoint or output path) from the recipe directory's stages.tsv and each run's
metrics.jsonl, and the curves as curves.png (tools/plot_metrics.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import plot_metrics  # noqa: E402

TRAINING = ("pretrain", "midtrain", "sft", "dpo1", "dpo2")


def count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def metric(out: Path, stage: str) -> str:
    """First -> last of the stage's main figure, or what a non-training stage produced."""
    if stage in TRAINING:
        s = plot_metrics.summary(plot_metrics.read_metrics(str(out / stage)))
        text = f"loss {s['first_loss']:.3f} -> {s['last_loss']:.3f}"
        if s["last_val_loss"] is not None:
            text += f", val {s['last_val_loss']:.3f}"
        if s["last_accuracy"] is not None:
            text += f", reward acc {s['last_accuracy']:.2f}"
        return text
    if stage == "decontaminate":
        totals = {c: 0 for c in ("clean", "partial", "contaminated")}
        for report in sorted((out / "decon").glob("*/report.json")):
            for c in totals:
                totals[c] += json.loads(report.read_text())["totals"][c]
        return ", ".join(f"{n} {c}" for c, n in totals.items()) + " documents"
    if stage == "preprocess":
        tokens = sum(json.loads(m.read_text()).get("tokens", 0)
                     for m in (out / "data").glob("*.meta.json"))
        return f"{tokens:,} tokens in {len(list((out / 'data').glob('*.meta.json')))} datasets"
    if stage == "pts":
        return f"{count_lines(out / 'pts' / 'pairs.jsonl')} token pairs"
    if stage == "export":
        check = json.loads((out / "hf_check.json").read_text())
        return (f"logits vs megaphi {check['max_abs_logit_diff']:.1e}; "
                f"generated {check['generated'][:40]!r}")
    return ""


def main(argv=None) -> int:
    out = Path((argv or sys.argv[1:])[0])
    rows = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines() if line]
    steps = {}
    for stage in TRAINING:
        if (out / stage / "metrics.jsonl").exists():
            steps[stage] = plot_metrics.summary(
                plot_metrics.read_metrics(str(out / stage)))["steps"]
    print(f"\n{'stage':<14} {'steps':>6} {'wall s':>7}  {'first -> last':<52} path")
    total = 0
    for stage, seconds, path in rows:
        total += int(seconds)
        print(f"{stage:<14} {steps.get(stage, ''):>6} {seconds:>7}  {metric(out, stage):<52} "
              f"{path}")
    print(f"{'total':<14} {'':>6} {total:>7}")
    runs = [str(out / s) for s in TRAINING if (out / s / "metrics.jsonl").exists()]
    png = out / "curves.png"
    plot_metrics.plot(runs, str(png), [Path(r).name for r in runs], sequential=True,
                      title="megaphi: the Phi-4 recipe at tiny scale")
    print(f"\ncurves: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
