"""Layer 1: config schemas, loading, validation messages and learning-rate schedules.

Must never import torch, directly or indirectly: ``sdtune validate`` checks a config in well under a
second. Only pydantic and PyYAML are imported here.
"""

from sdtune.config.base import StrictModel
from sdtune.config.errors import config_error, format_validation_error
from sdtune.config.loading import apply_overrides, dump_yaml, load_config, load_yaml, parse_config
from sdtune.config.methods import (
    METHOD_SCHEMAS,
    DreamBoothConfig,
    FinetuneConfig,
    HypernetworkConfig,
    LoraConfig,
    MethodConfig,
    RunBase,
    TextualInversionConfig,
)
from sdtune.config.rate_schedule import RateSchedule, check_rate_schedule, parse_rate_schedule


def load_train_config(path, overrides=()) -> RunBase:
    """Load, override and validate a training config YAML; raises ConfigError naming field and fix."""
    return load_config(path, overrides, schema=MethodConfig)


__all__ = [
    "METHOD_SCHEMAS",
    "DreamBoothConfig",
    "FinetuneConfig",
    "HypernetworkConfig",
    "LoraConfig",
    "MethodConfig",
    "RunBase",
    "TextualInversionConfig",
    "load_train_config",
    "RateSchedule",
    "StrictModel",
    "apply_overrides",
    "check_rate_schedule",
    "config_error",
    "dump_yaml",
    "format_validation_error",
    "load_config",
    "load_yaml",
    "parse_config",
    "parse_rate_schedule",
]
