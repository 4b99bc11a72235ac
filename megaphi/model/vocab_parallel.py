"""Log-probabilities of chosen tokens from vocabulary-parallel logits, without gathering the
vocabulary.

Under tensor parallelism the output layer is column-parallel: each rank holds the logits of
its ``V / tp`` slice of the vocabulary. ``log p(t) = logit_t - logsumexp(logits)`` needs two
reductions over the slices, a max (for stability, no gradient) and a sum of exponentials, and
one more to fetch ``logit_t`` from the rank that holds ``t``. The sums use Megatron's
``reduce_from_tensor_model_parallel_region`` (all-reduce forward, identity backward): every
rank computes the same loss from the reduced values, so each slice's gradient is exact. Any
number of target tokens per position share one log-sum-exp: a Pivotal Token pair reads the
chosen and the rejected token's log-probs from one distribution.
"""

from __future__ import annotations

import torch


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(targets)`` under ``softmax(logits)`` over the whole vocabulary.

    Args:
        logits: ``[..., V / tp]``, this tensor-parallel rank's slice (rank ``r`` holds ids
            ``r * V / tp`` to ``(r + 1) * V / tp - 1``), any float dtype; computed in fp32.
        targets: ``[..., K]`` token ids (global).

    Returns:
        ``[..., K]`` fp32 log-probabilities, the same on every tensor-parallel rank.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    logits = logits.float()
    tp = ps.get_tensor_model_parallel_world_size()
    width = logits.shape[-1]
    first = ps.get_tensor_model_parallel_rank() * width
    with torch.no_grad():
        top = logits.max(dim=-1, keepdim=True).values
        if tp > 1:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=ps.get_tensor_model_parallel_group())
    sum_exp = reduce_from_tensor_model_parallel_region((logits - top).exp().sum(-1, keepdim=True))
    local = targets - first
    here = (local >= 0) & (local < width)
    picked = logits.gather(-1, local.clamp(0, width - 1)) * here
    picked = reduce_from_tensor_model_parallel_region(picked)
    return picked - top - sum_exp.log()
