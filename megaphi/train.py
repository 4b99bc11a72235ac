"""``megaphi-train``: resolve a run config and train (``python -m megaphi.train`` works too).

    megaphi-train --preset phi4-14b --dry-run
    megaphi-train --config examples/my_run.yaml parallel.tp=2 optimizer.lr=3e-5 --dry-run

``--dry-run`` prints the resolved config and the parameter counts of the model it defines
(built on the meta device, so nothing is allocated) and exits. Without it, train: launch with
``torchrun --nproc-per-node N -m megaphi.train ...`` (or srun) for several processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from megaphi.config import ConfigError, MegaphiConfig, list_presets, load_config, to_yaml

logger = logging.getLogger("megaphi.train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megaphi-train",
        description="Train a Phi-4 style model with Megatron-Core. A YAML config may start from a "
                    "preset with a top-level `preset: NAME` key; key=value overrides apply last.",
        epilog="examples:\n  megaphi-train --preset phi4-14b --dry-run\n"
               "  megaphi-train --config run.yaml parallel.tp=2 optimizer.lr=3e-5",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", metavar="NAME", help=f"a shipped preset: {list_presets()}")
    source.add_argument("--config", metavar="FILE.yaml", help="a YAML run config")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. parallel.tp=2 train.iters=100")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, parameter counts and the per-GPU memory "
                             "estimate, then exit")
    parser.add_argument("--world-size", type=int, default=None, metavar="GPUS",
                        help="with --dry-run: GPUs of the job, for the data-parallel size "
                             "(default: WORLD_SIZE or SLURM_NTASKS, else one replica)")
    parser.add_argument("--gpu-memory-gb", type=float, default=None, metavar="GB",
                        help="with --dry-run: memory of one GPU in GiB, to check the layout "
                             "fits (default: the local GPU's, if any)")
    return parser


def dry_run_report(cfg: MegaphiConfig, world_size: Optional[int] = None,
                   gpu_memory_gb: Optional[float] = None) -> str:
    """The text ``--dry-run`` prints: resolved config, parameter counts, per-token FLOPs and
    the per-GPU memory estimate (:mod:`megaphi.model.memory`) on ``world_size`` GPUs (one
    replica when None)."""
    import torch

    from megaphi.model.arithmetic import flops_per_token
    from megaphi.model.builder import build_meta_model, count_parameters
    from megaphi.model.memory import estimate_memory, static_parameters

    model = build_meta_model(cfg)
    counts = count_parameters(cfg, model)
    p = cfg.parallel
    lines = [
        "# resolved config",
        to_yaml(cfg).rstrip(),
        "",
        "# model",
        f"parameters: {counts.total:,} total, {counts.non_embedding:,} non-embedding",
        f"training FLOPs per token at seq {cfg.model.seq_length}: "
        f"{flops_per_token(cfg.model) / 1e9:,.2f} GFLOP",
        f"layout: tp={p.tp} pp={p.pp} vpp={p.vpp} cp={p.cp} sequence_parallel="
        f"{str(p.sequence_parallel).lower()}; model-parallel size {p.model_parallel_size}, "
        f"data-parallel size = world size / {p.model_parallel_size}",
        "",
    ]
    device_name = ""
    if gpu_memory_gb is None and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu_memory_gb, device_name = props.total_memory / (1 << 30), props.name
    estimate = estimate_memory(cfg, world_size, static_parameters(cfg, model))
    lines.append(estimate.report(gpu_memory_gb, device_name))
    if gpu_memory_gb is None:
        lines.append("(pass --gpu-memory-gb, e.g. 80 for an H100, to check that it fits)")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from megaphi.platform import configure_logging, read_launch_env

    configure_logging("INFO", rank=read_launch_env().rank)
    try:
        cfg = load_config(preset=args.preset, config_file=args.config, overrides=args.overrides)
    except ConfigError as exc:
        print(f"megaphi-train: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        from megaphi.model.memory import data_parallel_size

        env = os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS")
        try:  # before the model is built
            world = args.world_size or (int(env) if env else None)
            data_parallel_size(cfg.parallel, world)
        except ValueError as exc:
            print(f"megaphi-train: error: --world-size: {exc}", file=sys.stderr)
            return 2
        print(dry_run_report(cfg, world, args.gpu_memory_gb))
        return 0
    from megaphi.phases.run import main_errors, run_training

    try:
        run_training(cfg)
    except main_errors() as exc:
        print(f"megaphi-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
