"""DPO (CPU, gloo, fp32): step-0 invariants at every layout, the closed-form token-pair
gradient across vocabulary-parallel shards, the reference log-prob cache, and end to end from a
tiny SFT checkpoint on the shipped preference sample (reward accuracy, exact resume, TP=2 to
TP=1). Parity with transformers and TRL is in test_dpo_parity.py."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from distributed import ROOT, eval_json, logged_losses, megaphi_train, run_worker, worker_env

PAIRS = ROOT / "examples" / "data" / "preference" / "faq_pairs.jsonl"


# ---------------------------------------------------------------------------------------------
# Step 0 and the token-pair gradient, at TP=2, PP=2, TP=2 x PP=2 and DP (one launch)


@pytest.fixture(scope="module")
def step0(tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_step0") / "out.pt"
    return run_worker("dpo_worker.py", 4, out, args=["tp2pp2", "tp2", "pp2", "dp"])


@pytest.mark.parametrize("layout", ["tp2pp2", "tp2", "pp2", "dp"])
def test_step0_loss_is_ln2_and_ties_are_not_won(step0, layout):
    result = step0[layout]
    metrics = result["metrics"]
    assert abs(metrics["loss"] - math.log(2)) < 1e-6, metrics
    assert metrics["rewards/accuracy"] == 0.0  # every pair a tie: none won
    assert metrics["rewards/margin"] == 0.0 and metrics["rewards/chosen"] == 0.0
    assert metrics["pairs"] > 0
    tp, pp, dp = result["layout"]
    assert (tp, pp) == {"tp2pp2": (2, 2), "tp2": (2, 1), "pp2": (1, 2), "dp": (1, 1)}[layout]
    assert tp * pp * dp == 4


@pytest.mark.parametrize("layout", ["tp2pp2", "tp2", "pp2", "dp"])
def test_token_pair_logit_gradient_is_minus_and_plus_half_beta(step0, layout):
    """One token pair alone in the global batch at step 0: d loss / d logits is -beta/2 on
    the chosen token, +beta/2 on the rejected one and 0 everywhere else (every position, every
    vocabulary shard; gathered over TP=2 where the logits are split)."""
    grad = step0[layout]["grad"]
    g, pos = grad["logits_grad"], grad["position"]
    beta = 0.25
    assert g.shape[-1] == 1024
    assert g[pos, grad["chosen"]].item() == pytest.approx(-beta / 2, abs=1e-7)
    assert g[pos, grad["rejected"]].item() == pytest.approx(beta / 2, abs=1e-7)
    rest = g.clone()
    rest[pos, grad["chosen"]] = rest[pos, grad["rejected"]] = 0.0
    assert rest.abs().max().item() < 1e-7


def test_chosen_and_rejected_of_a_pair_share_a_row(tmp_path):
    """Packing keeps both sequences of every pair in one row, and a token pair's two tokens
    at its context's last position."""
    from megaphi.data.packing import PackedRows
    from megaphi.data.preference import PairSegments, TokenPair
    from megaphi.data.preprocess import preprocess
    from megaphi.data.tokenizer import Phi4Tokenizer

    prefix = tmp_path / "pairs"
    preprocess([str(PAIRS)], str(prefix), Phi4Tokenizer(), workers=1, format="preference")
    seg = PairSegments(str(prefix), 512, first_pair=100)
    rows = PackedRows(seg, 512, seed=1, repack=False)
    seen = set()
    for i in range(len(rows)):
        row = rows[i]
        slots = row["pair_index"][row["pair_index"] >= 0]
        for slot, index in enumerate(slots.tolist()):
            pair = seg.pairs[index - 100]
            chosen = row["chosen_pair"] == slot
            rejected = row["rejected_pair"] == slot
            if isinstance(pair, TokenPair):
                (pos,) = torch.nonzero(chosen).flatten().tolist()
                assert torch.equal(chosen, rejected)
                assert row["labels"][pos] == pair.chosen_id
                assert row["rejected_labels"][pos] == pair.rejected_id
            else:
                assert row["labels"][chosen].tolist() == pair.chosen.tolist()
                assert row["rejected_labels"][rejected].tolist() == pair.rejected.tolist()
            seen.add(index)
    assert seen == {100 + i for i in seg.kept().tolist()}
    assert seg.dropped == 240 - len(seen) > 0


# ---------------------------------------------------------------------------------------------
# End to end: SFT checkpoint -> DPO at TP=2 on the shipped sample


DPO = ["phase.name=dpo", "model.seq_length=256", "parallel.tp=2", "train.micro_batch_size=2",
       "train.global_batch_size=8", "train.log_interval=1", "schedule.warmup_iters=0",
       "optimizer.lr=1e-3", "optimizer.min_lr=1e-3", "optimizer.weight_decay=0.0",
       "data.num_workers=0", "logging.tensorboard=false", "checkpoint.keep_last=1"]


@pytest.fixture(scope="module")
def sft_checkpoint(tiny_sft):
    """The tiny pre-trained model after 6 SFT steps on the chat sample (a TP=2 checkpoint,
    shared with test_sft_e2e)."""
    return tiny_sft


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """The first 64 pairs of the shipped sample (32 full, 32 token pairs), preprocessed."""
    from megaphi.data.preprocess import preprocess
    from megaphi.data.tokenizer import Phi4Tokenizer

    tmp = tmp_path_factory.mktemp("pairs")
    (tmp / "pairs.jsonl").write_text("".join(PAIRS.read_text().splitlines(True)[:64]))
    preprocess([str(tmp / "pairs.jsonl")], str(tmp / "pairs"), Phi4Tokenizer(), workers=1,
               format="preference")
    (tmp / "mix.yaml").write_text("train:\n  faq: {weight: 1.0, prefixes: [pairs]}\n")
    return tmp


@pytest.fixture(scope="module")
def dpo_run(sft_checkpoint, pairs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("dpo") / "run"
    proc = megaphi_train(2, *DPO, "train.iters=8", f"checkpoint.load={sft_checkpoint}",
                         f"data.mixture={pairs / 'mix.yaml'}", f"train.run_dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir, proc.stderr


def records(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dpo_learns_the_preferences(dpo_run, sft_checkpoint, pairs):
    """Step 1 (policy = reference) logs loss ln 2 and accuracy 0 (all ties: chance would be
    0.5); after 8 steps
    the reward accuracy over every training pair, evaluated at TP=1 against the SFT model,
    is above 0.9; the same evaluation at TP=2 agrees (the TP=2 checkpoint reshards)."""
    run_dir, log = dpo_run
    steps = [r for r in records(run_dir) if "loss" in r]
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-6 and steps[0]["rewards/accuracy"] == 0.0
    assert steps[-1]["loss"] < steps[0]["loss"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
                "logps/chosen", "logps/rejected", "pairs"):
        assert all(key in r for r in steps), key
    prefix = pairs / "pairs"
    at_tp1 = eval_json(1, run_dir, prefix, "--reference", sft_checkpoint, "--beta", "0.1",
                       "model.seq_length=256")
    assert at_tp1["accuracy"] > 0.9 and at_tp1["pairs"] == 64 - at_tp1["dropped"] > 30
    assert at_tp1["loss"] < math.log(2) and at_tp1["margin"] > 0
    at_tp2 = eval_json(2, run_dir, prefix, "model.seq_length=256", "parallel.tp=2")
    assert at_tp2["reference"].startswith(str(sft_checkpoint))  # the run's checkpoint.load
    assert at_tp2["layout"]["tp"] == 2 and at_tp1["layout"]["tp"] == 1
    for key in ("loss", "accuracy", "margin", "rewards/chosen", "logps/rejected"):
        assert at_tp2[key] == pytest.approx(at_tp1[key], rel=1e-5, abs=1e-6), key


def test_dpo_resume_is_exact_and_reuses_the_reference_logps(dpo_run, sft_checkpoint, pairs,
                                                             tmp_path):
    """Stopped after 2 steps and relaunched: the losses are bitwise those of the uninterrupted
    run (constant LR, so a 4-step run is its prefix), and the relaunch loads the stored
    reference log-probs without running the reference (the file is untouched)."""
    run_dir = tmp_path / "run"
    args = [*DPO, "train.iters=4", f"checkpoint.load={sft_checkpoint}",
            f"data.mixture={pairs / 'mix.yaml'}", f"train.run_dir={run_dir}"]
    first = megaphi_train(2, *args, "train.exit_interval=2")
    assert first.returncode == 0, first.stderr[-4000:]
    assert "computing the reference log-probs" in first.stderr
    cache = run_dir / "reference_logps.npz"
    stamp = cache.stat().st_mtime_ns, cache.read_bytes()
    second = megaphi_train(2, *args)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from" in second.stderr
    assert "computing the reference log-probs" not in second.stderr
    assert "reused from" in second.stderr and "reference log-probs:" not in second.stderr
    assert (cache.stat().st_mtime_ns, cache.read_bytes()) == stamp
    straight = logged_losses(dpo_run[0])[:4]
    assert logged_losses(run_dir) == straight


def test_reference_cache_refuses_other_data_or_reference(dpo_run, pairs, tiny_pretrained,
                                                         sft_checkpoint, tmp_path):
    """The finished run's stored log-probs do not match another reference, other data or
    another row length: each is one error line naming the setting, before any launch."""
    run_dir, _ = dpo_run
    common = [*DPO, "train.iters=8", f"train.run_dir={run_dir}",
              f"checkpoint.load={sft_checkpoint}"]
    mix = f"data.mixture={pairs / 'mix.yaml'}"
    other = tmp_path / "other"
    (tmp_path / "other.jsonl").write_text("".join(PAIRS.read_text().splitlines(True)[64:80]))
    from megaphi.data.preprocess import preprocess
    from megaphi.data.tokenizer import Phi4Tokenizer

    preprocess([str(tmp_path / "other.jsonl")], str(other), Phi4Tokenizer(), workers=1,
               format="preference")
    (tmp_path / "mix.yaml").write_text(f"train:\n  faq: {{weight: 1.0, prefixes: [{other}]}}\n")
    cases = [([mix, f"dpo.reference={tiny_pretrained}"], "dpo.reference: "),
             ([f"data.mixture={tmp_path / 'mix.yaml'}"], "data.mixture: "),
             ([mix, "model.seq_length=512"], "model.seq_length: ")]
    for extra, field in cases:
        proc = subprocess.run([sys.executable, "-m", "megaphi.train", "--preset", "tiny",
                               *common, *extra], capture_output=True, text=True, timeout=300,
                              env=worker_env(), cwd=ROOT)
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert field in line and "reference log-probs" in line and "Fix:" in line, line
        assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# Config and the loss in closed form


def test_dpo_config_is_validated():
    from megaphi.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^checkpoint.load: phase.name=dpo"):
        load_config("tiny", overrides=["phase.name=dpo"])
    base = ["phase.name=dpo", "checkpoint.load=x"]
    for bad, field in ((["dpo.beta=0"], "dpo.beta"), (["dpo.label_smoothing=0.5"],
                                                      "dpo.label_smoothing"),
                       (["dpo.loss=ipo", "dpo.label_smoothing=0.1"], "dpo.label_smoothing"),
                       (["dpo.sft_weight=-1"], "dpo.sft_weight"), (["dpo.loss=hinge"], "dpo.loss")):
        with pytest.raises(ConfigError, match=f"^{field}: "):
            load_config("tiny", overrides=[*base, *bad])
    for path in ("examples/phi4_14b_dpo_round1.yaml", "examples/phi4_14b_dpo_round2.yaml",
                 "examples/tiny_dpo.yaml"):
        cfg = load_config(config_file=str(ROOT / path))
        assert cfg.phase.name == "dpo" and cfg.dpo.beta == 0.1 and cfg.checkpoint.load
    from megaphi.phases import get_phase

    for bad, field in ((["data.overlong=truncate"], "data.overlong"),):
        with pytest.raises(ConfigError, match=f"^{field}: "):
            get_phase(load_config("tiny", overrides=[*base, *bad]))


def test_preference_loss_matches_the_closed_forms():
    """sigmoid, cDPO, IPO, averaged log-probs and the NLL term against the papers' formulas
    evaluated by hand on two pairs."""
    from megaphi.config.schema import DPOConfig
    from megaphi.phases.dpo import preference_loss

    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -2.0])
    nc, nr = torch.tensor([5.0, 2.0]), torch.tensor([4.0, 1.0])
    z = np.array([(-10 + 11) - (-12 + 11.5), (-4 + 4.5) - (-3 + 2)])  # 1.5, 1.5

    def sig(x):
        return 1 / (1 + np.exp(-x))

    losses, m = preference_loss(pc, pr, rc, rr, nc, nr, DPOConfig(beta=0.5))
    assert np.allclose(losses.numpy(), -np.log(sig(0.5 * z)))
    assert np.allclose(m["rewards/chosen"].numpy(), [0.5, 0.25])
    assert m["rewards/accuracy"].tolist() == [1.0, 1.0]
    losses, _ = preference_loss(pc, pr, rc, rr, nc, nr, DPOConfig(beta=0.5, label_smoothing=0.2))
    assert np.allclose(losses.numpy(), -0.8 * np.log(sig(0.5 * z)) - 0.2 * np.log(sig(-0.5 * z)))
    losses, _ = preference_loss(pc, pr, rc, rr, nc, nr,
                                DPOConfig(beta=0.5, loss="ipo", average_logps=True))
    za = np.array([1 / 5 - (-0.5) / 4, 0.5 / 2 - (-1) / 1])
    assert np.allclose(losses.numpy(), (za - 1 / (2 * 0.5)) ** 2)
    losses, _ = preference_loss(pc, pr, rc, rr, nc, nr, DPOConfig(beta=0.5, sft_weight=2.0))
    assert np.allclose(losses.numpy(), -np.log(sig(0.5 * z)) + 2.0 * np.array([10 / 5, 4 / 2]))
    _, m = preference_loss(pc, pr, pc, pr, nc, nr, DPOConfig())
    assert m["rewards/accuracy"].tolist() == [0.0, 0.0]  # ties are not won


def test_reference_cache_file_is_complete_or_absent(tmp_path):
    from megaphi.phases import reference

    fp = {"format": reference.FORMAT, "reference": "abc", "reference_path": "/r",
          "seq_length": 8, "datasets": {"a": "h1"}}
    values = {"a": (np.array([-1.0, np.nan]), np.array([-2.0, np.nan]))}
    reference.save(tmp_path, fp, values)
    assert not list(tmp_path.glob("*.tmp"))
    got = reference.load_cached(tmp_path, fp)
    assert np.array_equal(got["a"][0], values["a"][0], equal_nan=True)
    moved = {**fp, "datasets": {"b/renamed": "h1"}}  # same contents under another path
    assert np.array_equal(reference.load_cached(tmp_path, moved)["b/renamed"][1],
                          values["a"][1], equal_nan=True)
    assert reference.load_cached(tmp_path / "new", fp) is None
    os.remove(reference.cache_path(tmp_path))


def test_loss_and_gradients_are_exact_means_over_pairs_at_every_layout(step0):
    """Against a reference of other weights (per-pair losses differ), the reduced loss and
    rewards of a global batch of 8 rows equal plain means over its pairs, computed here from
    each pair's log-probs with the DPO formula, at TP2 x PP2, TP2, PP2 and DP4 (micro-batches
    and ranks holding different numbers of pairs); the gradients agree across the layouts."""
    beta, base = 0.25, None
    for layout in ("tp2pp2", "tp2", "pp2", "dp"):
        run = step0[layout]["other_reference"]
        index = np.array(run["pairs"])
        (pc, pr), (rc, rr) = run["policy"], run["reference"]
        z = (pc[index] - rc[index]) - (pr[index] - rr[index])
        expected = np.mean(np.log1p(np.exp(-beta * z)))  # -log sigmoid(beta z)
        m = run["metrics"]
        assert m["pairs"] == len(index) > 8
        assert m["loss"] == pytest.approx(expected, rel=1e-6)
        assert m["rewards/margin"] == pytest.approx(np.mean(beta * z), rel=1e-6, abs=1e-9)
        assert m["rewards/accuracy"] == pytest.approx(np.mean(z > 0))
        assert 0 < m["rewards/accuracy"] < 1  # the loss is not ln 2 everywhere
        if base is None:
            base = run["grads"]
            continue
        for name, grad in run["grads"].items():  # fp32: reduction orders differ with TP
            assert (grad - base[name]).norm() <= 1e-4 * base[name].norm(), (layout, name)
