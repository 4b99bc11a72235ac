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


def test_benchmark_pts_reports_rollout_speed_and_search_cost():
    """tools/benchmark_pts.py at a very small setting (the tiny preset with random weights, 4
    rollouts of 8 tokens, one timed batch per arm): both arms' rollouts/s and their ratio, the
    same model in both, equal work; on the planted completions both splits find every planted
    pivot and the log-prob split (Figure 4) needs no more estimates than the token split on
    every seed (fewer in all). Bad arguments: one line on stderr, exit status 2."""
    tool = ROOT / "tools" / "benchmark_pts.py"
    proc = subprocess.run([sys.executable, str(tool), "--rollouts", "4", "--max-new-tokens", "8",
                           "--repeats", "1", "--threads", "1", "--json", "--quiet"],
                          capture_output=True, text=True, env=worker_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = proc.stdout.strip().splitlines()  # --json: one line and nothing else
    out = json.loads(line)
    speed = out["rollout_speed"]
    assert (speed["rollouts"], speed["max_new_tokens"], speed["threads"]) == (4, 8, 1)
    for arm in ("megaphi", "hf"):
        figures = speed[arm]
        assert figures["rollouts_per_s"] > 0 and figures["tokens_per_s"] > 0, arm
        assert figures["rollouts_per_s"] == pytest.approx(4 / figures["batch_time_s"])
        assert figures["tokens"] == [4 * 8], arm  # no early stop in either arm
    assert speed["ratio"] == pytest.approx(speed["megaphi"]["rollouts_per_s"]
                                           / speed["hf"]["rollouts_per_s"])
    assert speed["logprob_max_abs_diff"] < 1e-4  # the exported model is the same model
    search = out["search_cost"]
    rows = search["settings"]
    assert {(r["n"], r["k"]) for r in rows} == {(n, k) for n in (64, 256, 512) for k in (1, 2, 4)}
    for r in rows:
        lp, tok = r["logprob"], r["token"]
        assert r["same_pivots"] and lp["found"] == lp["planted_found"] == r["planted"], r
        assert tok["found"] == tok["planted_found"] == r["planted"], r
        assert len(lp["estimates"]) == len(tok["estimates"]) == search["seeds"]
        assert all(a <= b for a, b in zip(lp["estimates"], tok["estimates"])), r
        assert lp["estimates_per_pivot"] <= tok["estimates_per_pivot"], r
    assert sum(r["logprob"]["mean_estimates"] for r in rows) < sum(
        r["token"]["mean_estimates"] for r in rows)  # the two splits did differ

    for bad, flag in ((["--rollouts", "0"], "--rollouts"),
                      (["--policy", str(ROOT / "no-such-checkpoint")], "--policy")):
        proc = subprocess.run([sys.executable, str(tool), *bad, "--quiet"], capture_output=True,
                              text=True, env=worker_env(), timeout=300)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-4000:]
        errors = [x for x in proc.stderr.splitlines() if x.startswith("benchmark_pts: error:")]
        assert len(errors) == 1 and flag in errors[0], proc.stderr[-4000:]


def test_benchmark_synth_reports_throughput_against_the_bound():
    """tools/benchmark_synth.py at a small setting: each run's throughput, its bound
    (concurrency / latency) and the requests in flight, counted by client and server."""
    tool = ROOT / "tools" / "benchmark_synth.py"
    proc = subprocess.run([sys.executable, str(tool), "--latency", "0.1", "--concurrency", "1",
                           "8", "--rounds", "2", "--json"], capture_output=True, text=True,
                          env=worker_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    runs = {r["concurrency"]: r for r in out["runs"]}
    assert set(runs) == {1, 8}
    for c, r in runs.items():
        assert r["failed"] == 0 and r["requests"] == 16
        assert r["bound"] == pytest.approx(c / 0.1)
        assert r["client_max_in_flight"] == r["server_max_in_flight"] == c
        assert 0 < r["fraction_of_bound"] <= 1.0
        assert r["throughput"] == pytest.approx(16 / r["seconds"], rel=0.01)
    bad = subprocess.run([sys.executable, str(tool), "--latency", "0"], capture_output=True,
                         text=True, env=worker_env(), timeout=60)
    assert bad.returncode == 2 and "benchmark_synth: error: --latency" in bad.stderr


JANITOR_STAND_IN = '''
class Janitor:
    """lm-evaluation-harness's Janitor API (13-gram detection), for the harness's wiring."""
    def __init__(self, ngram_n=13, minimum_slice_length=200):
        self.n, self.grams = ngram_n, set()
    def _grams(self, text):
        words = "".join(c for c in text.lower() if c.isalnum() or c.isspace()).split()
        return {" ".join(words[i:i + self.n]) for i in range(len(words) - self.n + 1)}
    def register_contaminant_python(self, text):
        self.grams |= self._grams(text)
    def clean_python(self, text):
        return [] if self._grams(text) & self.grams else [text]
'''


def test_benchmark_decontam_reports_speed_and_the_side_by_side(tmp_path):
    tool = Path(__file__).resolve().parents[1] / "tools" / "benchmark_decontam.py"
    janitor = tmp_path / "janitor.py"
    janitor.write_text(JANITOR_STAND_IN)
    proc = subprocess.run([sys.executable, str(tool), "--corpus-mb", "0.4", "--janitor-mb",
                           "0.2", "--items-scale", "0.02", "--workers", "2", "--janitor",
                           str(janitor)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "test items in 20 benchmarks" in out
    for row in ("megaphi, 1 worker ", "megaphi, 2 workers", "megaphi, 1 worker (head)",
                "Janitor (python), 1 core"):
        assert row in out, out
    assert "speed-up on the same 0.2 MB, one core each:" in out
    detections = out.split("13-gram detections: ")[1].split()
    ours, theirs, both = int(detections[1].rstrip(",")), int(detections[3].rstrip(",")), \
        int(detections[5])
    assert ours > 0 and both >= 0.8 * max(ours, theirs), out
