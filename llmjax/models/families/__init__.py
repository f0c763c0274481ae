"""Model families behind one factory: `build_family(model_cfg)` (see `families.base.ModelFamily`)."""

from __future__ import annotations

import importlib

from llmjax.config import ConfigError, ModelConfig
from llmjax.config.family_spec import FAMILY_CLASSES
from llmjax.models.families.base import LMBatch, ModelFamily, batch_from_dict, forward

__all__ = ["LMBatch", "ModelFamily", "batch_from_dict", "build_family", "forward"]


def build_family(cfg: ModelConfig) -> ModelFamily:
    """The family `cfg.family` names, for this model config. ConfigError for an unknown name."""
    if cfg.family not in FAMILY_CLASSES:
        raise ConfigError(f"model.family: {cfg.family!r} is not one of {', '.join(FAMILY_CLASSES)}")
    module, cls = FAMILY_CLASSES[cfg.family].split(":")
    return getattr(importlib.import_module(module), cls)(cfg)
