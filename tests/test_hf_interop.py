"""Hugging Face interop: import and export of Phi3ForCausalLM checkpoints against transformers.

The reference is a tiny random ``transformers.Phi3ForCausalLM`` with GQA (8 query / 2 KV heads),
built and saved locally as several safetensors shards; megaphi's logits must equal transformers'
within 1e-4 in fp32 after an import (at TP=1, TP=2 and PP=2, and loaded at another layout),
after a TP=2 training run is exported, and a round trip must reproduce every tensor bit for bit.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed import megaphi_train, run_worker, worker_env
from hf_models import EOS, build_hf_model, hf_tensors, load_hf, max_abs_diff, token_batch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "data" / "sample"
ATOL = 1e-4
TINY_MATCHING = ["model.rotary_base=25000", "model.norm_eps=1e-6"]  # the fixture's HF config


def convert(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=worker_env(),
                          cwd=ROOT)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = build_hf_model(tmp_path_factory.mktemp("hf") / "phi3")
    assert len(list(path.glob("model-*.safetensors"))) >= 3
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.fixture(scope="module")
def reference(hf_dir):
    """transformers' logits for a fixed batch of token ids."""
    tokens = token_batch()
    with torch.no_grad():
        return tokens, load_hf(hf_dir)(tokens).logits


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    """The command-line import at TP=1 (model taken from config.json)."""
    out = tmp_path_factory.mktemp("imported") / "ckpt"
    proc = convert("import", "--hf-dir", str(hf_dir), "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def megaphi_logits(ckpt, tokens, dtype=None):
    from megaphi.inference import InferenceModel

    with InferenceModel.from_checkpoint(ckpt, dtype=dtype) as model:
        return model.logits(tokens)


def test_import_logits_match_transformers(imported, reference):
    tokens, want = reference
    assert (imported / "latest").read_text().strip() == "iter_0000000"
    meta = json.loads((imported / "iter_0000000" / "megaphi.json").read_text())
    assert meta["layout"] == {"tp": 1, "pp": 1, "vpp": None, "dp": 1}
    model = meta["config"]["model"]
    assert (model["num_kv_heads"], model["rotary_base"], model["norm_eps"]) == (2, 25000.0, 1e-6)
    got = megaphi_logits(imported, tokens)
    assert got.shape == want.shape
    assert max_abs_diff(got, want) <= ATOL, max_abs_diff(got, want)
    assert want.abs().max() > 1.0  # O(1) logits: a wrong layout could not hide under the tolerance


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_import_and_load_at_tp2_and_pp2(hf_dir, imported, reference, tmp_path, tp, pp):
    """Imported by tp*pp processes, each filling its shards, the checkpoint gives transformers'
    logits in one process; and the TP=1 import, loaded at this layout as training loads a
    checkpoint, gives them through the parallel model (forward pass of the pipeline schedule)."""
    tokens, want = reference
    torch.save(tokens, tmp_path / "tokens.pt")
    new = tmp_path / "ckpt"
    got = run_worker("hf_layout_worker.py", tp * pp, tmp_path / "out.pt",
                     [hf_dir, imported, new, tmp_path / "tokens.pt", "--tp", tp, "--pp", pp])
    assert max_abs_diff(got["logits"], want) <= ATOL
    meta = json.loads((new / "iter_0000000" / "megaphi.json").read_text())
    assert (meta["layout"]["tp"], meta["layout"]["pp"]) == (tp, pp)
    assert max_abs_diff(megaphi_logits(new, tokens), want) <= ATOL


def test_roundtrip_is_bit_identical(hf_dir, imported, tmp_path):
    from megaphi.hf.convert import export_hf_checkpoint

    out = export_hf_checkpoint(str(imported), str(tmp_path / "hf"), max_shard_size="20MB")
    original, exported = hf_tensors(hf_dir), hf_tensors(out)
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    theirs = json.loads((hf_dir / "config.json").read_text())
    ours = json.loads((out / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                "tie_word_embeddings", "max_position_embeddings", "bos_token_id", "eos_token_id",
                "pad_token_id"):
        assert ours[key] == theirs[key], key
    assert ours["rope_theta"] == theirs["rope_parameters"]["rope_theta"] == 25000.0


@pytest.fixture(scope="module")
def bf16_import(tmp_path_factory):
    """A bfloat16 checkpoint (as Phi-4 ships) of the tiny preset's shape, 2 layers, imported."""
    from megaphi.hf.convert import import_hf_checkpoint

    tmp = tmp_path_factory.mktemp("bf16")
    src = build_hf_model(tmp / "hf", num_layers=2, dtype=torch.bfloat16, seed=3)
    return src, import_hf_checkpoint(str(src), str(tmp / "ckpt"))


def test_bf16_roundtrip_is_bit_identical(bf16_import, tmp_path):
    from megaphi.hf.convert import export_hf_checkpoint

    src, ckpt = bf16_import
    meta = json.loads((ckpt / "iter_0000000" / "megaphi.json").read_text())
    assert meta["config"]["precision"]["dtype"] == "bf16"
    out = export_hf_checkpoint(str(ckpt), str(tmp_path / "out"), max_shard_size="20MB")
    original, exported = hf_tensors(src), hf_tensors(out)
    assert exported.keys() == original.keys()
    assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], v)
               for k, v in original.items())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tokens = token_batch(1, 16)
    with torch.no_grad():
        want = load_hf(src)(tokens).logits  # bf16 weights computed in fp32
    assert max_abs_diff(megaphi_logits(ckpt, tokens, dtype="fp32"), want) <= ATOL


@pytest.fixture(scope="module")
def code_mixture(tmp_path_factory):
    """A one-source mixture of the sample corpus' code, preprocessed with the real pipeline."""
    from megaphi.data.preprocess import preprocess
    from megaphi.data.tokenizer import Phi4Tokenizer

    tmp = tmp_path_factory.mktemp("data")
    preprocess([str(SAMPLE / "code.jsonl")], str(tmp / "code"), Phi4Tokenizer(), workers=1)
    (tmp / "mix.yaml").write_text("train:\n  code: {weight: 1.0, prefixes: [code]}\n")
    return tmp / "mix.yaml"


def train(nproc, *overrides):
    proc = megaphi_train(nproc, "model.seq_length=64", "train.micro_batch_size=2",
                         "train.global_batch_size=4", "schedule.warmup_iters=0",
                         "data.num_workers=0", "logging.tensorboard=false", *overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_training_from_a_bf16_import_starts_from_its_weights(bf16_import, code_mixture,
                                                             tmp_path):
    """megaphi-train checkpoint.load=<import> in bf16, one step at a negligible LR: the weights
    it saves are still the Hugging Face weights."""
    from megaphi.hf.convert import export_hf_checkpoint

    src, ckpt = bf16_import
    run_dir = tmp_path / "run"
    train(1, *TINY_MATCHING, "model.num_layers=2", "precision.dtype=bf16",
          f"checkpoint.load={ckpt}", f"data.mixture={code_mixture}", f"train.run_dir={run_dir}",
          "train.iters=1", "optimizer.lr=1e-9", "optimizer.min_lr=0", "model.seq_length=16",
          "train.micro_batch_size=1", "train.global_batch_size=1")  # bf16 is slow on a CPU
    out = export_hf_checkpoint(str(run_dir), str(tmp_path / "hf"))
    original, trained_ = hf_tensors(src), hf_tensors(out)
    worst = max(max_abs_diff(trained_[k], v) for k, v in original.items())
    assert worst < 1e-3, f"weights moved by {worst} in one step at lr 1e-9"


@pytest.fixture(scope="module")
def trained(code_mixture, tmp_path_factory):
    """The tiny preset trained 3 steps with megaphi-train at TP=2 on the sample corpus."""
    run_dir = tmp_path_factory.mktemp("train") / "run"
    train(2, "parallel.tp=2", f"data.mixture={code_mixture}", f"train.run_dir={run_dir}",
          "train.iters=3", "optimizer.lr=1e-2")
    return run_dir


@pytest.mark.distributed
def test_export_of_tp2_training_matches_transformers(trained, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = trained / "checkpoints" / "iter_0000003"
    meta = json.loads((ckpt / "megaphi.json").read_text())
    assert meta["layout"]["tp"] == 2 and meta["iteration"] == 3
    out = tmp_path / "hf"
    proc = convert("export", "--ckpt", str(trained), "--out", str(out), "--max-shard-size", "20MB",
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not list(tmp_path.glob(".*incomplete"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((out / s).is_file() for s in shards)
    assert len(index["weight_map"]) == 2 + 4 * 6 + 1  # embedding, 4 layers, norm, lm_head
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Phi3ForCausalLM"] and config["torch_dtype"] == "float32"
    assert (config["rope_theta"], config["max_position_embeddings"]) == (10000.0, 64)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        100257, EOS, 100349)
    assert config["tie_word_embeddings"] is False and config["num_key_value_heads"] == 2
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == EOS

    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokens = token_batch(length=32)
    with torch.no_grad():
        want = hf(tokens).logits
    got = megaphi_logits(trained, tokens)
    assert max_abs_diff(got, want) <= ATOL, max_abs_diff(got, want)

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.encode("<|im_start|>Hello<|im_sep|> World<|im_end|><|dummy_85|>") == [
        100264, 9906, 100266, 4435, 100265, 100349]
    chat = tok.apply_chat_template([{"role": "system", "content": "S"},
                                    {"role": "user", "content": "Q"}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat == ("<|im_start|>system<|im_sep|>S<|im_end|><|im_start|>user<|im_sep|>Q"
                    "<|im_end|><|im_start|>assistant<|im_sep|>")


def test_exported_tokenizer_encodes_like_phi4_tokenizer(tmp_path):
    """tokenizer.json built offline from cl100k_base gives Phi4Tokenizer's ids on the whole
    sample corpus (815K tokens) and round-trips the text."""
    from transformers import AutoTokenizer

    from megaphi.data.tokenizer import Phi4Tokenizer
    from megaphi.hf.tokenizer import write_phi4_tokenizer

    write_phi4_tokenizer(tmp_path, model_max_length=16384)
    hf, ours = AutoTokenizer.from_pretrained(tmp_path), Phi4Tokenizer()
    texts = [json.loads(line)["text"] for path in sorted(SAMPLE.glob("*.jsonl"))
             for line in path.read_text().splitlines() if line.strip()]
    texts += ["trailing  ", "\n\n  \n", "x 12345 3.14159 1990s", "héllo 中文 🤖", "I'LL we've"]
    assert len(texts) > 300
    for text in texts:
        ids = ours.encode(text)
        assert hf.encode(text) == ids, text[:80]
        assert hf.decode(ids) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, len(hf)) == (
        100257, EOS, 100349, 100352)


# --------------------------------------------------------------------------------------------
# Refusals and failure modes
# --------------------------------------------------------------------------------------------


def test_mismatched_kv_heads_is_refused_naming_the_field(hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    proc = convert("import", "--hf-dir", str(hf_dir), "--out", str(out), "--preset", "tiny",
                   *TINY_MATCHING, "model.num_kv_heads=4")
    assert proc.returncode == 2
    assert "model.num_kv_heads" in proc.stderr and "num_key_value_heads=2" in proc.stderr
    assert "Fix:" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".*"))  # refused before any work


def test_matching_preset_is_accepted_and_recorded(hf_dir, tmp_path):
    from megaphi.config import load_config
    from megaphi.hf.convert import plan_import

    _, cfg = plan_import(str(hf_dir), load_config("tiny", overrides=TINY_MATCHING), tp=2)
    assert cfg.train.global_batch_size == 8 and cfg.parallel.tp == 2  # the preset's run config


@pytest.mark.parametrize("change,field", [
    ({"num_key_value_heads": 8}, "model.num_kv_heads"),
    ({"rope_theta": 250000.0, "rope_parameters": None}, "model.rotary_base"),
    ({"vocab_size": 100480}, "model.vocab_size"),
    ({"tie_word_embeddings": True}, "model.tie_embeddings"),
    ({"num_hidden_layers": 40}, "model.num_layers"),
])
def test_config_mismatches_name_the_field(hf_dir, change, field):
    from megaphi.config import ConfigError, load_config
    from megaphi.hf.mapping import check_hf_against_model

    config = {**json.loads((hf_dir / "config.json").read_text()), **change}
    with pytest.raises(ConfigError) as err:
        check_hf_against_model(config, load_config("tiny", overrides=TINY_MATCHING).model)
    assert err.value.field_name == field
    assert next(iter(change)) in str(err.value)


def test_rope_scaling_is_refused_both_ways(hf_dir):
    """transformers' Phi3 has no linear/YaRN RoPE scaling: importing into such a target and
    exporting such a model are refused, naming model.rope_scaling."""
    from megaphi.config import ConfigError, load_config
    from megaphi.hf.mapping import check_hf_against_model, hf_config_from_model

    scaled = load_config("tiny", overrides=[*TINY_MATCHING, "model.rope_scaling=linear",
                                            "model.rope_scaling_factor=4.0"]).model
    config = json.loads((hf_dir / "config.json").read_text())
    with pytest.raises(ConfigError) as err:
        check_hf_against_model(config, scaled)
    assert err.value.field_name == "model.rope_scaling"
    with pytest.raises(ConfigError, match="model.rope_scaling"):
        hf_config_from_model(scaled, "float32")


@pytest.mark.parametrize("change,key", [
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
     "rope_scaling"),
    ({"sliding_window": 128}, "sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "architectures"),
])
def test_unsupported_hf_features_are_refused(hf_dir, change, key):
    from megaphi.config import ConfigError
    from megaphi.hf.mapping import model_fields_from_hf

    config = {**json.loads((hf_dir / "config.json").read_text()), **change}
    with pytest.raises(ConfigError, match=key):
        model_fields_from_hf(config)


def test_bad_directories_are_one_clear_error(hf_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = convert("import", "--hf-dir", str(empty), "--out", str(tmp_path / "a"))
    assert proc.returncode == 2 and "config.json does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr

    broken = tmp_path / "broken"  # one tensor dropped from the index
    shutil.copytree(hf_dir, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.self_attn.qkv_proj.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    from megaphi.hf.convert import ConversionError, plan_import

    with pytest.raises(ConversionError, match="model.layers.2.self_attn.qkv_proj.weight"):
        plan_import(str(broken))
    (broken / "model.safetensors.index.json").unlink()
    with pytest.raises(ConversionError, match="neither model.safetensors.index.json"):
        plan_import(str(broken))

    proc = convert("export", "--ckpt", str(hf_dir), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "not a megaphi checkpoint" in proc.stderr


def test_existing_output_is_refused(imported, tmp_path):
    from megaphi.hf.convert import ConversionError, export_hf_checkpoint

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="already exists and is not empty"):
        export_hf_checkpoint(str(imported), str(taken))
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]


def test_interrupted_import_leaves_no_complete_looking_output(hf_dir, tmp_path):
    """SIGKILL mid-import: only the hidden .incomplete directory exists, nothing named like the
    output; a rerun replaces the leftover and completes."""
    out = tmp_path / "ckpt"
    partial = tmp_path / ".ckpt.incomplete"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"),
                             "import", "--hf-dir", str(hf_dir), "--out", str(out)],
                            env=worker_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not (partial / "iter_0000000").is_dir():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the converter and its checkpoint-writer processes
    proc.wait()
    assert not out.exists() and partial.is_dir()
    from megaphi.hf.convert import import_hf_checkpoint

    import_hf_checkpoint(str(hf_dir), str(out))
    assert not partial.exists() and (out / "latest").is_file()


# --------------------------------------------------------------------------------------------
# The mapping itself
# --------------------------------------------------------------------------------------------


def test_qkv_reorder_groups_query_heads_with_their_kv_head():
    """Rows labelled by (kind, head): Megatron's TP=1 layout is, per KV head g, the query heads
    that share it in transformers' repeat_kv (g*r .. g*r+r-1), then k_g, then v_g."""
    from megaphi.config import ModelConfig
    from megaphi.hf.mapping import qkv_hf_to_megatron, qkv_megatron_to_hf

    model = ModelConfig(num_layers=1, hidden_size=8, ffn_hidden_size=8, num_attention_heads=4,
                        num_kv_heads=2, head_dim=2)
    labels = [(kind, head) for kind, heads in (("q", 4), ("k", 2), ("v", 2))
              for head in range(heads) for _ in range(2)]  # head_dim 2 rows per head
    code = {label: i for i, label in enumerate(dict.fromkeys(labels))}
    hf = torch.tensor([[float(code[label])] for label in labels])
    got = [list(code)[int(x)] for x in qkv_hf_to_megatron(hf, model)[:, 0]]
    want = [("q", 0)] * 2 + [("q", 1)] * 2 + [("k", 0)] * 2 + [("v", 0)] * 2 + \
           [("q", 2)] * 2 + [("q", 3)] * 2 + [("k", 1)] * 2 + [("v", 1)] * 2
    assert got == want
    weight = torch.randn(16, 8)
    assert torch.equal(qkv_megatron_to_hf(qkv_hf_to_megatron(weight, model), model), weight)


def test_every_hf_name_maps_both_ways():
    from megaphi.config import ModelConfig
    from megaphi.hf.mapping import hf_tensor_shapes, hf_to_megatron_name, megatron_to_hf_name

    model = ModelConfig(num_layers=2, hidden_size=8, ffn_hidden_size=8, num_attention_heads=2,
                        num_kv_heads=1)
    names = list(hf_tensor_shapes(model))
    assert len(names) == 2 + 2 * 6 + 1
    assert all(megatron_to_hf_name(hf_to_megatron_name(n)) == n for n in names)
    assert hf_to_megatron_name("model.layers.1.post_attention_layernorm.weight") == \
        "decoder.layers.1.pre_mlp_layernorm.weight"
