"""The trainer end to end on the shipped sample corpus (CPU, gloo)."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import logged_losses as losses
from distributed import megaphi_train as train
from distributed import run_worker, torchrun, worker_env
from megaphi.platform import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_loss_falls_within_tens_of_steps(char_mixture, char_model, tmp_path):
    run_dir = tmp_path / "run"
    proc = train(1, f"data.mixture={char_mixture}", *char_model, f"train.run_dir={run_dir}",
                 "train.iters=40", "train.log_interval=5", "model.seq_length=64",
                 "train.micro_batch_size=2", "train.global_batch_size=4",
                 "schedule.warmup_iters=5", "optimizer.lr=2e-3", "data.num_workers=0",
                 "train.eval_interval=20", "train.eval_iters=4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    records = [r for r in records if "loss" in r]
    assert len(val) == 2 and val[1] < val[0] < 4.85  # validation every 20 steps, improving
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    losses = [r["loss"] for r in records]
    assert losses[0] > 3.8  # steps 1-5 start near ln(128) = 4.85 (the char tokenizer's model)
    assert sum(losses[-2:]) / 2 < losses[0] - 1.0, losses
    last = records[-1]
    for key in ("lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "memory_gb"):
        assert key in last
    assert last["consumed_samples"] == 40 * 4
    assert (run_dir / "config.yaml").is_file()
    assert any((run_dir / "tensorboard").iterdir())


def test_missing_mixture_is_one_clear_error(tmp_path):
    proc = train(1, f"train.run_dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert "data.mixture" in proc.stderr and "Fix:" in proc.stderr


SHORT = ["train.iters=8", "train.log_interval=1", "model.seq_length=64", "train.micro_batch_size=2",
         "train.global_batch_size=4", "schedule.warmup_iters=2", "data.num_workers=0",
         "logging.tensorboard=false", "checkpoint.keep_last=1"]


@pytest.fixture(scope="module")
def short(char_mixture, char_model):
    """The sample corpus at the character level (128 embedding rows): these tests are about
    the trainer's mechanics, which the vocabulary does not change, and checkpoints are ~30x
    smaller than with Phi-4's 100,352 rows."""
    return [f"data.mixture={char_mixture}", *char_model, *SHORT]


@pytest.fixture(scope="module")
def straight(short, tmp_path_factory):
    """8 steps at TP=1 without interruption: the reference for resumed runs."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    proc = train(1, f"train.run_dir={run_dir}", *short)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return losses(run_dir)


def test_resume_is_bitwise_exact(short, straight, tmp_path):
    run_dir = tmp_path / "run"
    args = [f"train.run_dir={run_dir}", *short]
    first = train(1, *args, "train.exit_interval=4")
    assert first.returncode == 0, first.stderr[-4000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000004"
    assert len(losses(run_dir)) == 4
    second = train(1, *args)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from" in second.stderr
    assert losses(run_dir) == straight  # bitwise: same data position, optimizer and RNG state
    meta = json.loads((run_dir / "checkpoints" / "iter_0000008" / "megaphi.json").read_text())
    assert meta["megatron_core_version"] == "0.16.1" and meta["config"]["train"]["iters"] == 8


@pytest.mark.parametrize("saved_at", [["parallel.tp=2"], ["parallel.pp=2"]], ids=["tp2", "pp2"])
def test_checkpoint_reshards_to_tp1(short, straight, tmp_path, saved_at):
    """Saved at TP=2 (or PP=2), resumed at TP=1 PP=1: the following losses match the run that
    never changed layout, optimizer state included."""
    run_dir = tmp_path / "run"
    args = [f"train.run_dir={run_dir}", *short]
    first = train(2, *args, *saved_at, "train.exit_interval=4")
    assert first.returncode == 0, first.stderr[-4000:]
    second = train(1, *args)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "layout changed" in second.stderr
    for got, want in zip(losses(run_dir), straight, strict=True):
        assert abs(got - want) <= 1e-5 * want


def test_kill_during_save_leaves_latest_on_the_previous_checkpoint(short, tmp_path):
    """TP=2 on 2 processes, checkpoints every 4 steps; rank 1 is SIGKILLed inside the save of
    step 8, after its shards are on disk. `latest` still names step 4, the half-saved directory
    is ignored, and the relaunched run resumes at step 4, overwrites it, and logs the same
    losses as the attempt that was killed (bitwise: same layout, exact resume)."""
    run_dir = tmp_path / "run"
    args = [f"train.run_dir={run_dir}", *short, "parallel.tp=2", "checkpoint.interval=4",
            "checkpoint.keep_last=2", "train.iters=12"]
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        killed = subprocess.run(
            torchrun(2, ROOT / "tests" / "workers" / "kill_during_save_worker.py", "iter_0000008",
                     "--preset", "tiny", *args), stdout=out, stderr=subprocess.STDOUT, env=worker_env(), cwd=ROOT,
            timeout=600)
    assert killed.returncode != 0, "the worker was meant to be killed:\n" + log.read_text()[-3000:]
    ckpts = run_dir / "checkpoints"
    partial = ckpts / "iter_0000008"
    assert (ckpts / "latest").read_text().strip() == "iter_0000004"
    assert any(partial.iterdir()) and not (partial / "megaphi.json").exists()
    before_kill = losses(run_dir)
    assert len(before_kill) == 8  # the killed attempt trained and logged steps 1-8

    resumed = train(2, *args)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr and "at step 4 " in resumed.stderr
    after = losses(run_dir)
    assert len(after) == 12  # steps 5-8 of the killed attempt replaced, not duplicated
    assert after[:8] == before_kill
    assert (partial / "megaphi.json").is_file()
    assert (ckpts / "latest").read_text().strip() == "iter_0000012"


def test_sigterm_saves_a_checkpoint_and_exits_zero(short, tmp_path):
    """SLURM pre-emption: SIGTERM mid-run saves at the end of the current step, exits 0, and
    the relaunched run resumes from that step."""
    import time

    run_dir = tmp_path / "run"
    args = [f"train.run_dir={run_dir}", *short, "train.iters=1000"]
    env = worker_env(MASTER_PORT=str(free_port()))
    proc = subprocess.Popen([sys.executable, "-m", "megaphi.train", "--preset", "tiny", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "received signal" in stderr
    step = int((run_dir / "checkpoints" / "latest").read_text().strip()[len("iter_"):])
    assert 2 <= step < 1000
    assert len(losses(run_dir)) == step  # logged every step, up to the saved one
    relaunch = train(1, *args[:-1], f"train.iters={step + 1}")
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert f"at step {step} " in relaunch.stderr and len(losses(run_dir)) == step + 1


def test_injected_nonfinite_gradient_skips_the_step(tmp_path):
    """At TP=2, a NaN gradient skips the step on every rank and leaves the weights exactly as
    they were; training then continues; too many bad steps in a row stop the run."""
    got = run_worker("nonfinite_worker.py", 2, tmp_path / "out.pt",
                     ["parallel.tp=2", "model.vocab_size=128"])
    steps = got["steps"]
    assert [s["skipped"] for s in steps[:3]] == [False, True, False]
    assert steps[1]["after"] == steps[1]["before"]  # weights untouched by the skipped step
    assert steps[0]["after"] != steps[0]["before"] and steps[2]["after"] != steps[2]["before"]
    assert all(s["loss"] == s["loss"] for s in (steps[0], steps[2]))  # finite losses
    assert got["stopped"] is not None and "10 consecutive steps" in got["stopped"]


@pytest.mark.parametrize("layout", [(2, ["parallel.tp=2"]), (2, ["parallel.pp=2"]),
                                    (4, ["parallel.tp=2", "parallel.pp=2"])],
                         ids=["tp2", "pp2", "tp2_pp2"])
def test_same_seed_same_losses_at_any_layout(short, straight, tmp_path, layout):
    """megaphi-train at TP=2, PP=2 and TP=2 x PP=2: the losses of the first 8 steps agree with
    the TP=1 run within 1e-4 relative (same seed, same data, layout-independent init)."""
    nproc, overrides = layout
    run_dir = tmp_path / "run"
    proc = train(nproc, f"train.run_dir={run_dir}", *short, *overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for got, want in zip(losses(run_dir), straight, strict=True):
        assert abs(got - want) <= 1e-4 * want
