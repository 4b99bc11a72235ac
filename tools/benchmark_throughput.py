"""Measure training throughput: tokens/s per GPU, step time, model TFLOP/s, MFU and peak memory.

A thin command line over :mod:`megaphi.benchmark`; run with ``--help`` for the details.
"""

from __future__ import annotations

import argparse
import sys

PROG = "benchmark_throughput"

DESCRIPTION = """\
Time warm-up plus timed training steps of megaphi's trainer (the real Megatron-Core model,
pipeline schedule, DDP and distributed optimizer) on random tokens, for a preset or a slice of
it (--num-layers: the full layer geometry with fewer layers, so a Phi-4 slice fits one GPU).
Reports tokens/s per GPU, step time, model TFLOP/s per GPU by Megatron's causal formula, MFU
against the device's dense peak (H100/H200; '-' elsewhere) and peak memory, as a table and
optionally as JSON. With --compare-hf it then times a Hugging Face Phi3ForCausalLM of the same
shape in the same process (bf16 autocast, SDPA attention, torch AdamW; --hf-compile adds
torch.compile) and prints the ratio. Runs on CPU with tiny shapes too (local spec, fp32).

Launch with torchrun for several GPUs:
  torchrun --nproc-per-node 8 tools/benchmark_throughput.py --tp 2 --pp 4 ..."""

EPILOG = """\
examples:
  %(prog)s --preset phi4-14b --num-layers 4 --seq-length 4096 --micro-batch 1 \\
      --global-batch 8 --precision bf16 --spec te --compare-hf
  %(prog)s --preset phi4-14b --num-layers 4 --precision fp8-current --json out.json
  %(prog)s --preset tiny --precision fp32 --spec local --steps 3      # CPU smoke run

exit status: 0 on success, 2 on bad arguments or config."""


def build_parser() -> argparse.ArgumentParser:
    from megaphi.benchmark import PRECISIONS

    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="phi4-14b", help="model preset (default: phi4-14b)")
    p.add_argument("--num-layers", type=int, default=None, metavar="N",
                   help="keep the preset's layer geometry with N layers (a slice)")
    p.add_argument("--seq-length", type=int, default=None, metavar="S",
                   help="sequence length (default: the preset's)")
    p.add_argument("--micro-batch", type=int, default=1, metavar="B")
    p.add_argument("--global-batch", type=int, default=8, metavar="B",
                   help="sequences per step over all data-parallel ranks (default: 8)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--precision", choices=list(PRECISIONS), default="bf16")
    p.add_argument("--spec", choices=["te", "local"], default=None,
                   help="layer spec (default: te when Transformer Engine and a GPU are present)")
    p.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed steps (default 3)")
    p.add_argument("--steps", type=int, default=10, metavar="N", help="timed steps (default 10)")
    p.add_argument("--compare-hf", action="store_true",
                   help="also time a Hugging Face Phi3ForCausalLM of the same shape")
    p.add_argument("--hf-compile", action="store_true", help="torch.compile the HF baseline")
    p.add_argument("--json", metavar="FILE", help="also write the measurements as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="further config overrides, e.g. parallel.vpp=2")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megaphi.benchmark import bench_overrides, format_table, run_hf, run_megaphi, to_json
    from megaphi.config import ConfigError, load_config
    from megaphi.model.builder import te_available
    from megaphi.platform import configure_logging, init_runtime, read_launch_env, shutdown_runtime

    configure_logging("WARNING", rank=read_launch_env().rank)
    try:
        cfg = load_config(preset=args.preset, overrides=[*bench_overrides(
            args.num_layers, args.seq_length, args.micro_batch, args.global_batch, args.tp,
            args.pp, args.cp, args.precision), "optimizer.lr=1e-5", "optimizer.min_lr=0.0", "schedule.warmup_iters=0",
            f"train.iters={args.warmup + args.steps + 1}", *args.overrides])
        if args.steps < 1 or args.warmup < 0:
            raise ConfigError("--steps", "needs at least 1 timed step and no negative warm-up",
                              "pass --steps 1 or more")
        use_te = te_available() if args.spec is None else args.spec == "te"
        if use_te and not te_available():
            raise ConfigError("--spec", "te needs Transformer Engine and a CUDA GPU",
                              "pass --spec local, or install megaphi[gpu] on a GPU machine")
        rt = init_runtime(cfg.parallel, seed=cfg.train.seed)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        from megaphi.phases.run import check_batch_layout

        check_batch_layout(cfg, rt.dp)
        results = [run_megaphi(cfg, rt, use_te, args.precision, args.warmup, args.steps)]
        if args.compare_hf and rt.is_main:
            results.append(run_hf(cfg, rt.device, args.warmup, args.steps, args.hf_compile))
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown_runtime()
    if rt.is_main:
        print(format_table(results))
        if args.json:
            with open(args.json, "w") as f:
                f.write(to_json(results) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
