"""Typed run configuration: dataclasses, presets, YAML and ``key=value`` overrides."""

from megaphi.config.loader import list_presets, load_config, to_yaml
from megaphi.config.schema import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DPOConfig,
    FP8Config,
    LoggingConfig,
    MegaphiConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    PhaseConfig,
    PrecisionConfig,
    ScheduleConfig,
    TrainConfig,
)

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "DPOConfig", "FP8Config", "LoggingConfig",
    "MegaphiConfig", "ModelConfig", "OptimizerConfig", "ParallelConfig", "PhaseConfig",
    "PrecisionConfig", "ScheduleConfig", "TrainConfig", "list_presets", "load_config", "to_yaml",
]
