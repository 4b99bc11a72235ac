"""Hugging Face import and load at a parallel layout; launched by torchrun with tp*pp processes.

1. Imports HF_DIR into NEW_CKPT at this layout (every rank fills and saves its own shards).
2. Builds a fresh model at this layout, loads CKPT (imported elsewhere at TP=1) with
   ``load_checkpoint(..., load_optimizer=False)`` as training does, and runs a forward-only pass
   of Megatron's pipeline schedule on TOKENS. Rank 0 saves the full logits gathered from the last
   stage's tensor-parallel ranks.

    torchrun --nproc-per-node 2 tests/workers/hf_layout_worker.py OUT.pt HF_DIR CKPT NEW_CKPT \\
        TOKENS.pt --tp 2 --pp 1
"""

import argparse
import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist


def forward_logits(chunks, tokens: torch.Tensor):
    """Full logits ``[b, s, V]`` on the last pipeline stage (``None`` elsewhere)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megaphi.training.step import make_position_ids

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(input_ids=batch, position_ids=make_position_ids(batch), attention_mask=None)

        def collect(out, non_loss_data=False):  # [b, s, V/tp] -> [b, s, V]
            return gather_from_tensor_model_parallel_region(input_=out).detach().clone()

        return output, collect

    with torch.no_grad():
        data = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=chunks,
            num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
            forward_only=True, collect_non_loss_data=True)
    return data[0] if ps.is_pipeline_last_stage() else None


def main():
    parser = argparse.ArgumentParser()
    for name in ("out", "hf_dir", "ckpt", "new_ckpt", "tokens"):
        parser.add_argument(name)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()

    from megaphi.config import ParallelConfig
    from megaphi.platform import configure_logging

    configure_logging("WARNING")
    from megaphi.hf.convert import import_hf_checkpoint
    from megaphi.inference import checkpoint_config
    from megaphi.model.builder import build_model
    from megaphi.platform import init_runtime, shutdown_runtime
    from megaphi.training.checkpoint import load_checkpoint

    cfg = checkpoint_config(Path(args.ckpt) / "iter_0000000")
    cfg = dataclasses.replace(cfg, parallel=ParallelConfig(tp=args.tp, pp=args.pp))
    rt = init_runtime(cfg.parallel, seed=cfg.train.seed)
    import_hf_checkpoint(args.hf_dir, args.new_ckpt, tp=args.tp, pp=args.pp)  # in this job
    chunks = build_model(cfg, use_te=False)
    layout = {"tp": rt.tp, "pp": rt.pp, "vpp": None, "dp": rt.dp}
    load_checkpoint(Path(args.ckpt) / "iter_0000000", chunks, None, None, layout,
                    load_optimizer=False)
    for chunk in chunks:
        chunk.eval()
    logits = forward_logits(chunks, torch.load(args.tokens))
    gathered = [None] * dist.get_world_size() if rt.rank == 0 else None
    dist.gather_object(logits, gathered, dst=0)
    if rt.rank == 0:
        tmp = args.out + ".tmp"
        torch.save({"logits": next(x for x in gathered if x is not None)}, tmp)
        os.replace(tmp, args.out)
    shutdown_runtime()


if __name__ == "__main__":  # dist_checkpointing's save workers re-import this module
    main()
