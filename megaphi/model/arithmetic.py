"""Closed-form model arithmetic: parameter counts, training FLOPs per token, and MFU.

FLOPs follow Megatron-LM's accounting (``num_floating_point_operations``): every GEMM is counted
three times (forward, weight gradient, input gradient) at 2 FLOPs per multiply-add, with the
causal attention term (scores and values over an average of seq/2 keys). Embedding lookups,
norms, activations and softmax are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megaphi.config.schema import ModelConfig, PrecisionConfig

# Dense peak TFLOP/s per GPU (no sparsity), by device name fragment and precision.
PEAK_TFLOPS = {
    "H100": {"bf16": 989.0, "fp8": 1979.0},
    "H200": {"bf16": 989.0, "fp8": 1979.0},
}


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model; non-embedding excludes the input embedding and output layer."""

    total: int
    non_embedding: int


def layer_parameters(m: ModelConfig) -> int:
    """Parameters of one decoder layer: QKV, output projection, gate+up, down, two norms."""
    d = m.kv_channels
    qkv = m.hidden_size * (m.num_attention_heads + 2 * m.num_kv_heads) * d
    proj = m.num_attention_heads * d * m.hidden_size
    mlp = 3 * m.hidden_size * m.ffn_hidden_size
    return qkv + proj + mlp + 2 * m.hidden_size


def parameter_counts(m: ModelConfig) -> ParamCounts:
    """Closed-form parameter counts (no biases; the final norm counts as non-embedding)."""
    non_embedding = m.num_layers * layer_parameters(m) + m.hidden_size
    embeddings = m.vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2)
    return ParamCounts(total=non_embedding + embeddings, non_embedding=non_embedding)


def flops_per_token(m: ModelConfig, seq_length: Optional[int] = None) -> float:
    """Training FLOPs (forward + backward) per token at ``seq_length`` (default: the model's)."""
    s = seq_length or m.seq_length
    d, h = m.kv_channels, m.hidden_size
    q = m.num_attention_heads * d
    forward_per_layer = 2 * (
        h * (q + 2 * m.num_kv_heads * d)  # QKV projection
        + q * s / 2 * 2  # causal attention: QK^T and (softmax)V over s/2 keys on average
        + q * h  # output projection
        + 3 * h * m.ffn_hidden_size  # SwiGLU: gate, up, down
    )
    forward_logits = 2 * h * m.vocab_size
    return 3.0 * (m.num_layers * forward_per_layer + forward_logits)


def peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """Peak dense TFLOP/s for a device name (e.g. 'NVIDIA H100 80GB HBM3') and ``bf16``/``fp8``."""
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name:
            return peaks.get(precision)
    return None


def mfu(tokens_per_s_per_gpu: float, m: ModelConfig, device_name: str, precision: str,
        seq_length: Optional[int] = None) -> Optional[float]:
    """Model FLOPs utilisation (0..1) against the device's peak; ``None`` for unknown devices."""
    peak = peak_tflops(device_name, precision)
    if peak is None:
        return None
    return tokens_per_s_per_gpu * flops_per_token(m, seq_length) / (peak * 1e12)


def peak_precision(precision: PrecisionConfig) -> str:
    """Which device peak a run's precision is measured against: ``fp8`` or its dtype."""
    return "fp8" if precision.fp8.recipe else precision.dtype


def step_throughput(m: ModelConfig, tokens_per_step: int, step_time: float, gpus: int,
                    device_name: str, precision: str) -> dict:
    """Tokens/s (in all and per GPU), model TFLOP/s per GPU and MFU of a training step."""
    per_gpu = tokens_per_step / step_time / gpus
    return {"tokens_per_s": tokens_per_step / step_time, "tokens_per_s_per_gpu": per_gpu,
            "tflops_per_gpu": per_gpu * flops_per_token(m) / 1e12,
            "mfu": mfu(per_gpu, m, device_name, precision)}
