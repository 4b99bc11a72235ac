"""Measure DPO training speed: token pairs in one forward pass, precomputed reference log-probs,
packed pairs, each against its alternative.

A thin command line over :func:`megaphi.benchmark.run_dpo`; run with ``--help`` for details.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

PROG = "benchmark_dpo"
ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples/data/preference/faq_pairs.jsonl"
DEFAULTS = ["model.seq_length=512", "train.micro_batch_size=2", "train.global_batch_size=4"]

DESCRIPTION = """\
Time DPO steps of megaphi's trainer (phase dpo: its forward step and loss on the real
Megatron-Core model, the pipeline schedule, DDP and the optimizer) for five variants at one
config in one run, their steps interleaved (one step of each in turn), the policy starting from
random weights (no checkpoint needed) and a second instance of the same weights as the
reference. Three comparisons:

  1. token pairs (Pivotal Token Search) in one forward pass against two rows per pair: the
     dataset's token pairs as megaphi lays them out (one segment per pair, both next-token
     log-probs from its last position) and the same pairs written as full pairs whose chosen
     and rejected responses are the single tokens (two segments per pair, context + token
     each), both packed; pairs per second. The two layouts' log-probs are compared too.
  2. precomputed reference log-probs (carried in each row; the step runs the policy only)
     against a forward-only pass of the reference model over the same micro-batches before
     every step (as NeMo-RL does); step time. The speed of the one-time precompute pass is
     reported as well: it does the reference's forward once per pair and run.
  3. packed pairs (data.packing=true) against padded pairs (data.packing=false: one pair per
     row); real (non-padding) tokens per second.

Without --data it preprocesses the shipped FAQ preference sample
(examples/data/preference/faq_pairs.jsonl: 120 full pairs, 120 token pairs). Default
overrides (a few minutes on a 2-core CPU; overrides on the command line win):
  """ + " ".join(DEFAULTS) + """
Prints a table and the three ratios (figures, never assertions); a variant's step time is the
median of its timed steps, its speeds the mean pairs or real tokens per step over that.
Timings on a machine shared with other work vary from run to run. Launch with torchrun for
several processes or GPUs."""

EPILOG = """\
examples:
  %(prog)s                                                      # tiny preset, CPU
  %(prog)s --steps 5 --json model.seq_length=1024 train.global_batch_size=8
  torchrun --nproc-per-node 8 %(prog)s --preset phi4-14b --data data/prefs \\
      model.num_layers=8 model.seq_length=4096 train.micro_batch_size=1 \\
      train.global_batch_size=8

exit status: 0 on success, 2 on bad arguments, config or data."""

logger = logging.getLogger("megaphi.benchmark")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="config preset (default: tiny)")
    p.add_argument("--data", metavar="PREFIX", help="a preference dataset (--format "
                   "preference) with token pairs; default: the shipped FAQ sample, "
                   "preprocessed into a temporary directory")
    p.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="untimed steps per variant (default 1)")
    p.add_argument("--steps", type=int, default=3, metavar="N",
                   help="timed steps per variant (default 3)")
    p.add_argument("--json", action="store_true",
                   help="print every figure as one JSON object on the last line")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. model.seq_length=1024 parallel.tp=2")
    return p


GROUPS = {"one_segment": "1", "two_segments": "1", "precomputed": "2,3",
          "reference_forward": "2", "padded": "3"}


def table(result) -> str:
    cols = [("#", None), ("variant", "description"), ("pairs/epoch", "pairs_per_epoch"),
            ("rows/epoch", "rows_per_epoch"), ("pack_eff", "pack_efficiency"),
            ("pairs/step", "pairs_per_step"), ("step_time_s", "step_time_s"),
            ("pairs/s", "pairs_per_s"), ("real_tokens/s", "real_tokens_per_s"),
            ("loss", "loss")]
    fmt = {"pack_efficiency": "{:.1%}", "pairs_per_step": "{:.1f}", "step_time_s": "{:.3f}",
           "pairs_per_s": "{:,.2f}", "real_tokens_per_s": "{:,.0f}", "loss": "{:.4g}"}
    cells = [[c for c, _ in cols]]
    for m in result.measurements:
        cells.append([GROUPS[m.name]] + [fmt.get(k, "{}").format(getattr(m, k))
                                         for _, k in cols[1:]])
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) if i == 1 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))) for row in cells)


def summary(result) -> str:
    by = {m.name: m for m in result.measurements}
    goal = "met" if result.token_pair_speedup >= 1.8 else "NOT met"
    ratio = result.reference_step_ratio
    return "\n".join([
        f"1. token pairs ({result.token_pairs} pairs), one forward pass vs two rows per pair: "
        f"{result.token_pair_speedup:.2f}x pairs/s (the issue's goal >= 1.8x: {goal}); their "
        f"log-probs agree within {result.token_logps_max_diff:.2g} over "
        f"{result.token_logps_pairs_compared} pairs seen in both layouts",
        f"2. precomputed reference log-probs vs a reference forward every step: a step with the "
        f"reference forward takes {ratio:.2f}x as long ({by['reference_forward'].step_time_s:.3f}"
        f" s vs {by['precomputed'].step_time_s:.3f} s); the one-time precompute pass ran at "
        f"{result.reference_pass_pairs_per_s:,.2f} pairs/s (forward only)",
        f"3. packed vs padded pairs: {result.packing_speedup:.2f}x real tokens/s (pack "
        f"efficiency {by['precomputed'].pack_efficiency:.1%} vs "
        f"{by['padded'].pack_efficiency:.1%})"])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megaphi.config import ConfigError, load_config
    from megaphi.platform import (configure_logging, free_port, init_runtime, read_launch_env,
                                  shutdown_runtime)

    launch = read_launch_env()
    configure_logging("WARNING", rank=launch.rank)
    if launch.rank == 0 and not args.quiet:
        logger.setLevel("INFO")
    if launch.launcher == "single" and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())  # another single run may hold 29500
    overrides = ["phase.name=dpo", "checkpoint.load=unused", "data.num_workers=0", *DEFAULTS,
                 *args.overrides]
    try:
        cfg = load_config(preset=args.preset, overrides=overrides)
        if args.steps < 1 or args.warmup < 0:
            raise ConfigError("--steps", "needs at least 1 timed step and no negative warm-up",
                              "pass --steps 1 or more and --warmup 0 or more")
        if args.data is not None:
            from megaphi.data.preprocess import PreprocessError, dataset_kind

            try:
                kind = dataset_kind(args.data)
            except PreprocessError as exc:
                raise ConfigError("--data", str(exc), "pass the prefix of a preference "
                                  "dataset") from None
            if kind != "preference":
                raise ConfigError("--data", f"{args.data} holds {kind} data, not preference "
                                  "pairs", "preprocess pairs with tools/preprocess_data.py "
                                  "--format preference")
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from megaphi.benchmark import run_dpo
    from megaphi.phases.run import check_batch_layout

    rt = init_runtime(cfg.parallel, seed=cfg.train.seed)
    work = [tempfile.mkdtemp(prefix="benchmark_dpo.") if rt.is_main else None]
    try:
        dist.broadcast_object_list(work, src=0)  # one directory, shared by the ranks
        prefix = args.data
        if prefix is None:
            prefix = str(Path(work[0]) / "faq_pairs")
            if rt.is_main:
                from megaphi.data.preprocess import preprocess
                from megaphi.data.tokenizer import load_tokenizer

                logger.info("preprocessing %s", SAMPLE)
                preprocess([str(SAMPLE)], prefix, load_tokenizer(cfg.data.tokenizer),
                           format="preference", workers=1)
            dist.barrier()
        check_batch_layout(cfg, rt.dp)
        result = run_dpo(cfg, rt, prefix, args.warmup, args.steps, work[0])
        dist.barrier()  # no rank reads the directory any more
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if rt.is_main:
            shutil.rmtree(work[0], ignore_errors=True)
        shutdown_runtime()
    if rt.is_main:
        m = cfg.model
        print(f"DPO steps, preset {args.preset} ({m.num_layers} layers, hidden {m.hidden_size}, "
              f"vocabulary {m.vocab_size:,}), seq_length {m.seq_length}, micro-batch "
              f"{cfg.train.micro_batch_size}, global batch {cfg.train.global_batch_size} rows, "
              f"{rt.world_size} process(es) on {rt.device.type}; {args.warmup} warm-up + "
              f"{args.steps} timed steps per variant, interleaved")
        print(table(result))
        print(summary(result))
        if args.json:
            print(json.dumps({"preset": args.preset, "seq_length": m.seq_length,
                              "micro_batch": cfg.train.micro_batch_size,
                              "global_batch": cfg.train.global_batch_size,
                              "processes": rt.world_size, "device": rt.device.type,
                              "warmup": args.warmup, "steps": args.steps,
                              **result.figures()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
