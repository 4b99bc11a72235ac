"""``megaphi-eval``: the token-weighted mean loss of a checkpoint over every document of an
indexed dataset, exactly once (``python -m megaphi.eval`` works too).

    megaphi-eval --ckpt runs/sft --data data/chat_valid --json
    torchrun --nproc-per-node 2 -m megaphi.eval --ckpt runs/sft --data data/chat_valid \\
        --json parallel.tp=2

The model is the checkpoint's (its saved config), at the layout given by ``key=value``
overrides (``parallel.tp=2``, ``parallel.pp=2``; by default tp=pp=1, and data parallelism is
what remains of the world size), whatever layout it was saved at. What gets loss depends on the dataset's kind:

- chat (``--format chat``): every assistant token and its closing ``<|im_end|>``, as in SFT.
  Conversations are packed into rows of ``model.seq_length`` (attention stays inside each
  conversation); one longer than a row is dropped and counted, or cut with
  ``data.overlong=truncate``.
- text: every token but each document's first, in windows of ``model.seq_length + 1`` tokens
  that overlap by one, packed the same way.

The loss is the sum of per-token losses over all loss tokens divided by their number. With
``--json`` the last line of output is one JSON object: ``loss``, ``tokens`` (loss tokens),
``documents``, ``dropped``, ``rows``, ``pack_efficiency``, ``kind``, ``layout``.

- preference pairs (``--format preference``, full-length and token pairs): the DPO loss, reward
  accuracy and margins of the checkpoint as the policy against ``--reference`` (default: the
  checkpoint's own ``dpo.reference`` or ``checkpoint.load``), with ``--beta`` (default: the
  checkpoint's ``dpo.beta``) and the checkpoint's ``dpo.*`` settings (override them as
  ``dpo.loss=ipo``). One forward-only pass of each model over every pair that fits a row, on
  the same rows. The JSON has ``loss``, ``accuracy`` (a tie is not a win), ``margin``, TRL's
  ``rewards/*`` and ``logps/*`` means, ``pairs``, ``dropped``, ``reference``, ``beta``.

    megaphi-eval --ckpt runs/dpo --reference runs/sft --data data/pairs --beta 0.1 --json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger("megaphi.eval")

PROG = "megaphi-eval"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Compute the token-weighted mean loss of a checkpoint over every document "
                    "of an indexed dataset, exactly once: the assistant tokens of chat data, "
                    "every token of text; for preference pairs, the DPO loss and reward "
                    "accuracy against a reference. The model is the checkpoint's, at the "
                    "layout that key=value overrides give (launch with torchrun for several "
                    "processes).",
        epilog="examples:\n  megaphi-eval --ckpt runs/sft --data data/chat_valid --json\n"
               "  torchrun --nproc-per-node 2 -m megaphi.eval --ckpt runs/sft --data "
               "data/chat_valid --json parallel.tp=2\n"
               "  megaphi-eval --ckpt runs/dpo --reference runs/sft --data data/pairs "
               "--beta 0.1 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, metavar="CKPT",
                        help="a run directory, its checkpoints/ directory or one iter_* "
                             "directory")
    parser.add_argument("--data", required=True, metavar="PREFIX",
                        help="an indexed dataset (PREFIX.bin/.idx/.meta.json) of text, chat or "
                             "preference pairs")
    parser.add_argument("--reference", metavar="REF",
                        help="preference data: the DPO reference checkpoint (default: the "
                             "checkpoint's dpo.reference, else its checkpoint.load)")
    parser.add_argument("--beta", type=float, metavar="B",
                        help="preference data: the DPO beta (default: the checkpoint's "
                             "dpo.beta)")
    parser.add_argument("--json", action="store_true",
                        help="end the output with one JSON line of the results")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides of the checkpoint's config, e.g. parallel.tp=2 "
                             "train.micro_batch_size=4 model.seq_length=2048")
    return parser


def eval_config(iter_dir: Path, overrides: List[str]):
    """The checkpoint's config with ``overrides`` applied (validated again). The layout does
    not come from the checkpoint: it is the whole model per process (tp=pp=cp=1, data
    parallelism over the world) unless ``parallel.*`` overrides say otherwise."""
    from megaphi.config.loader import apply_overrides, from_dict
    from megaphi.config.schema import MegaphiConfig, ParallelConfig
    from megaphi.inference import checkpoint_config

    raw = checkpoint_config(iter_dir).to_dict()
    raw["parallel"] = dataclasses.asdict(ParallelConfig())
    raw = apply_overrides(raw, overrides)
    return from_dict(MegaphiConfig, raw)


def evaluate(cfg, rt, iter_dir: Path, prefix: str) -> dict:
    """Run the evaluation in the initialised runtime ``rt``; the result is known on every
    rank."""
    from megatron.core import parallel_state as ps

    from megaphi.data.packing import ChatSegments, PackedRows, TextSegments
    from megaphi.data.preprocess import dataset_kind, read_meta
    from megaphi.data.datasets import check_datasets_tokenizer
    from megaphi.data.tokenizer import load_tokenizer
    from megaphi.model.builder import build_model
    from megaphi.phases.base import forward_once
    from megaphi.phases.lm import packed_shape, token_forward_step
    from megaphi.training.checkpoint import load_checkpoint

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_datasets_tokenizer([prefix], tokenizer, cfg.model.vocab_size)
    kind, seq = dataset_kind(prefix), cfg.model.seq_length
    if kind == "chat":
        segments = ChatSegments(prefix, tokenizer, seq, truncate=cfg.data.overlong == "truncate")
    elif kind == "text":
        segments = TextSegments(prefix, seq)
    else:
        from megaphi.config.schema import ConfigError

        raise ConfigError("--data", f"{prefix} holds {kind} data",
                          "pass a text, chat or preference dataset")
    rows = PackedRows(segments, seq, seed=cfg.train.seed, packing=cfg.data.packing,
                      pad_id=tokenizer.pad_id, shuffle=False)
    logger.info("%s", rows.describe())

    chunks = build_model(cfg)
    layout = {"tp": rt.tp, "pp": rt.pp, "vpp": rt.vpp, "cp": rt.cp, "dp": rt.dp}
    load_checkpoint(iter_dir, chunks, None, None, layout, load_optimizer=False)
    for chunk in chunks:
        chunk.eval()
    reports = forward_once(cfg, rt, chunks, rows, token_forward_step, packed_shape(cfg, chunks),
                           what="evaluated")
    totals = torch.zeros(2, dtype=torch.float64)
    if reports and ps.get_tensor_model_parallel_rank() == 0:
        totals += torch.stack([r["loss"].double().cpu() for r in reports]).sum(0)
    totals = totals.to(rt.device)
    dist.all_reduce(totals)  # one copy per data-parallel rank, from the last pipeline stage
    loss_sum, tokens = totals.cpu().tolist()
    st = rows.stats
    return {"loss": loss_sum / tokens if tokens else float("nan"), "tokens": int(tokens),
            "documents": int(read_meta(prefix)["documents"]), "segments": st.segments,
            "dropped": st.dropped, "rows": len(rows),
            "pack_efficiency": st.efficiency(seq), "kind": kind, "checkpoint": str(iter_dir),
            "data": prefix, "layout": layout}


def reference_of(cfg, given: Optional[str]) -> Path:
    """The DPO reference checkpoint: ``given``, else the policy's ``dpo.reference`` or
    ``checkpoint.load``."""
    from megaphi.config.schema import ConfigError
    from megaphi.training.warm_start import resolve_start

    path = given or cfg.dpo.reference or cfg.checkpoint.load
    if path is None:
        raise ConfigError("--reference", "preference data needs a reference model, and the "
                          "checkpoint's config names none (dpo.reference, checkpoint.load)",
                          "pass --reference REF")
    return resolve_start(path, "--reference")


def evaluate_preference(cfg, rt, iter_dir: Path, reference: Path, prefix: str) -> dict:
    """DPO loss and metrics of the policy ``iter_dir`` against ``reference`` over every pair
    of ``prefix``; known on every rank."""
    from megaphi.data.datasets import check_datasets_tokenizer
    from megaphi.data.tokenizer import load_tokenizer
    from megaphi.model.builder import build_model
    from megaphi.phases.dpo import collect_logps, dpo_metrics, response_lengths
    from megaphi.training.checkpoint import load_checkpoint
    from megaphi.training.warm_start import check_architecture, checkpoint_config

    check_architecture(checkpoint_config(reference), cfg, reference)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    check_datasets_tokenizer([prefix], tokenizer, cfg.model.vocab_size)
    chunks = build_model(cfg)
    layout = {"tp": rt.tp, "pp": rt.pp, "vpp": rt.vpp, "cp": rt.cp, "dp": rt.dp}
    logps = {}
    for name, path in (("reference", reference), ("policy", iter_dir)):
        load_checkpoint(path, chunks, None, None, layout, load_optimizer=False)
        logps[name] = collect_logps(cfg, rt, chunks, [prefix], tokenizer,
                                    what=f"{name} log-probs")
    result = dpo_metrics(logps["policy"], logps["reference"], response_lengths([prefix]),
                         cfg.dpo)
    return {**result, "kind": "preference", "beta": cfg.dpo.beta, "loss_type": cfg.dpo.loss,
            "checkpoint": str(iter_dir), "reference": str(reference), "data": prefix,
            "layout": layout}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from megaphi.config.schema import ConfigError
    from megaphi.data.preprocess import PreprocessError
    from megaphi.platform import configure_logging, init_runtime, read_launch_env, shutdown_runtime
    from megaphi.training.checkpoint import CheckpointNotFound, resolve_checkpoint

    configure_logging("INFO", rank=read_launch_env().rank)
    try:
        iter_dir = resolve_checkpoint(args.ckpt)
        beta = [] if args.beta is None else [f"dpo.beta={args.beta}"]
        cfg = eval_config(iter_dir, [*args.overrides, *beta])
        from megaphi.data.preprocess import dataset_kind

        # the dataset exists and is complete, before process groups
        preference = dataset_kind(args.data) == "preference"
        reference = reference_of(cfg, args.reference) if preference else None
    except (ConfigError, CheckpointNotFound, PreprocessError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        rt = init_runtime(cfg.parallel, seed=cfg.train.seed)
        if preference:
            result = evaluate_preference(cfg, rt, iter_dir, reference, args.data)
        else:
            result = evaluate(cfg, rt, iter_dir, args.data)
    except (ConfigError, PreprocessError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown_runtime()
    if rt.is_main:
        if preference:
            logger.info("DPO loss %.6f, reward accuracy %.4f, margin %.4f over %d pairs (%d "
                        "dropped), beta %g", result["loss"], result["accuracy"],
                        result["margin"], result["pairs"], result["dropped"], result["beta"])
        else:
            logger.info("loss %.6f over %d loss tokens of %d documents (%d dropped)",
                        result["loss"], result["tokens"], result["documents"], result["dropped"])
        if args.json:
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
