"""Run a test worker under torchrun on CPU (gloo) and load what its rank 0 saved."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from megaphi.platform import free_port

WORKERS = Path(__file__).parent / "workers"


def run_worker(script: str, nproc: int, out: Path, args=(), timeout: int = 600) -> dict:
    """Launch ``tests/workers/<script>`` on ``nproc`` processes; return the saved result."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(WORKERS / script), str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return torch.load(out, weights_only=False)
