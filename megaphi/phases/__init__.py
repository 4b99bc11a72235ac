"""The phases of the recipe: what differs between pre-training, mid-training, SFT and DPO (the
data, the forward step and loss, the metrics). :func:`get_phase` picks one by ``phase.name``;
:mod:`megaphi.phases.run` assembles a run around it."""

from __future__ import annotations

from megaphi.config.schema import MegaphiConfig
from megaphi.phases.base import Phase


def get_phase(cfg: MegaphiConfig) -> Phase:
    """The phase ``cfg.phase.name`` selects."""
    name = cfg.phase.name
    if name in ("pretrain", "midtrain"):
        from megaphi.phases.lm import LMPhase

        return LMPhase(cfg, name)
    if name == "sft":
        from megaphi.phases.sft import SFTPhase

        return SFTPhase(cfg)
    if name == "dpo":
        from megaphi.phases.dpo import DPOPhase

        return DPOPhase(cfg)
    from megaphi.config.schema import ConfigError

    raise ConfigError("phase.name", f"unknown phase {name}", "use pretrain, midtrain, sft or dpo")

__all__ = ["Phase", "get_phase"]
