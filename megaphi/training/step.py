"""One forward/backward pass of the parallel model over a global batch, on Megatron's schedules.

The phase supplies Megatron's ``forward_step_func`` (:mod:`megaphi.phases`); its loss function
returns ``(loss_sum, count, report)``. With ``calculate_per_token_loss`` (set by the model
builder) the schedule back-propagates the sums, and ``finalize_model_grads`` sums gradients
over data- and context-parallel ranks, takes the global count (broadcast from the last pipeline
stage, all-reduced over DP x CP) and divides the gradients by it: the step's gradient is that
of the sum of per-token losses over the global batch divided by their number, at any number of
micro-batches, DP, CP and PP ranks. After the schedule, :func:`forward_backward` has also
finished the reductions Megatron defers to the end of the step (the tensor-parallel all-reduce
of sequence-parallel norm weights, tied-embedding sync).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List

import torch

Batch = Dict[str, torch.Tensor]


def make_position_ids(tokens: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` positions 0..s-1 for each row."""
    b, s = tokens.shape
    return torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)


def lm_batch(sequences: torch.Tensor, device: torch.device) -> Batch:
    """Build a micro-batch from ``[b, s+1]`` token ids: inputs, shifted labels, mask, positions."""
    sequences = sequences.to(device)
    tokens, labels = sequences[:, :-1].contiguous(), sequences[:, 1:].contiguous()
    return {"tokens": tokens, "labels": labels, "position_ids": make_position_ids(tokens),
            "loss_mask": torch.ones_like(labels, dtype=torch.float32)}


def forward_backward(chunks: List[torch.nn.Module], micro_batches: Iterable[Batch],
                     num_microbatches: int, seq_length: int, micro_batch_size: int,
                     forward_step_func: Callable, forward_only: bool = False) -> List[dict]:
    """Run the pipeline schedule for the given model chunks; returns the per-micro-batch
    reports of the loss function (only on the last pipeline stage; empty elsewhere). With
    chunks prepared by :func:`wrap_for_training`, gradients are complete and reduced
    afterwards. ``seq_length`` is the length of the tensors passed between pipeline stages."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    it = iter(micro_batches)
    # Every virtual stage reads the same batch stream; Megatron pulls from each when needed.
    if len(chunks) > 1:
        batches = list(it)
        data = [iter(batches) for _ in chunks]
    else:
        data = it
    losses = get_forward_backward_func()(
        forward_step_func=forward_step_func, data_iterator=data, model=chunks,
        num_microbatches=num_microbatches, seq_length=seq_length,
        micro_batch_size=micro_batch_size, forward_only=forward_only)
    return losses


def wrap_for_training(chunks: List[torch.nn.Module], distributed_optimizer: bool = True,
                      grad_reduce_in_fp32: bool = True) -> List[torch.nn.Module]:
    """Wrap each chunk in Megatron-Core's ``DistributedDataParallel`` and install the schedule
    hooks (deferred grad sync across micro-batches, ``finalize_model_grads`` at the end)."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32, overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer)
    wrapped = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                       disable_bucketing=(i > 0))
               for i, chunk in enumerate(chunks)]
    config.no_sync_func = [w.no_sync for w in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped
