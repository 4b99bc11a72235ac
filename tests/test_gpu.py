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


def _train_losses(run_dir, mixture, *overrides):
    from distributed import logged_losses, megaphi_train

    proc = megaphi_train(1, f"data.mixture={mixture}", f"train.run_dir={run_dir}",
                         "train.iters=300", "train.log_interval=10", "model.seq_length=256",
                         "train.micro_batch_size=8", "train.global_batch_size=16",
                         "optimizer.lr=1e-3", "schedule.warmup_iters=30", "data.num_workers=0",
                         "precision.dtype=bf16", "logging.tensorboard=false", *overrides,
                         timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return logged_losses(run_dir)


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_fp8_loss_curve_follows_bf16(tmp_path, sample_mixture, recipe):
    """300 steps of the tiny model on the sample corpus (TE spec): the FP8 loss curve stays
    within 3% of bf16's at every logged step and ends within 2%."""
    bf16 = _train_losses(tmp_path / "bf16", sample_mixture)
    fp8 = _train_losses(tmp_path / recipe, sample_mixture, f"precision.fp8.recipe={recipe}")
    assert len(fp8) == len(bf16) == 30 and bf16[-1] < bf16[0] - 3.0
    for step, (a, b) in enumerate(zip(fp8, bf16), start=1):
        assert abs(a - b) <= 0.03 * b, f"step {10 * step}: fp8 {a:.4f} vs bf16 {b:.4f}"
    assert abs(fp8[-1] - bf16[-1]) <= 0.02 * bf16[-1]


def test_thd_packed_rows_equal_the_mask_path(tmp_path):
    """Packed rows through Transformer Engine's THD format (cu_seqlens) give the per-token
    losses of the local spec's explicit block-diagonal mask, and of each document alone."""
    bf16 = ["precision.dtype=bf16"]
    mask = run_worker("packed_worker.py", 1, tmp_path / "mask.pt", [*bf16, "--spec", "local"])
    thd = run_worker("packed_worker.py", 1, tmp_path / "thd.pt", [*bf16, "--spec", "te"])
    real = thd["seq_ids"] >= 0
    torch.testing.assert_close(thd["packed"][real], mask["packed"][real], rtol=3e-2, atol=3e-2)
    for j, alone in enumerate(thd["alone"]):
        torch.testing.assert_close(thd["packed"][thd["seq_ids"] == j], alone, rtol=3e-2,
                                   atol=3e-2)


@pytest.mark.gpu(count=2)
def test_thd_packed_rows_at_tp2_with_sequence_parallelism(tmp_path):
    """THD with TP=2 and SP (the rows of a micro-batch concatenated, split over TP ranks)."""
    args = ["precision.dtype=bf16", "--spec", "te"]
    one = run_worker("packed_worker.py", 1, tmp_path / "tp1.pt", args)
    two = run_worker("packed_worker.py", 2, tmp_path / "tp2.pt",
                     ["parallel.tp=2", "parallel.sequence_parallel=true", *args])
    real = one["seq_ids"] >= 0
    torch.testing.assert_close(two["packed"][real], one["packed"][real], rtol=3e-2, atol=3e-2)
