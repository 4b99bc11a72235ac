"""Config: presets hold the exact Phi-4 numbers; bad values fail once, naming field and fix."""

import dataclasses

import pytest
import yaml

from megaphi.config import ConfigError, ParallelConfig, list_presets, load_config, to_yaml
from megaphi.platform import check_layout


def test_phi4_preset_has_the_report_numbers():
    cfg = load_config("phi4-14b")
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size) == (40, 5120, 17920)
    assert (m.num_attention_heads, m.num_kv_heads, m.kv_channels) == (40, 10, 128)
    assert (m.vocab_size, m.seq_length, m.rotary_base, m.norm_eps) == (100352, 4096, 10000.0, 1e-5)
    assert m.tie_embeddings is False
    assert cfg.train.global_batch_size == 5760
    o = cfg.optimizer
    assert (o.lr, o.weight_decay, o.adam_beta1, o.adam_beta2, o.adam_eps, o.clip_grad) == (
        3e-4, 0.1, 0.9, 0.95, 1e-8, 1.0)
    assert cfg.schedule.style == "linear"


def test_tiny_preset_keeps_the_phi4_shape():
    m = load_config("tiny").model
    assert m.num_attention_heads == 4 * m.num_kv_heads  # the same 4:1 GQA ratio
    assert m.vocab_size == 100352  # the real tokenizer works
    assert m.num_layers <= 4 and m.hidden_size <= 256


BAD = [
    # (preset, overrides, field named, words the message must contain)
    ("phi4-14b", ["parallel.tp=3"], "parallel.tp", "40 attention heads"),
    ("phi4-14b", ["parallel.tp=4"], "parallel.tp", "[1, 2, 5, 10]"),
    ("phi4-14b", ["parallel.tp=8"], "parallel.tp", "[1, 2, 5, 10]"),
    ("phi4-14b", ["parallel.tp=5"], "model.vocab_size", "100480"),
    ("phi4-14b", ["parallel.pp=3"], "parallel.pp", "40 layers"),
    ("phi4-14b", ["parallel.pp=4", "parallel.vpp=3"], "parallel.pp", "vpp=3"),
    ("phi4-14b", ["parallel.tp=1", "parallel.sequence_parallel=true"],
     "parallel.sequence_parallel", "tp=1"),
    ("tiny", ["parallel.tp=2", "parallel.sequence_parallel=true", "model.seq_length=255"],
     "model.seq_length", "multiple of 2"),
    ("tiny", ["train.itres=3"], "train.itres", "did you mean 'iters'"),
    ("tiny", ["trian.iters=3"], "trian", "did you mean 'train'"),
    ("tiny", ["parallel.tp=two"], "parallel.tp", "expected an integer"),
    ("tiny", ["optimizer.lr=fast"], "optimizer.lr", "expected a number"),
    ("tiny", ["parallel.sequence_parallel=3"], "parallel.sequence_parallel", "true or false"),
    ("tiny", ["schedule.style=exp"], "schedule.style", "'linear', 'cosine', 'wsd'"),
    ("tiny", ["precision.fp8.recipe=delayed", "precision.dtype=fp32"], "precision.fp8.recipe",
     "bf16"),
    ("tiny", ["train.global_batch_size=6", "train.micro_batch_size=4"], "train.global_batch_size",
     "multiple"),
    ("tiny", ["train.iters=20", "schedule.warmup_iters=20"], "schedule.warmup_iters", "warm-up"),
    ("tiny", ["train.iters=20", "schedule.style=wsd", "schedule.warmup_iters=10",
              "schedule.decay_iters=15"], "schedule.decay_iters", "exceed"),
]


@pytest.mark.parametrize("preset,overrides,field,words", BAD)
def test_bad_values_name_the_field_and_the_fix(preset, overrides, field, words):
    with pytest.raises(ConfigError) as info:
        load_config(preset, overrides=overrides)
    assert info.value.field_name == field
    assert words in str(info.value)
    assert "Fix:" in str(info.value)


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'phi4-14b'"):
        load_config("phi4")
    assert {"phi4-14b", "tiny"} <= set(list_presets())


def test_cp_is_refused_on_cpu_with_the_fix():
    with pytest.raises(ConfigError) as info:
        check_layout(ParallelConfig(cp=2), world_size=2, device="cpu")
    assert info.value.field_name == "parallel.cp" and "parallel.cp=1" in str(info.value)
    assert check_layout(ParallelConfig(cp=2), world_size=4, device="cuda") == 2


def test_world_size_must_hold_whole_model_replicas():
    assert check_layout(ParallelConfig(tp=2, pp=2), world_size=8, device="cpu") == 2
    with pytest.raises(ConfigError, match="not a multiple of tp\\*pp\\*cp"):
        check_layout(ParallelConfig(tp=2, pp=2), world_size=6, device="cpu")


def test_yaml_file_starts_from_a_preset_and_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: phi4-14b\nparallel:\n  pp: 8\noptimizer:\n  lr: 3e-5\n")
    cfg = load_config(config_file=str(path), overrides=["train.iters=7", "parallel.pp=2"])
    assert cfg.parallel.pp == 2 and cfg.parallel.tp == 2  # override > file > preset
    assert cfg.optimizer.lr == 3e-5  # YAML reads "3e-5" as a string; the float field accepts it
    assert cfg.train.iters == 7 and cfg.model.hidden_size == 5120


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config("phi4-14b", overrides=["precision.fp8.recipe=current"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(config_file=str(path)) == cfg
    assert yaml.safe_load(path.read_text())["model"]["num_kv_heads"] == 10


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config_file=str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(config_file=str(bad))


def test_configs_are_frozen_and_replace_revalidates():
    cfg = load_config("phi4-14b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.parallel.tp = 4
    with pytest.raises(ConfigError, match="parallel.tp"):
        dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, tp=4))


def test_fp8_recipes_map_onto_megatron_fields():
    fp8 = load_config("phi4-14b", overrides=["precision.fp8.recipe=current"]).precision.fp8
    assert fp8.megatron_fields()["fp8_recipe"] == "tensorwise"
    assert fp8.megatron_fields()["fp8"] == "hybrid"
    delayed = load_config("phi4-14b", overrides=["precision.fp8.recipe=delayed",
                                                 "precision.fp8.format=e4m3"]).precision.fp8
    assert delayed.megatron_fields() == {
        "fp8": "e4m3", "fp8_recipe": "delayed", "fp8_margin": 0,
        "fp8_amax_history_len": 1024, "fp8_amax_compute_algo": "max"}
    assert load_config("phi4-14b").precision.fp8.megatron_fields() == {}
