"""Attention implementations and fused losses behind the models' interfaces.

The table of attention implementations (`model.attention` name -> module) is declared in
`llmjax.config.attention_impls` (jax-free, so config validation checks a name without importing
this package) and re-exported here. Each module registers its function with
`llmjax.models.attention.register` when it is imported; `llmjax.models.attention.get` imports
the module on first use. Adding an implementation is one module and one line in that table.
"""

from __future__ import annotations

from llmjax.config.attention_impls import ATTENTION_ALIASES, ATTENTION_MODULES, attention_names, canonical_attention

__all__ = ["ATTENTION_ALIASES", "ATTENTION_MODULES", "attention_names", "canonical_attention"]
