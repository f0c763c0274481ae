"""Model families behind one factory: `build_family(model_cfg)` (see `families.base.ModelFamily`)."""

from __future__ import annotations

import importlib
from typing import Any

from llmjax.config import ModelConfig
from llmjax.config.family_spec import family_spec
from llmjax.models.families.base import (
    Batch,
    DecodingFamily,
    LMBatch,
    LMFamily,
    ModelFamily,
    batch_from_dict,
    forward,
)

__all__ = ["AnyFamily", "Batch", "DecodingFamily", "LMBatch", "LMFamily", "ModelFamily", "batch_from_dict",
           "build_family", "forward"]

# A family as its callers see it: any config subclass, a batch type known only to the family itself.
AnyFamily = ModelFamily[ModelConfig, Any]


def build_family(cfg: ModelConfig) -> AnyFamily:
    """The family `cfg.family` names (its `FamilySpec.implementation`), for this model config. ConfigError for an
    unknown name."""
    module, cls = family_spec(cfg.family).implementation.split(":")
    family_cls: type[AnyFamily] = getattr(importlib.import_module(module), cls)
    return family_cls(cfg)
