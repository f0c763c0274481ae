"""Model families behind one factory: `build_family(model_cfg)` (see `families.base.ModelFamily`)."""

from __future__ import annotations

import importlib

from llmjax.config import ModelConfig
from llmjax.config.family_spec import family_spec
from llmjax.models.families.base import LMBatch, ModelFamily, batch_from_dict, forward

__all__ = ["LMBatch", "ModelFamily", "batch_from_dict", "build_family", "forward"]


def build_family(cfg: ModelConfig) -> ModelFamily:
    """The family `cfg.family` names (its `FamilySpec.implementation`), for this model config. ConfigError for an
    unknown name."""
    module, cls = family_spec(cfg.family).implementation.split(":")
    return getattr(importlib.import_module(module), cls)(cfg)
