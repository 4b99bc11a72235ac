"""Weight initialisation that does not depend on the parallel layout.

Each parameter's full (TP=1) tensor is drawn from its own generator, seeded from the run seed and
the parameter's global name, and each rank keeps only its shard. The same seed therefore gives the
same full weights at any TP / PP / virtual-PP layout, so runs at different layouts can be compared
step by step. (Draws are made on the parameter's device: CPU and CUDA generators give different
numbers, so weights agree across layouts on the same kind of device.)

The distributions are Megatron's defaults: weight matrices and embeddings ~ N(0, init_std); the
projections that write into the residual stream (attention ``linear_proj`` and MLP ``linear_fc2``)
~ N(0, init_std / sqrt(2 * num_layers)); norm weights = 1.
"""

from __future__ import annotations

import math
import zlib
from typing import List

import torch

from megaphi.config.schema import ModelConfig
from megaphi.model.partition import full_shape, named_global_parameters, shard

_RESIDUAL_OUTPUTS = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def param_seed(seed: int, global_name: str) -> int:
    """A stable 63-bit seed for one parameter (independent of Python's hash randomisation)."""
    return (seed * 1_000_003 + zlib.crc32(global_name.encode())) % (2**63 - 1)


def init_std_for(global_name: str, ndim: int, model: ModelConfig) -> float:
    """Standard deviation of a parameter's initialisation; 0.0 marks a norm weight (ones). The
    model has no biases, so its only 1-D parameters are norm weights."""
    if ndim == 1:
        return 0.0
    if global_name.endswith(_RESIDUAL_OUTPUTS):
        return model.init_std / math.sqrt(2.0 * model.num_layers)
    return model.init_std


@torch.no_grad()
def initialize_weights(chunks: List[torch.nn.Module], model: ModelConfig, seed: int) -> None:
    """Overwrite every parameter of this rank with its shard of the layout-independent init."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    tp_size = ps.get_tensor_model_parallel_world_size()
    for name, param in named_global_parameters(chunks):
        if param.device.type == "meta":
            continue
        std = init_std_for(name, param.ndim, model)
        if std == 0.0:
            param.fill_(1.0)
            continue
        gen = torch.Generator(device=param.device).manual_seed(param_seed(seed, name))
        full = torch.empty(full_shape(param, tp_size), dtype=torch.float32, device=param.device)
        full.normal_(mean=0.0, std=std, generator=gen)
        param.copy_(shard(full, param, tp_rank, tp_size))
