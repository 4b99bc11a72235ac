"""GPU checks of the Transformer Engine path (skipped without CUDA)."""

import pytest
import torch

from distributed import run_worker

pytestmark = pytest.mark.gpu


def test_te_spec_forward_backward_matches_local_spec(tmp_path):
    """TE layers compute what the local layers compute, on the same (layout-independent) weights."""
    bf16 = ["precision.dtype=bf16"]
    local = run_worker("layout_worker.py", 1, tmp_path / "local.pt", [*bf16, "--spec", "local"])
    te = run_worker("layout_worker.py", 1, tmp_path / "te.pt", [*bf16, "--spec", "te"])
    assert abs(te["loss"] - local["loss"]) < 2e-2 * local["loss"]
    for name, grad in local["grads"].items():
        rel = ((te["grads"][name] - grad).norm() / grad.norm()).item()
        assert rel < 5e-2, f"{name}: TE gradient differs by {rel:.2e}"


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_fp8_forward_is_close_to_bf16(tmp_path, recipe):
    base = ["precision.dtype=bf16", "--spec", "te", "--forward-only"]
    bf16 = run_worker("layout_worker.py", 1, tmp_path / "bf16.pt", base)
    fp8 = run_worker("layout_worker.py", 1, tmp_path / "fp8.pt",
                     [f"precision.fp8.recipe={recipe}", *base])
    assert torch.isfinite(torch.tensor(fp8["loss"]))
    assert abs(fp8["loss"] - bf16["loss"]) < 5e-2 * bf16["loss"]


@pytest.mark.gpu(count=2)
def test_context_parallel_matches_cp1_at_a_long_sequence(tmp_path):
    """cp=2 (TE attention, load-balanced sequence split, loss over whole sequences) gives the
    loss and gradients of cp=1 on the same weights and batch, at 8,192 tokens."""
    args = ["precision.dtype=bf16", "model.seq_length=8192", "--spec", "te"]
    cp1 = run_worker("layout_worker.py", 1, tmp_path / "cp1.pt", args)
    cp2 = run_worker("layout_worker.py", 2, tmp_path / "cp2.pt", ["parallel.cp=2", *args])
    assert abs(cp2["loss"] - cp1["loss"]) < 1e-2 * cp1["loss"]
    for name, grad in cp1["grads"].items():
        rel = ((cp2["grads"][name] - grad).norm() / grad.norm()).item()
        assert rel < 5e-2, f"{name}: cp=2 gradient differs by {rel:.2e}"
