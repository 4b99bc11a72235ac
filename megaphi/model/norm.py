"""RMSNorm for Megatron-Core's local (non-Transformer-Engine) layer spec.

Megatron's local spec wraps ``torch.nn.RMSNorm`` and refuses sequence parallelism. Under sequence
parallelism each tensor-parallel rank normalises a different slice of the sequence, so the norm
weight's gradient on each rank is partial: tagging the weight ``sequence_parallel=True`` makes
Megatron's ``finalize_model_grads`` sum it over the tensor-parallel group, as it does for TE's norms.
"""

from __future__ import annotations

import torch

from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.Module):
    """``y = weight * x / sqrt(mean(x^2) + eps)``, no bias; normalised in fp32 and cast back
    before the weight is applied, as in Hugging Face's ``Phi3RMSNorm``."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [s, b, h]
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)
