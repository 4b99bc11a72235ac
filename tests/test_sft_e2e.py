"""End to end: pre-train the tiny model briefly, then SFT from it on the shipped chat sample
with 2 processes at TP=2 (CPU, gloo): the validation loss on assistant tokens falls, a stopped
and resumed run gives bitwise the same losses, and the TP=2 checkpoint loads at TP=1."""

import json

import pytest

from distributed import TINY_SFT, eval_json, logged_losses, megaphi_train


# ---------------------------------------------------------------------------------------------
# End to end: pre-train, then SFT on the chat sample


SFT = TINY_SFT


@pytest.fixture(scope="module")
def sft_straight(tiny_sft):
    """The uninterrupted run (the session's ``tiny_sft``, shared with the DPO tests)."""
    return tiny_sft


def test_sft_lowers_the_validation_loss_on_assistant_tokens(sft_straight):
    records = [json.loads(x) for x in (sft_straight / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val) == 3 and val[2] < val[1] < val[0], val
    train = [r for r in records if "loss" in r]
    assert all(r["loss_tokens"] > 0 and r["real_tokens_per_s"] > 0 for r in train)


def test_sft_resume_is_bitwise_exact(sft_straight, tiny_pretrained, chat_mixture, tmp_path):
    """Stopped at step 3 and relaunched, with a new peak LR that the resumed schedule (taken
    from the checkpoint) ignores: bitwise the uninterrupted run's losses, and config.yaml says
    what the run really does."""
    import yaml

    run_dir = tmp_path / "run"
    args = [*SFT, f"checkpoint.load={tiny_pretrained}", f"data.mixture={chat_mixture}",
            f"train.run_dir={run_dir}"]
    first = megaphi_train(2, *args, "train.exit_interval=3")
    assert first.returncode == 0, first.stderr[-4000:]
    second = megaphi_train(2, *args, "optimizer.lr=5e-4")
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from" in second.stderr
    assert "optimizer.lr=0.0005 is ignored" in second.stderr
    assert logged_losses(run_dir) == logged_losses(sft_straight)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optimizer"]["lr"] == 1e-3


def test_sft_checkpoint_saved_at_tp2_loads_at_tp1(sft_straight, chat_mixture):
    valid = chat_mixture.parent / "faq_valid"
    at_tp2 = eval_json(2, sft_straight, valid, "parallel.tp=2")
    at_tp1 = eval_json(1, sft_straight, valid)  # default layout: the whole model, tp=1
    assert at_tp1["layout"]["tp"] == 1 and at_tp2["layout"]["tp"] == 2
    assert at_tp1["tokens"] == at_tp2["tokens"] > 0
    assert at_tp1["loss"] == pytest.approx(at_tp2["loss"], rel=1e-5)
    meta = json.loads((sft_straight / "checkpoints" / "iter_0000006" / "megaphi.json").read_text())
    assert meta["layout"]["tp"] == 2 and meta["layout"]["cp"] == 1
    assert meta["config"]["phase"]["name"] == "sft"
