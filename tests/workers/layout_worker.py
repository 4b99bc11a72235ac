"""One forward/backward step of the tiny model at a parallel layout; launched by torchrun.

Rank 0 saves ``{"loss", "weights", "grads", "mp_param_count", "rotary_inv_freq", ...}``, where
weights and gradients are gathered back to full (TP=1, PP=1) shapes under global names. Every
layout sees the same global batch: data-parallel ranks take consecutive slices of it.

    torchrun --nproc-per-node 2 tests/workers/layout_worker.py OUT.pt parallel.tp=2
"""

import argparse
import os

import torch
import torch.distributed as dist

from megaphi.config import load_config
from megaphi.platform import configure_logging, init_runtime, shutdown_runtime

GLOBAL_BATCH, MICRO_BATCH, SEQ = 8, 2, 32


def model_parallel_param_count(chunks) -> int:
    """Parameters over this model-parallel group, each replicated parameter counted once."""
    from megatron.core import parallel_state as ps

    from megaphi.model.partition import is_tp_sharded, named_global_parameters

    tp_rank = ps.get_tensor_model_parallel_rank()
    local = sum(p.numel() for _, p in named_global_parameters(chunks)
                if is_tp_sharded(p) or tp_rank == 0)
    total = torch.tensor([local], dtype=torch.int64)
    dist.all_reduce(total, group=ps.get_model_parallel_group())
    return int(total.item())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--spec", choices=["local", "te"], default="local")
    parser.add_argument("--allreduce-ddp", action="store_true",
                        help="plain all-reduce DDP (every DP rank holds the full gradient)")
    parser.add_argument("--forward-only", action="store_true")
    args = parser.parse_args()
    configure_logging("WARNING")

    from megatron.core import parallel_state as ps

    from megaphi.model.builder import build_model
    from megaphi.model.init import initialize_weights
    from megaphi.model.partition import gather_full
    from megaphi.phases.lm import token_forward_step
    from megaphi.training.step import forward_backward, lm_batch, wrap_for_training

    cfg = load_config("tiny", overrides=[f"model.seq_length={SEQ}", "precision.dtype=fp32",
                                         *args.overrides])
    seq = cfg.model.seq_length  # SEQ unless overridden (long-sequence GPU checks)
    rt = init_runtime(cfg.parallel, seed=cfg.train.seed)
    chunks = build_model(cfg, use_te=args.spec == "te")
    initialize_weights(chunks, cfg.model, seed=7)
    mp_count = model_parallel_param_count(chunks)
    config = chunks[0].config
    from megatron.core.utils import unwrap_model

    inv_freq = unwrap_model(chunks[0]).rotary_pos_emb.inv_freq.detach().cpu().clone()
    if not args.forward_only:
        chunks = wrap_for_training(chunks, distributed_optimizer=not args.allreduce_ddp)
        for chunk in chunks:
            chunk.zero_grad_buffer()

    sequences = torch.randint(0, cfg.model.vocab_size, (GLOBAL_BATCH, seq + 1),
                              generator=torch.Generator().manual_seed(0))
    per_dp = GLOBAL_BATCH // rt.dp
    mine = sequences[ps.get_data_parallel_rank() * per_dp:][:per_dp]
    micro = [lm_batch(mine[i:i + MICRO_BATCH], rt.device) for i in range(0, per_dp, MICRO_BATCH)]
    losses = forward_backward(chunks, micro, num_microbatches=len(micro), seq_length=seq,
                              micro_batch_size=MICRO_BATCH, forward_step_func=token_forward_step,
                              forward_only=args.forward_only)

    # The loss lives on the last pipeline stage: token-weighted over data-parallel replicas.
    totals = torch.zeros(2, dtype=torch.float64)
    if losses and ps.get_tensor_model_parallel_rank() == 0:
        totals += torch.stack([x["loss"] for x in losses]).sum(0).cpu()
    dist.all_reduce(totals)  # one copy per data-parallel rank, shared with rank 0
    loss = totals[:1] / totals[1]
    weights = gather_full(chunks)
    grads = None if args.forward_only else gather_full(chunks, grads=True)
    if rt.rank == 0:
        tmp = args.out + ".tmp"
        torch.save({"loss": loss.item(), "weights": weights, "grads": grads,
                    "mp_param_count": mp_count,
                    "rotary_inv_freq": inv_freq, "rotary_base": cfg.model.rotary_base,
                    "head_dim": cfg.model.kv_channels,
                    "recompute_granularity": config.recompute_granularity}, tmp)
        os.replace(tmp, args.out)
    shutdown_runtime()


if __name__ == "__main__":
    main()
