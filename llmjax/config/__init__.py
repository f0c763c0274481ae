"""Typed experiment configuration: the schema, YAML loading with dotted overrides, validation.

A config is a tree of dataclasses (`Config` at the root, `config.schema`). It is built
from a YAML file plus `section.key=value` overrides with every key and type checked
(`config.loading`), and `validate` checks the cross-field rules (divisibility, mesh size,
lengths) before anything is compiled (`config.validate`). Every problem raises
`ConfigError`, which names the offending key; the CLI turns it into exit status 2.
"""

from llmjax.config.loading import (
    DEFAULT_CONFIG,
    PRESETS_DIR,
    deep_merge,
    from_dict,
    load_config,
    load_yaml,
    parse_override,
    parse_yaml,
    save_config,
    to_dict,
)
from llmjax.config.schema import (
    DTYPES,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DistributedConfig,
    EvalConfig,
    LogConfig,
    MeshConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    PipelineConfig,
    RopeScalingConfig,
    SampleConfig,
    SourceConfig,
    TrainConfig,
    WandbConfig,
    choices,
    mesh_axis_names,
)
from llmjax.config.validate import check_keys, config_warnings, validate
from llmjax.config.validate_data import validate_data

__all__ = [
    "DEFAULT_CONFIG", "DTYPES", "PRESETS_DIR", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
    "DistributedConfig", "EvalConfig", "LogConfig", "MeshConfig", "ModelConfig", "MoEConfig", "OptimConfig",
    "PipelineConfig", "RopeScalingConfig", "SampleConfig", "SourceConfig", "TrainConfig", "WandbConfig", "check_keys",
    "choices", "config_warnings", "deep_merge", "from_dict", "load_config", "load_yaml", "mesh_axis_names",
    "parse_override", "parse_yaml", "save_config", "to_dict", "validate", "validate_data",
]
