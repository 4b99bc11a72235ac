"""The per-GPU memory estimate of ``megaphi-train --dry-run`` (megaphi/model/memory.py): its
static part against what the real model, DDP and optimizer allocate (CPU, gloo), its activation
formula against a hand computation for the Phi-4 14B layout, the CLI, and (GPU) the whole
estimate against torch.cuda.max_memory_allocated."""

import json
import subprocess
import sys

import pytest
import torch

from distributed import ROOT, run_worker, worker_env

from megaphi.config import load_config

MIB = 1 << 20


LAYOUT = ["parallel.tp=2", "parallel.pp=2"]  # x dp=2 on 8 processes


@pytest.fixture(scope="module")
def allocated(tmp_path_factory):
    """What every rank allocates at tp=2 x pp=2 x dp=2, in fp32 and in bf16 (where the
    distributed optimizer adds fp32 main weights): one launch of 8 processes."""
    out = tmp_path_factory.mktemp("memory") / "allocated.pt"
    return run_worker("memory_worker.py", 8, out, args=LAYOUT)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_static_memory_is_what_the_model_and_optimizer_allocate(allocated, dtype):
    from megaphi.model.memory import estimate_memory

    cfg = load_config("tiny", overrides=[*LAYOUT, f"precision.dtype={dtype}"])
    estimate = estimate_memory(cfg, 8)
    assert len(allocated[dtype]) == 8
    for rank in allocated[dtype]:
        stage = estimate.stages[rank["stage"]]
        assert rank["params"] == stage.params, rank
        assert rank["weights"] == stage.weights, rank
        assert rank["grads_unpadded"] == stage.grads, rank
        assert rank["grads"] - rank["grads_unpadded"] < 0.01 * rank["grads"]  # bucket padding
        assert rank["optimizer"] == stage.optimizer, rank
    # the stages differ (embedding on the first, output layer and final norm on the last)
    assert estimate.stages[0].params != estimate.stages[1].params


PHI4_LAYER = 17 * 4096 * 1 * 5120 * 2 // 2  # bytes per layer and micro-batch (hand computation)


def test_activations_match_a_hand_computation_for_phi4_14b():
    """examples/phi4_14b_pretrain.yaml: s=4096, b=1, h=5120, a=40 heads of d=128, 10 KV heads,
    f=17920, tp=2 with sequence parallelism, pp=4, 40 layers, bf16 (2 bytes).

    One layer keeps, in units of s*b*h/t elements: attention: the norm input 1, the QKV input 1,
    Q 1 (a*d = h), K and V 2 x 10/40 = 0.5, the attention output 1 -> 4.5; MLP: the norm input
    1, the FC1 input 1, FC1's gate and up outputs 2 x 17920/5120 = 7, the FC2 input 3.5 -> 12.5;
    17 in all: 17 * 4096 * 5120 / 2 elements * 2 bytes = 356,515,840 bytes (340 MiB).
    1F1B: the first stage holds pp = 4 micro-batches of its 10 layers."""
    from megaphi.model.memory import estimate_memory, layer_activation_bytes

    cfg = load_config(config_file=str(ROOT / "examples" / "phi4_14b_pretrain.yaml"))
    assert layer_activation_bytes(cfg) == PHI4_LAYER == 356_515_840
    params = {k: 1 for k in range(4)}  # the static part is not under test here
    est = estimate_memory(cfg, 1920, params=params)
    assert est.dp == 240 and est.microbatches == 5760 // 240 == 24
    assert [s.in_flight for s in est.stages] == [4, 3, 2, 1]
    assert est.stages[0].activations == 10 * 4 * PHI4_LAYER == 14_260_633_600
    # the last stage: 1 micro-batch of 10 layers, plus the final norm's and the output layer's
    # inputs (2 * s*b*h/t * 2 bytes) and the fp32 logits (s*b*V/t * 4 bytes)
    output = 2 * 4096 * 5120 * 2 // 2 + 4096 * 100352 * 4 // 2
    assert output == 41_943_040 + 822_083_584
    assert est.stages[3].activations == 10 * PHI4_LAYER + output

    # interleaved (v=2): Megatron-LM's penalty 1 + (p-1)/(p*v) = 1.375 on the first stage
    est = estimate_memory(load_config(config_file=str(ROOT / "examples" / "phi4_14b_pretrain.yaml"),
                                      overrides=["parallel.vpp=5"]), 1920, params=params)
    assert est.stages[0].in_flight == 4 * (1 + 3 / 20)
    # full recomputation: each layer keeps its input (1 unit), plus one layer recomputed
    cfg = load_config(config_file=str(ROOT / "examples" / "phi4_14b_pretrain.yaml"),
                      overrides=["train.recompute=full"])
    est = estimate_memory(cfg, 1920, params=params)
    assert est.stages[0].activations == 10 * 4 * (4096 * 5120 * 2 // 2) + PHI4_LAYER
    # context parallelism divides the sequence: the 16K mid-training layout at cp=2 is 8K a rank
    cfg = load_config(config_file=str(ROOT / "examples" / "phi4_14b_midtrain.yaml"))
    assert cfg.parallel.cp == 2 and cfg.model.seq_length == 16384
    assert layer_activation_bytes(cfg) == 17 * 8192 * 5120 * 2 // cfg.parallel.tp


def test_the_phi4_static_memory_is_the_meta_models():
    """Stage 0 of tp=2 x pp=4: 10 layers of 340,797,440 parameters (linear weights split over
    TP, the two norms not) and half the 100,352 x 5120 embedding."""
    from megaphi.model.memory import static_parameters

    cfg = load_config(config_file=str(ROOT / "examples" / "phi4_14b_pretrain.yaml"))
    per_stage = static_parameters(cfg)
    layer, norms = 340_797_440, 2 * 5120
    assert per_stage[0] == 10 * ((layer - norms) // 2 + norms) + 100352 * 5120 // 2
    assert per_stage[3] == 10 * ((layer - norms) // 2 + norms) + 100352 * 5120 // 2 + 5120
    assert per_stage[1] == per_stage[2] == 10 * ((layer - norms) // 2 + norms)


PRETRAIN = str(ROOT / "examples" / "phi4_14b_pretrain.yaml")


def dry_run(capsys, *args):
    """``megaphi-train ARGS --dry-run`` in this process (the meta-device model needs no
    launch): (exit status, stdout, stderr)."""
    from megaphi.train import main

    status = main([*args, "--dry-run"])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, out, err)


def test_dry_run_prints_the_memory_and_warns_when_it_does_not_fit(capsys):
    proc = dry_run(capsys, "--config", PRETRAIN, "--world-size", "1920", "--gpu-memory-gb",
                   "80")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "# memory per GPU (the most loaded pipeline stage: 0 of 4; dp=240, 24 micro-batches" \
        in out
    for row in ("weights:", "gradients (fp32):", "optimizer state:", "activations:", "total:"):
        assert row in out
    assert "device: 80.0 GiB" in out and "WARNING" not in out
    small = dry_run(capsys, "--config", PRETRAIN, "--world-size", "1920", "--gpu-memory-gb",
                    "16")
    assert small.returncode == 0 and "WARNING: this layout needs" in small.stdout
    assert "expect out-of-memory at step 1" in small.stdout
    bad = dry_run(capsys, "--config", PRETRAIN, "--world-size", "12")
    assert bad.returncode == 2 and bad.stderr.startswith("megaphi-train: error: --world-size")
    for config in ("phi4_14b_sft.yaml", "phi4_14b_dpo_round2.yaml"):  # every phase
        proc = dry_run(capsys, "--config", str(ROOT / "examples" / config), "--world-size", "64")
        assert proc.returncode == 0 and "total:" in proc.stdout, proc.stderr
    assert "no second model is resident" in proc.stdout  # DPO


@pytest.mark.gpu
def test_estimate_is_not_under_the_measured_peak_on_a_phi4_slice(tmp_path):
    """A Phi-4 slice (the real layer geometry, 4 layers, seq 4096, bf16, TE) on one GPU: the
    benchmark's torch.cuda.max_memory_allocated against the estimate, which must not be more
    than 10% under it."""
    from megaphi.benchmark import bench_overrides
    from megaphi.model.memory import estimate_memory

    out = tmp_path / "bench.json"
    args = ["--preset", "phi4-14b", "--num-layers", "4", "--seq-length", "4096",
            "--micro-batch", "1", "--global-batch", "4", "--precision", "bf16", "--spec", "te",
            "--steps", "2", "--warmup", "1"]
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark_throughput.py"),
                           *args, "--json", str(out)], capture_output=True, text=True,
                          timeout=900, env=worker_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    measured = json.loads(out.read_text())[0]["peak_memory_gb"] * (1 << 30)
    cfg = load_config(preset="phi4-14b", overrides=bench_overrides(4, 4096, 1, 4, 1, 1, 1,
                                                                   "bf16"))
    estimate = estimate_memory(cfg, 1).peak.total
    print(f"estimate {estimate / MIB:,.0f} MiB, measured {measured / MIB:,.0f} MiB")
    assert estimate >= 0.9 * measured
    assert torch.cuda.is_available()
