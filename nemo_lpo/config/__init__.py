"""Training configuration: layered YAML (conf/) validated into dataclasses, with ``key=value`` overrides."""

from nemo_lpo.config.loader import CONF_DIR, dump_config, load_config, parse_overrides
from nemo_lpo.config.peft import PeftConfig
from nemo_lpo.config.schema import (
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    ReferenceConfig,
    TrainConfig,
)

__all__ = [
    "CONF_DIR", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "LoggingConfig", "LossConfig",
    "ModelConfig", "OptimConfig", "ParallelConfig", "PeftConfig", "ReferenceConfig", "TrainConfig", "dump_config",
    "load_config", "parse_overrides",
]
