#!/usr/bin/env python
"""Plot the curves of megaphi runs from their metrics.jsonl: training loss, validation loss, and
DPO reward accuracy and margin, one colour per run, into one PNG; and print a table per run."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

PROG = "plot_metrics"

EPILOG = """\
examples:
  python tools/plot_metrics.py runs/tiny-demo --output demo.png
  python tools/plot_metrics.py runs/recipe/{pretrain,midtrain,sft,dpo1,dpo2} \\
      --output recipe.png --sequential

Runs are drawn on their own step axes, or one after another with --sequential (a recipe's
stages, each starting where the one before ended). Panels without data for any run say so."""

PANELS = (("loss", "training loss"), ("val_loss", "validation loss"),
          ("rewards/accuracy", "DPO reward accuracy"), ("rewards/margin", "DPO reward margin"))


class MetricsError(Exception):
    pass


def read_metrics(run_dir: str) -> List[dict]:
    """The records of ``run_dir/metrics.jsonl`` (one JSON object per logged step)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise MetricsError(f"{run_dir}: no such directory")
    if not path.is_file():
        raise MetricsError(f"{run_dir}: no metrics.jsonl (a megaphi run directory has one once "
                           "a training run has logged a step)")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise MetricsError(f"{path}:{number}: not JSON") from None
    if not any("loss" in r or "val_loss" in r for r in records):
        raise MetricsError(f"{path}: no loss recorded")
    return records


def series(records: List[dict], key: str):
    pts = [(r["step"], r[key]) for r in records
           if key in r and isinstance(r[key], (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def summary(records: List[dict]) -> Dict[str, Optional[float]]:
    """Steps, first and last training loss, last validation loss, last reward accuracy."""
    steps, loss = series(records, "loss")
    _, val = series(records, "val_loss")
    _, acc = series(records, "rewards/accuracy")
    return {"steps": max((r.get("step", 0) for r in records), default=0),
            "first_loss": loss[0] if loss else None, "last_loss": loss[-1] if loss else None,
            "last_val_loss": val[-1] if val else None,
            "last_accuracy": acc[-1] if acc else None}


def plot(runs: Sequence[str], output: str, labels: Optional[Sequence[str]] = None,
         sequential: bool = False, title: Optional[str] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [read_metrics(r) for r in runs]
    labels = list(labels) if labels else [Path(r).name for r in runs]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    offsets, total = [], 0
    for records in data:
        offsets.append(total if sequential else 0)
        total += max((r.get("step", 0) for r in records), default=0)
    for ax, (key, name) in zip(axes.ravel(), PANELS):
        drawn = False
        for i, (records, label, offset) in enumerate(zip(data, labels, offsets)):
            steps, values = series(records, key)
            if steps:  # one colour per run in every panel
                ax.plot([s + offset for s in steps], values, color=f"C{i % 10}",
                        marker="." if len(steps) < 30 else None, label=label)
                drawn = True
        ax.set_title(name)
        ax.set_xlabel("step (stages one after another)" if sequential else "step")
        if drawn:
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, "no run logged this", ha="center", va="center",
                    transform=ax.transAxes, color="grey")
        if sequential:  # every panel on the whole recipe's axis
            ax.set_xlim(0, max(total, 1) * 1.02)
            for offset in offsets[1:]:
                ax.axvline(offset, color="grey", lw=0.5, ls=":")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)


def format_table(runs: Sequence[str], labels: Optional[Sequence[str]] = None) -> str:
    def fmt(x):
        return "-" if x is None else f"{x:.4f}"

    labels = list(labels) if labels else [Path(r).name for r in runs]
    lines = [f"{'run':<12} {'steps':>6} {'first loss':>11} {'last loss':>10} {'val loss':>9} "
             f"{'reward acc':>10}"]
    for run, label in zip(runs, labels):
        s = summary(read_metrics(run))
        lines.append(f"{label[:12]:<12} {s['steps']:>6} {fmt(s['first_loss']):>11} "
                     f"{fmt(s['last_loss']):>10} {fmt(s['last_val_loss']):>9} "
                     f"{fmt(s['last_accuracy']):>10}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--output", required=True, metavar="FILE.png")
    p.add_argument("--labels", help="comma-separated names of the runs (default: directory names)")
    p.add_argument("--sequential", action="store_true",
                   help="draw each run after the one before on one step axis")
    p.add_argument("--title")
    args = p.parse_args(argv)
    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(args.runs):
        p.error(f"--labels names {len(labels)} runs, {len(args.runs)} given")
    try:
        plot(args.runs, args.output, labels, args.sequential, args.title)
        print(format_table(args.runs, labels))
    except MetricsError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
