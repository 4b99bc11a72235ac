"""Start a new run from another run's checkpoint (``checkpoint.load``): mid-training from
pre-training, fine-tuning from either.

The new run's config decides everything about the model that may change between phases: RoPE
base and rescaling, sequence length, learning rate and schedule, data. The checkpoint's own
config (in its ``megaphi.json``) is only read to check that the architecture matches and to
report what changes, e.g. ``rotary base 10000 -> 250000, sequence length 4096 -> 16384``; it is
never applied (Megatron-LM's ``--use-checkpoint-args`` re-applies a checkpoint's RoPE base and
silently undoes a mid-training change). Weights are loaded at any layout; the optimizer state
only on request (``checkpoint.load_optimizer``); the schedule, step count and data position
always start at 0.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

from megaphi.config.schema import ConfigError, MegaphiConfig

logger = logging.getLogger("megaphi.train")

# Must be equal for the weights to fit (model.<field>).
ARCHITECTURE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_kv_heads", "kv_channels", "vocab_size", "tie_embeddings")

# What a phase change may change, in the order it is reported: (section, field, label).
REPORTED = (
    ("model", "rotary_base", "rotary base"),
    ("model", "rope_scaling", "RoPE scaling"),
    ("model", "rope_scaling_factor", "RoPE scaling factor"),
    ("model", "seq_length", "sequence length"),
    ("optimizer", "lr", "peak LR"),
    ("optimizer", "min_lr", "final LR"),
    ("schedule", "style", "LR schedule"),
    ("schedule", "warmup_iters", "warm-up steps"),
    ("train", "global_batch_size", "global batch"),
    ("data", "mixture", "data mixture"),
    ("phase", "name", "phase"),
)


def resolve_start(path: str, field: str = "checkpoint.load") -> Path:
    """The ``iter_*`` directory a checkpoint setting names (see
    :func:`megaphi.training.checkpoint.resolve_checkpoint`), or a ConfigError naming the
    setting ``field`` (``checkpoint.load``, ``dpo.reference``, ``--reference``)."""
    from megaphi.training.checkpoint import CheckpointNotFound, resolve_checkpoint

    try:
        return resolve_checkpoint(path)
    except CheckpointNotFound as exc:
        raise ConfigError(field, str(exc).split("; ")[0],
                          "point it at a run directory, its checkpoints/ directory or an iter_* "
                          "directory of a finished save") from None


def checkpoint_config(path: Path) -> dict:
    """The resolved config a checkpoint was saved with (``megaphi.json``), as a nested dict."""
    from megaphi.training.checkpoint import read_meta

    return read_meta(path)["config"]


def _kv_channels(model: dict) -> int:
    return model.get("head_dim") or model["hidden_size"] // model["num_attention_heads"]


def check_architecture(saved: dict, cfg: MegaphiConfig, path: Path) -> None:
    """Refuse a checkpoint whose weights cannot fit this run's model, naming the field."""
    old = {**saved["model"], "kv_channels": _kv_channels(saved["model"])}
    for name in ARCHITECTURE:
        new = getattr(cfg.model, name)
        if old.get(name) != new:
            field = "model.head_dim" if name == "kv_channels" else f"model.{name}"
            raise ConfigError(field, f"the checkpoint {path} has {name}={old.get(name)}, this "
                              f"run {new}", f"set {field}={old.get(name)} to continue that model")


def describe_changes(saved: dict, cfg: MegaphiConfig) -> List[str]:
    """``"rotary base 10000 -> 250000"``-style lines for every reported setting that differs."""
    lines = []
    for section, name, label in REPORTED:
        old = saved.get(section, {}).get(name)
        new = getattr(getattr(cfg, section), name)
        if old != new:
            lines.append(f"{label} {_fmt(old)} -> {_fmt(new)}")
    return lines


def _fmt(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def report_warm_start(path: Path, saved: dict, cfg: MegaphiConfig) -> None:
    """Log what the new run changes relative to the checkpoint, and RoPE pitfalls."""
    changes = describe_changes(saved, cfg)
    logger.info("initialising from %s (%s phase): %s", path, saved.get("phase", {}).get("name"),
                ", ".join(changes) if changes else "no setting changes")
    m_old, m = saved["model"], cfg.model
    logger.info("RoPE: this run uses rotary base %s (model.rotary_base, scaling %s); the "
                "checkpoint was trained with base %s, which is reported, not applied",
                _fmt(m.rotary_base), m.rope_scaling, _fmt(m_old["rotary_base"]))
    same_rope = (m_old["rotary_base"] == m.rotary_base
                 and m_old.get("rope_scaling", "none") == m.rope_scaling)
    if m.seq_length > m_old["seq_length"] and same_rope:
        logger.warning("the sequence length grows %d -> %d with the checkpoint's RoPE unchanged; "
                       "Phi-4 raises model.rotary_base (10000 -> 250000) for this",
                       m_old["seq_length"], m.seq_length)


def prepare_warm_start(cfg: MegaphiConfig) -> Optional[Path]:
    """Resolve and check ``checkpoint.load`` before anything expensive; None when unset."""
    if cfg.checkpoint.load is None:
        return None
    path = resolve_start(cfg.checkpoint.load)
    check_architecture(checkpoint_config(path), cfg, path)
    return path


def warm_start(path: Path, cfg: MegaphiConfig, chunks, optimizer, scheduler, layout: dict) -> None:
    """Load ``path``'s weights (and optimizer state when ``checkpoint.load_optimizer``) into
    this run's model; the schedule keeps its fresh state at step 0."""
    from megaphi.training.checkpoint import load_checkpoint

    report_warm_start(path, checkpoint_config(path), cfg)
    load_checkpoint(path, chunks, optimizer, scheduler, layout,
                    load_optimizer=cfg.checkpoint.load_optimizer, load_progress=False)
    if cfg.checkpoint.load_optimizer:
        scheduler.step(increment=0)  # the loaded param groups carry the old run's last LR
    else:
        # Under bf16 the optimizer's fp32 main weights were copied from the initialisation when
        # it was built; without this the first step would write them back over the loaded ones.
        optimizer.reload_model_params()
    logger.info("loaded model weights%s from %s; schedule and step count start at 0",
                " and optimizer state" if cfg.checkpoint.load_optimizer else "", path)
