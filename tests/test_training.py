"""The trainer end to end on the shipped sample corpus (CPU, gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megaphi.platform import free_port

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "data" / "sample"


@pytest.fixture(scope="module")
def sample_mixture(tmp_path_factory):
    """Two real sources of the sample corpus, preprocessed with the real pipeline."""
    from megaphi.data.preprocess import preprocess
    from megaphi.data.tokenizer import Phi4Tokenizer

    tmp = tmp_path_factory.mktemp("data")
    for source in ("web", "code"):
        preprocess([str(SAMPLE / f"{source}.jsonl")], str(tmp / source), Phi4Tokenizer(), workers=1)
    path = tmp / "mix.yaml"
    path.write_text("train:\n  web: {weight: 0.4, prefixes: [web]}\n"
                    "  code: {weight: 0.6, prefixes: [code]}\n")
    return path


def train(nproc, *overrides, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "-m", "megaphi.train", "--preset", "tiny", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_loss_falls_within_tens_of_steps(sample_mixture, tmp_path):
    run_dir = tmp_path / "run"
    proc = train(1, f"data.mixture={sample_mixture}", f"train.run_dir={run_dir}",
                 "train.iters=40", "train.log_interval=5", "model.seq_length=64",
                 "train.micro_batch_size=2", "train.global_batch_size=4",
                 "schedule.warmup_iters=5", "optimizer.lr=2e-3", "data.num_workers=0")
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    losses = [r["loss"] for r in records]
    assert losses[0] > 9.0  # near ln(100352) = 11.5 after 5 steps
    assert sum(losses[-2:]) / 2 < losses[0] - 1.5, losses
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
