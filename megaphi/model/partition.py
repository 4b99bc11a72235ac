"""Map between this rank's parameter shards and the full, layout-independent model.

A parameter's *global name* is its name in the unpartitioned model (TP=1, PP=1) built with the
local layer spec: layer indices are global (``decoder.layers.7...`` on the second of two pipeline
stages of an 8-layer model, where the local name says ``decoder.layers.3``). Its *full* tensor is the TP=1 tensor, in Megatron's own TP=1
layout (fused QKV grouped per query group, ``linear_fc1`` as ``[gate; up]``).

Sharding follows the attributes Megatron-Core sets on tensor-parallel parameters:
``partition_dim`` and ``partition_stride``. A full tensor is cut into ``tp * stride`` equal chunks
along ``partition_dim`` and rank ``r`` holds chunks ``r, r + tp, ...`` (so a SwiGLU ``linear_fc1``
with stride 2 holds ``[gate_r; up_r]``). Parameters without ``tensor_model_parallel`` are
replicated over the tensor-parallel group.
"""

from __future__ import annotations

import re
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")

# The Transformer Engine spec fuses each pre-norm into the following linear layer; global names
# use the local spec's names for these (as Megatron's own checkpoint key map does), so both
# specs share one naming for initialisation, gathering and conversion.
_TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def is_tp_sharded(param: torch.Tensor) -> bool:
    """True when Megatron split this parameter over the tensor-parallel group."""
    return bool(getattr(param, "tensor_model_parallel", False))


def named_global_parameters(chunks: List[torch.nn.Module]) -> Iterator[Tuple[str, torch.nn.Parameter]]:
    """``(global_name, param)`` for every parameter of this rank's model chunks (which may be
    wrapped in Megatron's DDP or Float16Module)."""
    from megatron.core.utils import unwrap_model

    for chunk in unwrap_model(list(chunks)):
        layers = chunk.decoder.layers if getattr(chunk, "decoder", None) is not None else []
        offsets = {i: layer.layer_number - 1 for i, layer in enumerate(layers)}
        for name, param in chunk.named_parameters():
            match = _LAYER.match(name)
            if match:
                local = int(match.group(1))
                rest = name[match.end():]
                name = f"decoder.layers.{offsets[local]}.{_TE_TO_LOCAL.get(rest, rest)}"
            yield name, param


def full_shape(param: torch.Tensor, tp_size: int) -> Tuple[int, ...]:
    """Shape of the unpartitioned tensor."""
    shape = list(param.shape)
    if is_tp_sharded(param):
        shape[param.partition_dim] *= tp_size
    return tuple(shape)


def shard(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's part of ``full`` for the (local) parameter ``param``."""
    if not is_tp_sharded(param) or tp_size == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = torch.chunk(full, tp_size * stride, dim=dim)
    return torch.cat(chunks[tp_rank::tp_size], dim=dim)


def unshard(shards: List[torch.Tensor], param: torch.Tensor) -> torch.Tensor:
    """Reassemble the full tensor from every TP rank's shard (the inverse of :func:`shard`)."""
    if not is_tp_sharded(param) or len(shards) == 1:
        return shards[0]
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    pieces = [torch.chunk(s, stride, dim=dim) for s in shards]
    return torch.cat([pieces[r][k] for k in range(stride) for r in range(len(shards))], dim=dim)


def gather_full(chunks: List[torch.nn.Module], grads: bool = False,
                dst: int = 0) -> Optional[Dict[str, torch.Tensor]]:
    """Gather the full model (or its gradients) onto global rank ``dst``.

    Collective over the whole world: every rank must call it. Shards are all-gathered over the
    tensor-parallel group, then pipeline stages send their tensors to ``dst``; data-parallel
    and context-parallel replicas other than the first contribute nothing. Gradients are read from Megatron DDP's
    ``main_grad`` when present, else ``.grad``. Returns ``{global_name: full tensor on CPU}``
    on ``dst`` and ``None`` elsewhere.
    """
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()
    tp_size = ps.get_tensor_model_parallel_world_size()
    local: Dict[str, torch.Tensor] = {}
    for name, param in named_global_parameters(chunks):
        tensor = _grad_of(param) if grads else param.detach()
        if tensor is None:
            continue
        if is_tp_sharded(param) and tp_size > 1:
            parts = [torch.empty_like(tensor) for _ in range(tp_size)]
            dist.all_gather(parts, tensor.contiguous(), group=tp_group)
            tensor = unshard(parts, param)
        # A copy, not a view: parameters and grads are views into DDP's contiguous buffers, and
        # pickling a view (gather_object) would serialise the whole buffer for every tensor.
        local[name] = tensor.to(device="cpu", dtype=torch.float32, copy=True)
    keep = (ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_context_parallel_rank() == 0)
    gathered = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(local if keep else {}, gathered, dst=dst)
    if gathered is None:
        return None
    merged: Dict[str, torch.Tensor] = {}
    for part in gathered:
        merged.update(part)
    return merged


def _grad_of(param: torch.nn.Parameter) -> Optional[torch.Tensor]:
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad
