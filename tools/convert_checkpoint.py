"""Convert between Hugging Face Phi-3/Phi-4 checkpoints and megaphi distributed checkpoints.

A thin command line over :mod:`megaphi.hf.convert`; run with ``--help`` for the details.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

PROG = "convert_checkpoint"

DESCRIPTION = """\
Convert checkpoints between Hugging Face (Phi3ForCausalLM: microsoft/phi-4 and its family) and
megaphi (Megatron-Core distributed checkpoints).

import: a Hugging Face directory (config.json + safetensors, one file or shards with an index)
  becomes a megaphi checkpoints directory OUT (OUT/iter_0000000 and OUT/latest, model weights
  only) that training (checkpoint.load=OUT), megaphi-generate and export load at any TP / PP.
  The fused qkv_proj is reordered into Megatron's per-query-group layout; gate_up_proj is
  Megatron's [gate; up] already. Tensors are streamed one at a time into the model, so memory
  peaks at about one copy of the weights. Everything is checked before any weight is read:
  the architecture, every tensor's presence and shape, and, with --preset/--config, that the
  target model has the checkpoint's vocabulary, widths, heads, KV heads, RoPE base, norm eps
  and tied/untied embeddings. Without --preset/--config the model is taken from config.json.
  --tp/--pp > 1 runs the import under torchrun with tp*pp processes, each filling its shard.

export: a megaphi checkpoint saved at any TP / PP (a run directory, its checkpoints/ directory
  or one iter_* directory) becomes a Hugging Face directory that
  transformers.AutoModelForCausalLM.from_pretrained loads: safetensors shards with
  model.safetensors.index.json, config.json, generation_config.json and the Phi-4 tokenizer
  (tokenizer.json built offline from cl100k_base, with the chat template).

Outputs are written to a hidden .NAME.incomplete directory and renamed when complete, so an
interrupted conversion never leaves an output that looks complete."""

EPILOG = """\
examples:
  python tools/convert_checkpoint.py import --hf-dir phi-4/ --out ckpt/phi4 \\
      --preset phi4-14b model.rotary_base=250000 model.seq_length=16384
  torchrun --nproc-per-node 2 tools/convert_checkpoint.py import --hf-dir phi-4/ \\
      --out ckpt/phi4 --tp 2
  python tools/convert_checkpoint.py export --ckpt runs/sft --out hf/phi4-sft --dtype bf16

exit status: 0 on success, 2 on bad arguments or input (one 'error:' line), 1 on a system
error (disk full, permissions), 130 if interrupted."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{import,export}")
    imp = sub.add_parser("import", help="Hugging Face directory -> megaphi checkpoint",
                         description="Hugging Face Phi3ForCausalLM directory -> megaphi "
                                     "checkpoints directory (see the main --help).")
    imp.add_argument("--hf-dir", required=True, metavar="DIR",
                     help="directory with config.json and *.safetensors (+ index)")
    imp.add_argument("--out", required=True, metavar="CKPT",
                     help="checkpoints directory to create (must not exist or be empty)")
    imp.add_argument("--tp", type=int, default=1, metavar="N",
                     help="tensor-parallel size of the import (needs torchrun with tp*pp "
                          "processes when > 1); the checkpoint loads at any layout")
    imp.add_argument("--pp", type=int, default=1, metavar="M", help="pipeline-parallel size")
    target = imp.add_mutually_exclusive_group()
    target.add_argument("--preset", metavar="NAME",
                        help="check the checkpoint against this preset's model and record it")
    target.add_argument("--config", metavar="FILE.yaml",
                        help="check against this run config's model and record it")
    imp.add_argument("overrides", nargs="*", metavar="key=value",
                     help="overrides of the --preset/--config values, "
                          "e.g. model.rotary_base=250000")
    exp = sub.add_parser("export", help="megaphi checkpoint -> Hugging Face directory",
                         description="megaphi checkpoint (any TP/PP) -> Hugging Face directory "
                                     "(see the main --help).")
    exp.add_argument("--ckpt", required=True, metavar="CKPT",
                     help="run directory, its checkpoints/ directory, or one iter_* directory")
    exp.add_argument("--out", required=True, metavar="DIR",
                     help="directory to create (must not exist or be empty)")
    exp.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                     help="dtype of the exported tensors (default: the checkpoint's "
                          "precision.dtype)")
    exp.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                     help="largest safetensors file, e.g. 5GB or 500MB (default: 5GB)")
    for p in (imp, exp):
        p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def fail(message: str, code: int = 2) -> None:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


def _target(args):
    """The run config named by --preset/--config and overrides, or None."""
    from megaphi.config import load_config

    if args.preset is None and args.config is None:
        if args.overrides:
            fail("key=value overrides apply to --preset or --config; give one of them, or "
                 "drop the overrides to take the model from config.json")
        return None
    return load_config(preset=args.preset, config_file=args.config, overrides=args.overrides)


def run(args) -> None:
    from megaphi.config import ConfigError
    from megaphi.hf.convert import ConversionError, export_hf_checkpoint, import_hf_checkpoint
    from megaphi.inference import CheckpointNotFound

    try:
        if args.command == "import":
            if args.tp < 1 or args.pp < 1:
                fail(f"--tp and --pp must be >= 1, got --tp {args.tp} --pp {args.pp}")
            out = import_hf_checkpoint(args.hf_dir, args.out, target=_target(args),
                                       tp=args.tp, pp=args.pp, progress=not args.no_progress)
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"{PROG}: imported {args.hf_dir} -> {out}")
        else:
            out = export_hf_checkpoint(args.ckpt, args.out, dtype=args.dtype,
                                       max_shard_size=args.max_shard_size,
                                       progress=not args.no_progress)
            print(f"{PROG}: exported {args.ckpt} -> {out}")
    except (ConfigError, ConversionError, CheckpointNotFound) as exc:
        fail(str(exc))
    except OSError as exc:  # the disk, not the input
        fail(f"{exc}; no complete output was written", code=1)
    except KeyboardInterrupt:
        fail("interrupted; no complete output was written", code=130)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from megaphi.platform import configure_logging, read_launch_env

    configure_logging("INFO", rank=read_launch_env().rank)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    run(args)


if __name__ == "__main__":  # dist_checkpointing's save workers re-import this module
    main()
