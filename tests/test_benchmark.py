"""tools/benchmark_throughput.py on CPU with tiny shapes (the GPU figures come from H100 runs)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import torchrun, worker_env

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "benchmark_throughput.py"
TINY = ["--preset", "tiny", "--precision", "fp32", "--spec", "local", "--seq-length", "64",
        "--micro-batch", "2", "--global-batch", "4", "--warmup", "1", "--steps", "2"]


def test_benchmark_reports_megaphi_and_the_hf_baseline(tmp_path):
    """One process: megaphi and the HF model of the same shape, figures consistent with the
    closed-form FLOPs and with each other."""
    from megaphi.config import load_config
    from megaphi.model.arithmetic import flops_per_token

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(TOOL), *TINY, "--compare-hf", "--json", str(out)],
                          capture_output=True, text=True, env=worker_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "tokens_per_s_per_gpu" in proc.stdout and "hf-sdpa" in proc.stdout
    megaphi, hf = json.loads(out.read_text())
    model = load_config(preset="tiny", overrides=["model.seq_length=64"]).model
    for m in (megaphi, hf):
        assert (m["layers"], m["seq_length"], m["global_batch"]) == (4, 64, 4)
        assert m["tokens_per_s_per_gpu"] == pytest.approx(4 * 64 / m["step_time_s"])
        assert m["tflops_per_gpu"] * 1e12 == pytest.approx(m["tokens_per_s_per_gpu"] * flops_per_token(model))
        assert m["mfu"] is None and m["peak_memory_gb"] > 0  # no peak known for a CPU
        assert abs(m["loss"] - math.log(100352)) < 0.5  # random tokens, fresh model
    assert megaphi["name"] == "megaphi" and megaphi["layout"] == "tp1 pp1 cp1 dp1"
    assert hf["name"] == "hf"


def test_benchmark_runs_tensor_parallel_under_torchrun(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(torchrun(2, TOOL, *TINY, "--tp", "2", "--json", out),
                          capture_output=True, text=True, env=worker_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (m,) = json.loads(out.read_text())
    assert m["layout"] == "tp2 pp1 cp1 dp1" and m["gpus"] == 2


def test_benchmark_refuses_bad_settings():
    proc = subprocess.run([sys.executable, str(TOOL), *TINY, "--tp", "3"], capture_output=True,
                          text=True, env=worker_env(), timeout=300)
    assert proc.returncode == 2 and "parallel.tp" in proc.stderr
    proc = subprocess.run([sys.executable, str(TOOL), *TINY[:-6], "--spec", "te"],
                          capture_output=True, text=True, env=worker_env(), timeout=300)
    assert proc.returncode == 2 and "--spec" in proc.stderr


def test_benchmark_dpo_reports_the_three_comparisons():
    """tools/benchmark_dpo.py at a very small setting (one timed step of each variant, rows of
    128): the JSON line has every figure, positive, and the two token-pair layouts hold the
    same pairs (twice the pairs per row as one segment each)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "benchmark_dpo.py"), "--steps", "1", "--warmup",
         "0", "--json", "--quiet", "model.seq_length=128", "train.micro_batch_size=1",
         "train.global_batch_size=1"],
        capture_output=True, text=True, env=worker_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "one forward pass vs two rows per pair" in proc.stdout
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("token_pair_speedup", "reference_step_ratio", "packing_speedup",
                "reference_pass_pairs_per_s"):
        assert out[key] > 0, key
    assert out["token_logps_max_diff"] < 1e-4  # the layouts agree on the pairs both saw
    by = {m["name"]: m for m in out["measurements"]}
    assert set(by) == {"one_segment", "two_segments", "precomputed", "reference_forward",
                       "padded"}
    for m in by.values():
        assert m["seq_length"] == 128 and m["global_batch"] == 1
        assert m["step_time_s"] > 0 and m["pairs_per_s"] > 0 and m["real_tokens_per_s"] > 0
        assert m["pairs_per_step"] >= 1 and len(m["step_times_s"]) == 1
    assert by["one_segment"]["pairs_per_epoch"] == by["two_segments"]["pairs_per_epoch"] \
        == out["token_pairs"] > 0
    assert by["one_segment"]["rows_per_epoch"] < by["two_segments"]["rows_per_epoch"]
    assert by["padded"]["rows_per_epoch"] == by["padded"]["pairs_per_epoch"]
    assert by["padded"]["pack_efficiency"] < by["precomputed"]["pack_efficiency"]
