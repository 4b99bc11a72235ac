"""Mid-training: RoPE rescaling, starting from a pre-training checkpoint, long-context data and
the 30/70 blend (CPU, gloo)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distributed import logged_losses as losses
from distributed import megaphi_train, worker_env

ROOT = Path(__file__).resolve().parents[1]
EOD = 100257


# ---------------------------------------------------------------------------------------------
# RoPE: the model's rotary embedding against independent references


def model_rotary(overrides, seq=256):
    """The rotary angles ``[seq, head_dim]`` (and YaRN's attention factor) of the tiny model
    that megaphi builds from this config."""
    from megatron.core import parallel_state

    from megaphi.config import load_config
    from megaphi.model.builder import build_model
    from megaphi.platform import install_cpu_compat, single_process_group

    install_cpu_compat()
    cfg = load_config(preset="tiny", overrides=[f"model.seq_length={seq}", *overrides])
    with single_process_group():
        parallel_state.initialize_model_parallel()
        try:
            (model,) = build_model(cfg, use_te=False)
            out = model.rotary_pos_emb(seq)
        finally:
            parallel_state.destroy_model_parallel()
    factor = 1.0
    if isinstance(out, tuple):  # YaRN returns (angles, attention factor)
        out, factor = out
    return out[:, 0, 0, :].float(), factor, cfg.model.kv_channels


def hf_inv_freq(rope_parameters, head_dim=16):
    """transformers' inverse frequencies and attention factor for a RoPE type."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=head_dim * 8, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=256, rope_parameters=rope_parameters)
    return ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](config, torch.device("cpu"))


@pytest.mark.parametrize("base", [10000.0, 250000.0])
def test_rotary_frequencies_follow_the_configured_base(base):
    """theta_i = base^(-2i/d); angle(p, i) = p * theta_i, both halves (rotate_half layout)."""
    angles, factor, d = model_rotary([f"model.rotary_base={base}"])
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    expected = torch.outer(torch.arange(256, dtype=torch.float64), inv_freq)
    torch.testing.assert_close(angles.double(), torch.cat([expected, expected], -1),
                               rtol=1e-6, atol=1e-4)
    assert factor == 1.0


def test_linear_position_interpolation_matches_transformers():
    angles, _, d = model_rotary(["model.rope_scaling=linear", "model.rope_scaling_factor=4"])
    inv, _ = hf_inv_freq({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, d)
    expected = torch.outer(torch.arange(256, dtype=torch.float32), inv.float())
    torch.testing.assert_close(angles, torch.cat([expected, expected], -1), rtol=1e-5, atol=1e-4)


def test_yarn_matches_transformers():
    """Per-dimension YaRN frequencies and the attention factor 0.1 ln(4) + 1."""
    angles, factor, d = model_rotary(["model.rope_scaling=yarn", "model.rope_scaling_factor=4",
                                      "model.rope_original_seq_length=64",
                                      "model.rotary_base=10000"])
    inv, attention_factor = hf_inv_freq({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                         "original_max_position_embeddings": 64}, d)
    expected = torch.outer(torch.arange(256, dtype=torch.float32), inv.float())
    torch.testing.assert_close(angles, torch.cat([expected, expected], -1), rtol=1e-5, atol=1e-4)
    assert factor == pytest.approx(attention_factor) and factor == pytest.approx(
        0.1 * np.log(4) + 1)


def test_rope_scaling_settings_are_checked():
    from megaphi.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.rope_original_seq_length"):
        load_config(preset="tiny", overrides=["model.rope_scaling=yarn",
                                              "model.rope_scaling_factor=4"])
    with pytest.raises(ConfigError, match="model.rope_scaling_factor"):
        load_config(preset="tiny", overrides=["model.rope_scaling=linear"])
    with pytest.raises(ConfigError, match="checkpoint.load"):
        load_config(preset="tiny", overrides=["phase.name=midtrain"])


def test_context_parallelism_needs_te_attention():
    """cp > 1 is refused on CPU by the runtime (tests/test_config.py) and, on a GPU without
    Transformer Engine, when the model is built."""
    from megaphi.config import ConfigError, load_config
    from megaphi.model.builder import transformer_config

    cfg = load_config(preset="tiny", overrides=["parallel.cp=2"])
    with pytest.raises(ConfigError, match="parallel.cp: context parallelism"):
        transformer_config(cfg, use_te=False, on_gpu=True)


# ---------------------------------------------------------------------------------------------
# Pre-training checkpoint -> mid-training


COMMON = ["train.log_interval=1", "train.micro_batch_size=2", "train.global_batch_size=4",
          "data.num_workers=0", "logging.tensorboard=false", "optimizer.lr=2e-3"]


@pytest.fixture(scope="module")
def mixture(char_mixture, char_model):
    """The sample corpus with the character-level tokenizer (the vocabulary does not matter
    here, and its 128-row output layer makes every step ~10x cheaper), with its overrides."""
    return [f"data.mixture={char_mixture}", *char_model]


@pytest.fixture(scope="module")
def pretrained(mixture, tmp_path_factory):
    """The tiny model pre-trained 30 steps at sequence 64, RoPE base 10,000."""
    run_dir = tmp_path_factory.mktemp("pretrain") / "run"
    proc = megaphi_train(1, *mixture, f"train.run_dir={run_dir}",
                         *COMMON, "model.seq_length=64", "train.iters=30",
                         "schedule.warmup_iters=3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def midtrain(pretrained, mixture, run_dir, *overrides):
    return megaphi_train(1, *mixture, f"train.run_dir={run_dir}",
                         *COMMON, "phase.name=midtrain", f"checkpoint.load={pretrained}",
                         "model.seq_length=128", "optimizer.lr=2e-4", "schedule.warmup_iters=2",
                         *overrides)


def test_midtraining_continues_the_checkpoint_at_a_new_base_and_length(pretrained, mixture,
                                                                       tmp_path):
    """From the step-30 checkpoint at base 10,000 and sequence 64: base 250,000 at sequence 128.
    The change is logged, the new base is the one used and recorded, the loss starts where
    pre-training left it (weights loaded, not re-initialised), stays finite and falls."""
    run_dir = tmp_path / "mid"
    batch = ["train.micro_batch_size=8", "train.global_batch_size=16"]
    proc = midtrain(pretrained, mixture, run_dir, "model.rotary_base=250000", "train.iters=24",
                    *batch)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "rotary base 10000 -> 250000, sequence length 64 -> 128, peak LR 0.002 -> 0.0002" \
        in proc.stderr
    assert "checkpoint was trained with base 10000, which is reported, not applied" in proc.stderr
    saved = json.loads((run_dir / "checkpoints" / "iter_0000024" / "megaphi.json").read_text())
    assert saved["config"]["model"]["rotary_base"] == 250000.0
    assert saved["config"]["model"]["seq_length"] == 128 and saved["iteration"] == 24

    from megaphi.inference import InferenceModel

    with InferenceModel.from_checkpoint(run_dir) as loaded:  # as export and generation see it
        inv_freq = loaded.model.rotary_pos_emb.inv_freq.double().cpu()
    d = 2 * inv_freq.numel()
    torch.testing.assert_close(inv_freq, 250000.0 ** (-torch.arange(0, d, 2).double() / d))

    pre, mid = losses(pretrained), losses(run_dir)
    assert len(mid) == 24 and all(np.isfinite(mid))
    assert mid[0] < pre[0] - 1.0  # starts from trained weights (fresh init: ln 128 = 4.85)
    assert np.mean(mid[-4:]) < np.mean(mid[:4]) - 0.2, mid

    # Same checkpoint, same data, but the pre-training base: a different first loss (CPU runs
    # are deterministic; after 30 steps the tiny model barely uses positions, so the difference
    # is small), so the config's base is what the model uses; growing the context without
    # changing RoPE is warned about.
    same_base = midtrain(pretrained, mixture, tmp_path / "same", "train.iters=3", *batch)
    assert same_base.returncode == 0, same_base.stderr[-4000:]
    assert "with the checkpoint's RoPE unchanged" in same_base.stderr
    assert losses(tmp_path / "same")[0] != mid[0]


def test_midtraining_can_take_the_optimizer_state_and_resumes_its_own_checkpoint(
        pretrained, mixture, tmp_path):
    run_dir = tmp_path / "mid"
    args = ["model.rotary_base=250000", "checkpoint.load_optimizer=true", "train.iters=4"]
    first = midtrain(pretrained, mixture, run_dir, *args, "train.exit_interval=2")
    assert first.returncode == 0, first.stderr[-4000:]
    assert "loaded model weights and optimizer state" in first.stderr
    second = midtrain(pretrained, mixture, run_dir, *args)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from" in second.stderr and "is not used: this run resumes" in second.stderr
    assert len(losses(run_dir)) == 4


def test_a_checkpoint_of_another_architecture_is_refused(pretrained, mixture, tmp_path):
    """Checked from the checkpoint's megaphi.json before any process group or model exists."""
    proc = midtrain(pretrained, mixture, tmp_path / "mid", "model.num_kv_heads=4")
    assert proc.returncode != 0
    assert "megaphi-train: error: model.num_kv_heads: the checkpoint" in proc.stderr
    assert "num_kv_heads=2, this run 4" in proc.stderr
    proc = midtrain(tmp_path / "nothing-here", mixture, tmp_path / "mid")
    assert proc.returncode != 0
    assert "megaphi-train: error: checkpoint.load: " in proc.stderr and "nothing-here" in proc.stderr


# ---------------------------------------------------------------------------------------------
# Long-context data


def write_dataset(prefix: Path, docs):
    """A megaphi dataset whose documents are ``docs``: lists of sequences of token ids (the
    preprocessing layout: one sequence per document ending in the end-of-document token)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from megaphi.data.preprocess import META_FORMAT
    from megaphi.data.tokenizer import Phi4Tokenizer

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for sequences in docs:
        builder.add_document(torch.from_numpy(np.concatenate(sequences)),
                             [len(s) for s in sequences])
    builder.finalize(str(prefix) + ".idx")
    tokens = sum(len(s) for d in docs for s in d)
    meta = {"format": META_FORMAT, "tokenizer": Phi4Tokenizer().describe(),
            "documents": len(docs), "tokens": tokens, "skipped_lines": 0,
            "inputs": ["fixture"], "json_key": "text", "dtype": "int32"}
    Path(str(prefix) + ".meta.json").write_text(json.dumps(meta))


def document(n, seed, split_at=None):
    """A document of ``n`` tokens plus the end-of-document token (as one or two sequences)."""
    body = np.random.default_rng(seed).integers(0, 100000, n, dtype=np.int32)
    tokens = np.append(body, np.int32(EOD))
    return [tokens] if split_at is None else [tokens[:split_at], tokens[split_at:]]


def test_long_context_selection_is_exact(tmp_path):
    """Kept = the documents with more than 8,192 tokens (end-of-document not counted), in order;
    those with 16,384 or more written `--upweight-factor` times; the report counts them."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megaphi.data.long_context import select_long_documents

    lengths = [100, 8192, 8193, 5, 16383, 16384, 20000, 9000, 8191]
    docs = [document(n, seed=i, split_at=3000 if n == 9000 else None)
            for i, n in enumerate(lengths)]
    write_dataset(tmp_path / "web", docs)
    result = select_long_documents(str(tmp_path / "web"), str(tmp_path / "out" / "web"),
                                   upweight_factor=3)
    kept = [i for i, n in enumerate(lengths) if n > 8192]
    repeats = [3 if lengths[i] >= 16384 else 1 for i in kept]
    assert (result.documents, result.kept_documents) == (9, len(kept)) == (9, 5)
    assert result.upweighted_documents == 2 and result.written_documents == sum(repeats) == 9
    assert result.kept_tokens == sum(lengths[i] + 1 for i in kept)
    assert result.written_tokens == sum((lengths[i] + 1) * r for i, r in zip(kept, repeats))

    out = IndexedDataset(str(tmp_path / "out" / "web"))
    expected = [docs[i] for i, r in zip(kept, repeats) for _ in range(r)]
    starts = out.document_indices
    assert len(starts) - 1 == len(expected)
    for d, sequences in enumerate(expected):
        got = [out[j] for j in range(starts[d], starts[d + 1])]
        assert [g.tolist() for g in got] == [s.tolist() for s in sequences]
    meta = json.loads((tmp_path / "out" / "web.meta.json").read_text())
    assert meta["documents"] == 9 and meta["tokens"] == result.written_tokens
    assert meta["tokenizer"]["fingerprint"] and meta["selection"]["upweight_factor"] == 3


def test_long_context_cli_reports_per_source_and_refuses_bad_input(tmp_path):
    write_dataset(tmp_path / "books", [document(n, seed=n) for n in (9000, 100, 17000)])
    write_dataset(tmp_path / "web", [document(n, seed=n) for n in (50, 60)])
    tool = [sys.executable, str(ROOT / "tools" / "build_long_context_data.py")]
    out = tmp_path / "long"
    proc = subprocess.run([*tool, "--input", str(tmp_path / "books"), str(tmp_path / "web"),
                           "--output-dir", str(out), "--json", "--quiet"],
                          capture_output=True, text=True, env=worker_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {r["source"]: r for r in json.loads(proc.stdout)}
    assert (rows["books"]["kept_documents"], rows["books"]["kept_tokens"]) == (2, 9001 + 17001)
    assert rows["web"]["kept_documents"] == 0 and rows["web"]["output_prefix"] is None
    assert (out / "books.meta.json").is_file() and not (out / "web.bin").exists()

    bad = subprocess.run([*tool, "--input", str(tmp_path / "missing"), "--output-dir", str(out)],
                         capture_output=True, text=True, env=worker_env(), timeout=300)
    assert bad.returncode == 2 and "missing" in bad.stderr and "preprocess_data.py" in bad.stderr


# ---------------------------------------------------------------------------------------------
# The 30/70 mixture of examples/


def test_the_midtraining_mixture_blends_30_70(tmp_path):
    """examples/phi4_midtrain_mixture.yaml over small real datasets: 10,000 samples follow
    30% long context and 70% recall, recall split like the pre-training mixture."""
    from megaphi.data.datasets import build_gpt_datasets
    from megaphi.data.long_context import select_long_documents
    from megaphi.data.mixture import load_mixture
    from megaphi.data.tokenizer import Phi4Tokenizer

    for name in ("phi4_midtrain_mixture.yaml", "phi4_pretrain_mixture.yaml"):
        shutil.copy(ROOT / "examples" / name, tmp_path / name)
    (tmp_path / "data" / "sample").mkdir(parents=True)
    for i, source in enumerate(["web", "web_rewrites", "synthetic", "code", "acquired"]):
        write_dataset(tmp_path / "data" / "sample" / source,
                      [document(n, seed=10 * i + j) for j, n in enumerate([300, 9000, 500, 17000])])
        select_long_documents(str(tmp_path / "data" / "sample" / source),
                              str(tmp_path / "data" / "long" / source), upweight_factor=2)

    mixture = load_mixture(str(tmp_path / "phi4_midtrain_mixture.yaml"))
    shares = mixture.source_shares()
    assert shares["long_context"] == pytest.approx(0.30)
    assert shares["recall/synthetic"] == pytest.approx(0.70 * 0.40)
    train, _, _ = build_gpt_datasets(mixture, Phi4Tokenizer(), seq_length=256, seed=1234,
                                     samples=[10_000, 0, 0], cache_dir=str(tmp_path / "cache"),
                                     model_vocab_size=100352)
    source_of = mixture.dataset_sources("train")
    counts = {}
    for i in range(10_000):
        name = source_of[int(train[i]["dataset_id"])]
        counts[name] = counts.get(name, 0) + 1
    long_share = counts["long_context"] / 10_000
    assert abs(long_share - 0.30) <= 0.01, counts
    assert abs(sum(v for k, v in counts.items() if k.startswith("recall/")) / 10_000 - 0.70) <= 0.01
    for name, share in shares.items():
        assert abs(counts.get(name, 0) / 10_000 - share) <= 0.01, (name, counts)
