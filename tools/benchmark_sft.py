"""Measure SFT throughput in real tokens per second, packed rows against padded rows.

A thin command line over :func:`megaphi.benchmark.run_sft`; run with ``--help`` for details.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

PROG = "benchmark_sft"
ROOT = Path(__file__).resolve().parents[1]

DESCRIPTION = """\
Time SFT steps of megaphi's trainer (phase sft: the real Megatron-Core model, pipeline schedule,
DDP and optimizer) on one chat dataset twice in one run, with the same config: packed rows
(data.packing=true: whole conversations packed into rows of model.seq_length, attention within
each) and padded rows (data.packing=false: one conversation per row). Reports real tokens/s
(conversation tokens; padding excluded), step time and pack efficiency (real tokens / row
tokens), and the packed/padded speed-up. Without --data it preprocesses the shipped Python-FAQ
chat sample (examples/data/chat/faq_train.jsonl; 37 to 1,046 tokens per conversation).

Launch with torchrun for several processes or GPUs."""

EPILOG = """\
examples:
  %(prog)s --preset tiny model.seq_length=1024 train.micro_batch_size=2 \\
      train.global_batch_size=4                                 # CPU
  torchrun --nproc-per-node 8 %(prog)s --preset phi4-14b-sft --data data/sft_sample \\
      model.num_layers=8 parallel.pp=1 train.global_batch_size=8

exit status: 0 on success, 2 on bad arguments or config."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="config preset (default: tiny)")
    p.add_argument("--data", metavar="PREFIX", help="a chat dataset (--format chat); default: "
                   "the shipped FAQ sample, preprocessed into a temporary directory")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed steps (default 1)")
    p.add_argument("--steps", type=int, default=3, metavar="N", help="timed steps (default 3)")
    p.add_argument("--json", metavar="FILE", help="also write the measurements as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. model.seq_length=2048 parallel.tp=2")
    return p


def table(rows) -> str:
    cols = ["name", "seq_length", "global_batch", "rows_per_epoch", "pack_efficiency",
            "step_time_s", "real_tokens_per_s", "row_tokens_per_s"]
    fmt = {"pack_efficiency": "{:.1%}", "step_time_s": "{:.3f}", "real_tokens_per_s": "{:,.0f}",
           "row_tokens_per_s": "{:,.0f}"}
    cells = [cols] + [[fmt.get(c, "{}").format(getattr(r, c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megaphi.config import ConfigError, load_config
    from megaphi.platform import configure_logging, init_runtime, read_launch_env, shutdown_runtime

    configure_logging("WARNING", rank=read_launch_env().rank)
    overrides = ["phase.name=sft", "checkpoint.load=unused", "data.num_workers=0",
                 *args.overrides]
    try:
        cfg = load_config(preset=args.preset, overrides=overrides)
        if args.steps < 1 or args.warmup < 0:
            raise ConfigError("--steps", "needs at least 1 timed step and no negative warm-up",
                              "pass --steps 1 or more")
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    from megaphi.benchmark import run_sft
    from megaphi.phases.run import check_batch_layout

    with tempfile.TemporaryDirectory() as tmp:
        prefix = args.data
        rt = init_runtime(cfg.parallel, seed=cfg.train.seed)
        try:
            if prefix is None:
                prefix = str(Path(tmp) / "faq_train")
                if rt.is_main:
                    from megaphi.data.preprocess import preprocess
                    from megaphi.data.tokenizer import load_tokenizer

                    preprocess([str(ROOT / "examples/data/chat/faq_train.jsonl")], prefix,
                               load_tokenizer(cfg.data.tokenizer), format="chat", workers=1)
                import torch.distributed as dist

                dist.barrier()
            check_batch_layout(cfg, rt.dp)
            results = []
            for packing in (True, False):
                run = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                                        packing=packing))
                results.append(run_sft(run, rt, prefix, args.warmup, args.steps))
        except ConfigError as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
        finally:
            shutdown_runtime()
    if rt.is_main:
        packed, padded = results
        print(table(results))
        print(f"packed / padded real tokens per second: "
              f"{packed.real_tokens_per_s / padded.real_tokens_per_s:.2f}x; pack efficiency "
              f"{packed.pack_efficiency:.1%} (padded rows: {padded.pack_efficiency:.1%})")
        if args.json:
            Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in results],
                                                  indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
