"""Typed experiment configuration: the schema, YAML loading with dotted overrides, validation.

A config is a tree of dataclasses (`Config` at the root, `config.schema`). It is built
from a YAML file plus `section.key=value` overrides with every key and type checked
(`config.loading`), and the cross-field rules (divisibility, lengths, the family's
capabilities) are checked when it loads (`validate_config`); the rules that need the device
count (mesh sizes) by `validate_mesh` before anything is compiled (`config.rules.validate`). Every
problem raises `ConfigError` (`llmjax.errors`, re-exported here), which names the offending
key; the CLI turns it into exit status 2.

The base of the package: it imports nothing above it (only `llmjax.errors`, the standard
library and yaml); the tables its rules read (model families, attention implementations,
logical axes, mesh axes) are declared here and read by the layers above.
"""

from llmjax.config.family_spec import FAMILIES, FamilySpec, family_spec
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
from llmjax.config.rules.data_rules import validate_data
from llmjax.config.rules.validate import (
    check_environment,
    check_keys,
    config_warnings,
    validate,
    validate_config,
    validate_mesh,
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

__all__ = [
    "DEFAULT_CONFIG", "DTYPES", "FAMILIES", "PRESETS_DIR", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
    "DistributedConfig", "EvalConfig", "FamilySpec", "LogConfig", "MeshConfig", "ModelConfig", "MoEConfig",
    "OptimConfig", "PipelineConfig", "RopeScalingConfig", "SampleConfig", "SourceConfig", "TrainConfig",
    "WandbConfig", "check_environment", "check_keys", "choices", "config_warnings", "deep_merge", "family_spec",
    "from_dict", "load_config", "load_yaml", "mesh_axis_names", "parse_override", "parse_yaml", "save_config",
    "to_dict", "validate", "validate_config", "validate_data", "validate_mesh",
]
