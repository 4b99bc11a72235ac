"""Run a test worker under torchrun on CPU (gloo) and load what its rank 0 saved."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from megaphi.platform import free_port

WORKERS = Path(__file__).parent / "workers"
ROOT = Path(__file__).resolve().parents[1]

TINY_SFT = ["phase.name=sft", "model.seq_length=256", "train.micro_batch_size=2",
            "train.global_batch_size=2", "train.iters=6", "train.log_interval=1",
            "schedule.warmup_iters=1", "optimizer.lr=1e-3", "data.num_workers=0",
            "logging.tensorboard=false", "checkpoint.keep_last=1", "parallel.tp=2",
            "train.eval_interval=2", "train.eval_iters=2"]
"""The ``tiny_sft`` fixture's run (conftest.py): 6 SFT steps from ``tiny_pretrained`` on the
chat sample at TP=2, validated every 2 steps."""


def worker_env(**extra) -> dict:
    """The environment of launched processes: one thread per process on a small CI machine."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def torchrun(nproc: int, *target) -> list:
    """A torchrun command line for ``nproc`` local processes on a free port."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", *map(str, target)]


def run_worker(script: str, nproc: int, out: Path, args=(), timeout: int = 600) -> dict:
    """Launch ``tests/workers/<script>`` on ``nproc`` processes; return the saved result."""
    cmd = torchrun(nproc, WORKERS / script, out, *args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=worker_env())
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return torch.load(out, weights_only=False)


def megaphi_train(nproc: int, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """``megaphi-train --preset tiny ARGS`` under torchrun on ``nproc`` processes, from the
    repository root (one process runs without torchrun, as ``python -m megaphi.train``, which
    saves the launcher's start-up); the caller checks the return code."""
    target = ["-m", "megaphi.train", "--preset", "tiny", *map(str, args)]
    cmd = torchrun(nproc, *target) if nproc > 1 else [sys.executable, *target]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=worker_env(MASTER_PORT=str(free_port())))


def logged_losses(run_dir: Path) -> list:
    """The training losses a run logged in ``metrics.jsonl`` (validation records skipped)."""
    records = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in records if "loss" in r]


def eval_json(nproc: int, ckpt, data, *overrides) -> dict:
    """``megaphi-eval --json`` under torchrun (one process: without); its last output line."""
    target = ["-m", "megaphi.eval", "--ckpt", ckpt, "--data", data, "--json", *overrides]
    cmd = torchrun(nproc, *target) if nproc > 1 else [sys.executable, *map(str, target)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env=worker_env(MASTER_PORT=str(free_port())))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
