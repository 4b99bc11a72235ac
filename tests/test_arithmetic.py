"""Parameter counts and FLOPs against hand-derived closed forms from PHI4.md."""

import pytest

from megaphi.config import load_config
from megaphi.model.arithmetic import flops_per_token, mfu, parameter_counts, peak_tflops

PHI4 = load_config("phi4-14b").model


def test_phi4_parameter_count_from_the_report_shapes():
    per_layer = 5120 * 7680 + 5120 * 5120 + 5120 * 35840 + 17920 * 5120 + 2 * 5120
    embeddings = 2 * 100352 * 5120  # untied input embedding and output layer
    expected = 40 * per_layer + 5120 + embeddings
    assert expected == 14_659_507_200
    counts = parameter_counts(PHI4)
    assert counts.total == expected
    assert counts.non_embedding == 40 * per_layer + 5120  # 13.63B


def test_flops_per_token_is_6n_plus_the_causal_attention_term():
    """Independent form: 6 FLOPs per matmul weight per token, plus causal attention
    (QK^T and AV over seq/2 keys on average, 3 passes, 2 FLOPs per multiply-add)."""
    s, layers = PHI4.seq_length, PHI4.num_layers
    matmul_weights = parameter_counts(PHI4).non_embedding - (2 * layers + 1) * 5120  # no norms
    matmul_weights += 100352 * 5120  # the output layer is a matmul; the embedding is a lookup
    attention = 3 * 2 * 2 * (s / 2) * (40 * 128) * layers
    assert flops_per_token(PHI4) == pytest.approx(6 * matmul_weights + attention, rel=1e-12)
    assert flops_per_token(PHI4, seq_length=16384) > flops_per_token(PHI4)


def test_mfu_against_the_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H200", "fp8") == 1979.0
    assert peak_tflops("cpu", "bf16") is None
    tokens = 0.57 * 989e12 / flops_per_token(PHI4)  # the bf16 target: 57% MFU
    assert mfu(tokens, PHI4, "NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(0.57)
    assert mfu(tokens, PHI4, "cpu", "bf16") is None
