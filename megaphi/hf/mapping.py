"""Hugging Face Phi-3/Phi-4 checkpoints <-> megaphi: names, layouts and configs (pure functions).

Tensors. Every Hugging Face tensor maps to exactly one megaphi global parameter (the name in the
TP=1, PP=1 model, see :mod:`megaphi.model.partition`), and back:

- ``model.embed_tokens.weight`` -> ``embedding.word_embeddings.weight``
- ``model.layers.{i}.input_layernorm.weight`` -> ``decoder.layers.{i}.input_layernorm.weight``
- ``model.layers.{i}.self_attn.qkv_proj.weight`` ->
  ``decoder.layers.{i}.self_attention.linear_qkv.weight`` (rows reordered, see below)
- ``model.layers.{i}.self_attn.o_proj.weight`` ->
  ``decoder.layers.{i}.self_attention.linear_proj.weight``
- ``model.layers.{i}.post_attention_layernorm.weight`` ->
  ``decoder.layers.{i}.pre_mlp_layernorm.weight``
- ``model.layers.{i}.mlp.gate_up_proj.weight`` -> ``decoder.layers.{i}.mlp.linear_fc1.weight``
- ``model.layers.{i}.mlp.down_proj.weight`` -> ``decoder.layers.{i}.mlp.linear_fc2.weight``
- ``model.norm.weight`` -> ``decoder.final_layernorm.weight``
- ``lm_head.weight`` (absent when the embeddings are tied) -> ``output_layer.weight``

Only the fused QKV needs its rows reordered. Hugging Face stores ``Q | K | V`` (all query heads,
then all key heads, then all value heads, each head ``head_dim`` rows); Megatron-Core's
``linear_qkv`` groups rows per query group ``g`` (= KV head): ``[q heads of g; k_g; v_g]``, the
``num_attention_heads / num_kv_heads`` query heads of a group being the ones that share its KV
head in Hugging Face's ``repeat_kv``. Both reorders are pure row permutations, so a round trip is
bit-exact. ``gate_up_proj`` is ``[gate; up]`` along the rows, which is exactly Megatron's TP=1
``linear_fc1`` layout (``silu(first half) * second half``), so it is copied as is; tensor-parallel
sharding of it (stride 2) is :func:`megaphi.model.partition.shard`'s job.

Configs. :func:`model_fields_from_hf` reads ``config.json`` into :class:`ModelConfig` fields and
refuses what megaphi's model cannot reproduce (long-RoPE scaling, partial rotary, a sliding window
shorter than the context, another activation); :func:`check_hf_against_model` compares it with a
target model and raises :class:`~megaphi.config.ConfigError` naming the megaphi field and the
Hugging Face key; :func:`hf_config_from_model` writes ``config.json`` for an export.
"""

from __future__ import annotations

import math
import re
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from megaphi.config.schema import ConfigError, ModelConfig

ARCHITECTURE = "Phi3ForCausalLM"
MODEL_TYPE = "phi3"
# Phi-4's token ids (shared/PHI4.md): bos <|endoftext|>, eos <|im_end|>, pad <|dummy_85|>.
PHI4_BOS_ID, PHI4_EOS_ID, PHI4_PAD_ID = 100257, 100265, 100349

# Hugging Face suffix under model.layers.{i}. -> megaphi suffix under decoder.layers.{i}.
_LAYER_TENSORS = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.qkv_proj.weight": "self_attention.linear_qkv.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.gate_up_proj.weight": "mlp.linear_fc1.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
}
_TO_HF_LAYER = {v: k for k, v in _LAYER_TENSORS.items()}
_TO_HF_GLOBAL = {v: k for k, v in _GLOBAL_TENSORS.items()}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MEGATRON_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
QKV_SUFFIX = "self_attention.linear_qkv.weight"
FC1_SUFFIX = "mlp.linear_fc1.weight"

# Buffers some Hugging Face checkpoints carry that are recomputed from the config, not weights.
IGNORED_HF_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def hf_to_megatron_name(hf_name: str) -> str:
    """The megaphi global parameter name of a Hugging Face tensor; ``KeyError`` if unknown."""
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name]
    match = _HF_LAYER.match(hf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"decoder.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}"
    raise KeyError(hf_name)


def megatron_to_hf_name(global_name: str) -> str:
    """The Hugging Face name of a megaphi global parameter; ``KeyError`` if unknown."""
    if global_name in _TO_HF_GLOBAL:
        return _TO_HF_GLOBAL[global_name]
    match = _MEGATRON_LAYER.match(global_name)
    if match and match.group(2) in _TO_HF_LAYER:
        return f"model.layers.{match.group(1)}.{_TO_HF_LAYER[match.group(2)]}"
    raise KeyError(global_name)


def hf_tensor_shapes(model: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every tensor a ``Phi3ForCausalLM`` checkpoint of ``model`` holds, with its shape, in the
    conventional order (embedding, layers, final norm, output layer)."""
    h, d = model.hidden_size, model.kv_channels
    qkv_rows = (model.num_attention_heads + 2 * model.num_kv_heads) * d
    per_layer = {
        "input_layernorm.weight": (h,),
        "self_attn.qkv_proj.weight": (qkv_rows, h),
        "self_attn.o_proj.weight": (h, model.num_attention_heads * d),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_up_proj.weight": (2 * model.ffn_hidden_size, h),
        "mlp.down_proj.weight": (h, model.ffn_hidden_size),
    }
    shapes = {"model.embed_tokens.weight": (model.vocab_size, h)}
    for i in range(model.num_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in per_layer.items()})
    shapes["model.norm.weight"] = (h,)
    if not model.tie_embeddings:
        shapes["lm_head.weight"] = (model.vocab_size, h)
    return shapes


def hf_source_of(global_name: str, model: ModelConfig) -> str:
    """The Hugging Face tensor an import reads for a megaphi parameter. With tied embeddings the
    output layer (which Megatron keeps as a separate copy on the last pipeline stage when
    pp > 1) is filled from the input embedding."""
    if global_name == "output_layer.weight" and model.tie_embeddings:
        return "model.embed_tokens.weight"
    return megatron_to_hf_name(global_name)


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------


def _qkv_dims(model: ModelConfig) -> Tuple[int, int, int]:
    groups = model.num_kv_heads
    return groups, model.num_attention_heads // groups, model.kv_channels


def qkv_hf_to_megatron(weight: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """``[Q | K | V]`` rows (Hugging Face) -> rows grouped per query group (Megatron TP=1).

    ``weight``: ``[(heads + 2 * kv_heads) * head_dim, hidden]``; returns a new tensor of the
    same shape whose group ``g`` is ``[q heads g*r .. g*r+r-1; k_g; v_g]`` with r = heads/kv_heads.
    """
    groups, per_group, d = _qkv_dims(model)
    hidden = weight.shape[-1]
    q, k, v = torch.split(weight, [groups * per_group * d, groups * d, groups * d], dim=0)
    grouped = torch.cat([q.reshape(groups, per_group * d, hidden),
                         k.reshape(groups, d, hidden),
                         v.reshape(groups, d, hidden)], dim=1)  # [groups, (r + 2) * d, hidden]
    return grouped.reshape(-1, hidden)


def qkv_megatron_to_hf(weight: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """The inverse of :func:`qkv_hf_to_megatron`."""
    groups, per_group, d = _qkv_dims(model)
    hidden = weight.shape[-1]
    grouped = weight.reshape(groups, (per_group + 2) * d, hidden)
    q, k, v = torch.split(grouped, [per_group * d, d, d], dim=1)
    return torch.cat([q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)], dim=0)


def hf_to_megatron(global_name: str, hf_tensor: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """The full (TP=1) megaphi tensor of ``global_name`` from its Hugging Face tensor."""
    if global_name.endswith(QKV_SUFFIX):
        return qkv_hf_to_megatron(hf_tensor, model)
    return hf_tensor  # gate_up_proj is already [gate; up]; everything else is 1:1


def megatron_to_hf(global_name: str, full: torch.Tensor,
                   model: ModelConfig) -> Tuple[str, torch.Tensor]:
    """``(hf_name, tensor)`` for a full (TP=1) megaphi parameter."""
    if global_name.endswith(QKV_SUFFIX):
        full = qkv_megatron_to_hf(full, model)
    return megatron_to_hf_name(global_name), full


def export_order(names: List[str]) -> Iterator[str]:
    """Megaphi global names in Hugging Face's conventional tensor order."""
    def key(name: str):
        hf = megatron_to_hf_name(name)
        match = _HF_LAYER.match(hf)
        if hf == "model.embed_tokens.weight":
            return (0, 0, hf)
        if match:
            return (1, int(match.group(1)), hf)
        return (2, 0 if hf == "model.norm.weight" else 1, hf)

    return iter(sorted(names, key=key))


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------


def _rope(hf: dict) -> dict:
    """RoPE settings in either the legacy (``rope_theta``, ``rope_scaling``) or the
    transformers 5 (``rope_parameters``) spelling."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type") or "default"
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return {"theta": float(theta), "type": kind, "partial": float(partial)}


def _refuse_unsupported(hf: dict, source: str) -> None:
    """Raise for ``config.json`` features megaphi's model does not implement."""
    archs = hf.get("architectures") or []
    if hf.get("model_type") != MODEL_TYPE or (archs and ARCHITECTURE not in archs):
        raise ConfigError(f"{source}: architectures",
                          f"is {archs or hf.get('model_type')!r}, not a Phi-3/Phi-4 "
                          f"{ARCHITECTURE} (model_type '{MODEL_TYPE}')",
                          "convert a Phi3ForCausalLM checkpoint such as microsoft/phi-4")
    rope = _rope(hf)
    if rope["type"] != "default":
        raise ConfigError(f"{source}: rope_scaling",
                          f"uses '{rope['type']}' RoPE scaling; megaphi implements plain RoPE "
                          "with a base (Phi-4's rope_scaling is null)",
                          "import a checkpoint without RoPE scaling")
    if rope["partial"] != 1.0:
        raise ConfigError(f"{source}: partial_rotary_factor",
                          f"is {rope['partial']}; megaphi rotates the full head dimension",
                          "import a checkpoint with full rotary embeddings")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act", f"is '{act}'; megaphi's MLP is SwiGLU (silu)",
                          "import a checkpoint whose hidden_act is silu")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ConfigError(f"{source}: {key}", "is true; megaphi's layers have no biases",
                              "import a checkpoint without biases")
    window, context = hf.get("sliding_window"), hf.get("max_position_embeddings", 4096)
    if window is not None and window < context:
        raise ConfigError(f"{source}: sliding_window",
                          f"limits attention to {window} tokens of the {context}-token context; "
                          "megaphi's attention is full causal",
                          "import a checkpoint with sliding_window null (as Phi-4's)")


def model_fields_from_hf(hf: dict, source: str = "config.json") -> dict:
    """:class:`ModelConfig` fields described by a Hugging Face ``config.json`` dict.

    ``seq_length`` is ``max_position_embeddings`` and ``init_std`` is ``initializer_range``;
    neither affects the weights. Raises :class:`ConfigError` for unsupported features."""
    _refuse_unsupported(hf, source)
    try:
        heads = int(hf["num_attention_heads"])
        fields = {
            "num_layers": int(hf["num_hidden_layers"]),
            "hidden_size": int(hf["hidden_size"]),
            "ffn_hidden_size": int(hf["intermediate_size"]),
            "num_attention_heads": heads,
            "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
            "vocab_size": int(hf["vocab_size"]),
            "seq_length": int(hf.get("max_position_embeddings", 4096)),
            "rotary_base": _rope(hf)["theta"],
            "norm_eps": float(hf.get("rms_norm_eps", 1e-5)),
            "init_std": float(hf.get("initializer_range", 0.02)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        }
    except KeyError as exc:
        raise ConfigError(f"{source}: {exc.args[0]}", "is missing",
                          "use the config.json saved with the checkpoint") from None
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != fields["hidden_size"]:
        fields["head_dim"] = int(head_dim)
    return fields


# (Hugging Face key, megaphi ModelConfig field) pairs that must agree for the weights to fit and
# the model to compute the same function.
_CHECKED = (
    ("vocab_size", "vocab_size"), ("hidden_size", "hidden_size"),
    ("num_hidden_layers", "num_layers"), ("intermediate_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads"), ("num_key_value_heads", "num_kv_heads"),
    ("head_dim", "kv_channels"), ("rope_theta", "rotary_base"), ("rms_norm_eps", "norm_eps"),
    ("tie_word_embeddings", "tie_embeddings"), ("rope_scaling", "rope_scaling"),
)


def _differs(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return not math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a != b


def check_hf_against_model(hf: dict, model: ModelConfig, source: str = "config.json") -> None:
    """Refuse a Hugging Face config whose architecture differs from the target ``model``.

    Raises one :class:`ConfigError` naming the first differing megaphi field (``model.X``) and
    listing every difference with its Hugging Face key and the overrides that would match."""
    theirs = ModelConfig(**model_fields_from_hf(hf, source))
    diffs = []
    for hf_key, field in _CHECKED:
        want, have = getattr(theirs, field), getattr(model, field)
        if _differs(want, have):
            target = "head_dim" if field == "kv_channels" else field
            diffs.append((hf_key, target, want, have))
    if not diffs:
        return
    described = "; ".join(f"{source} has {k}={w!r} but the target model has model.{f}={h!r}"
                          for k, f, w, h in diffs)
    overrides = " ".join(f"model.{f}={str(w).lower() if isinstance(w, bool) else w}"
                         for _, f, w, _ in diffs)
    raise ConfigError(f"model.{diffs[0][1]}", described,
                      f"import into a matching model (override {overrides}), or give no "
                      "--preset/--config to take the whole model from config.json")


def hf_config_from_model(model: ModelConfig, torch_dtype: str,
                         token_ids: Optional[Dict[str, int]] = None) -> dict:
    """``config.json`` of a ``Phi3ForCausalLM`` equal to ``model`` (as microsoft/phi-4 writes it).

    Args:
        model: the megaphi model.
        torch_dtype: ``"float32"`` or ``"bfloat16"``, the dtype of the exported tensors.
        token_ids: ``bos``/``eos``/``pad`` ids (default: Phi-4's).
    Raises:
        ConfigError: for a model transformers' Phi3 cannot express (RoPE scaling).
    """
    if model.rope_scaling != "none":
        raise ConfigError("model.rope_scaling",
                          f"the model uses {model.rope_scaling} RoPE scaling, which transformers' "
                          "Phi3ForCausalLM does not implement (it has plain and longrope RoPE)",
                          "export a model trained with model.rope_scaling=none (Phi-4 extends its "
                          "context by raising model.rotary_base instead)")
    ids = {"bos": PHI4_BOS_ID, "eos": PHI4_EOS_ID, "pad": PHI4_PAD_ID, **(token_ids or {})}
    config = {
        "architectures": [ARCHITECTURE],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["bos"],
        "embd_pdrop": 0.0,
        "eos_token_id": ids["eos"],
        "hidden_act": "silu",
        "hidden_size": model.hidden_size,
        "initializer_range": model.init_std,
        "intermediate_size": model.ffn_hidden_size,
        "max_position_embeddings": model.seq_length,
        "model_type": MODEL_TYPE,
        "num_attention_heads": model.num_attention_heads,
        "num_hidden_layers": model.num_layers,
        "num_key_value_heads": model.num_kv_heads,
        "original_max_position_embeddings": model.seq_length,
        "pad_token_id": ids["pad"],
        "resid_pdrop": 0.0,
        "rms_norm_eps": model.norm_eps,
        "rope_scaling": None,
        "rope_theta": model.rotary_base,
        "sliding_window": None,
        "tie_word_embeddings": model.tie_embeddings,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "vocab_size": model.vocab_size,
    }
    if model.kv_channels * model.num_attention_heads != model.hidden_size:
        config["head_dim"] = model.kv_channels  # transformers >= 4.48 reads it
    return config


def generation_config(token_ids: Optional[Dict[str, int]] = None) -> dict:
    """``generation_config.json`` as microsoft/phi-4 ships it (greedy unless asked otherwise)."""
    ids = {"bos": PHI4_BOS_ID, "eos": PHI4_EOS_ID, "pad": PHI4_PAD_ID, **(token_ids or {})}
    return {"_from_model_config": True, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
            "pad_token_id": ids["pad"]}
