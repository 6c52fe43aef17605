"""Typed experiment configuration: the sections (:mod:`segment.config.sections`) and how a
config is read from YAML with overrides (:mod:`segment.config.loading`)."""

from segment.config.loading import ConfigError, apply_overrides, build_config, config_to_yaml, load_config
from segment.config.sections import (
    MAX_DERIVED_CHANNELS,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    TrainerConfig,
)

__all__ = [
    "MAX_DERIVED_CHANNELS",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "TrainerConfig",
    "apply_overrides",
    "build_config",
    "config_to_yaml",
    "load_config",
]
