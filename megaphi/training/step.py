"""One forward/backward pass of the parallel model over a global batch, on Megatron's schedules.

The loss is the mean next-token cross-entropy over the unmasked tokens of each micro-batch
(Megatron's vocab-parallel cross-entropy, computed where the logits are sharded); the schedule
averages it over micro-batches. After the schedule, :func:`forward_backward` finishes the
gradient reductions Megatron defers to the end of the step (data-parallel all-reduce, the
tensor-parallel all-reduce of sequence-parallel norm weights, tied-embedding sync).
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Iterable, List

import torch
import torch.distributed as dist

Batch = Dict[str, torch.Tensor]


def lm_loss(loss_mask: torch.Tensor, output: torch.Tensor, cp_group=None):
    """Mean per-token loss over unmasked tokens; ``output`` is ``[b, s]`` per-token losses.

    With context parallelism each rank holds a slice of every sequence: the mean is over the
    whole sequences (sums and counts all-reduced over the CP group), and this rank back-propagates
    its own tokens' part of it. (Megatron's schedule multiplies a 2-tuple loss by the CP size,
    and its DDP averages gradients over data x context-parallel ranks; the two cancel.)
    """
    losses = output.float()
    mask = loss_mask.float()
    local_sum = (losses * mask).sum()
    if cp_group is None:
        loss = local_sum / mask.sum().clamp(min=1.0)
        # clone: the schedule divides the returned loss by the micro-batch count in place
        return loss, {"lm loss": loss.detach().clone()}
    totals = torch.stack([local_sum.detach(), mask.sum()])
    dist.all_reduce(totals, group=cp_group)
    count = totals[1].clamp(min=1.0)
    return local_sum / count, {"lm loss": totals[0] / count}


def forward_step(data_iterator, model):
    """Megatron ``forward_step_func``: run one micro-batch, return the output and its loss fn.

    With context parallelism, the rank keeps its two of the ``2 * cp`` sequence chunks
    (Megatron's load-balanced causal split; RoPE positions are sliced the same way inside the
    model)."""
    from megatron.core import parallel_state as ps

    batch: Batch = next(data_iterator)
    cp_group = None
    if ps.get_context_parallel_world_size() > 1:
        from megatron.core.utils import get_batch_on_this_cp_rank

        batch = get_batch_on_this_cp_rank(dict(batch))
        cp_group = ps.get_context_parallel_group()
    output = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                   attention_mask=None, labels=batch["labels"])
    return output, partial(lm_loss, batch["loss_mask"], cp_group=cp_group)


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
                     forward_only: bool = False) -> List[dict]:
    """Run the pipeline schedule for the given model chunks; returns the per-micro-batch losses
    (only on the last pipeline stage; empty elsewhere). With chunks prepared by
    :func:`wrap_for_training`, gradients are complete and reduced afterwards."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    it = iter(micro_batches)
    # Every virtual stage reads the same batch stream; Megatron pulls from each when needed.
    if len(chunks) > 1:
        batches = list(it)
        data = [iter(batches) for _ in chunks]
    else:
        data = it
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=chunks,
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
