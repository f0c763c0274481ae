"""Maximal update parametrisation (μP, Yang et al. 2022, "Tensor Programs V"), by parameter role.

`model.parametrization=mup` makes the hyperparameters tuned at one width (`model.mup_base_width`:
`model.init_std`, `optim.lr`) the right ones at every width, by scaling each parameter's
initialisation and learning rate with the width multiplier m = d_model / mup_base_width. Every
hidden width (the attention's heads x head_dim, the MLP's d_ff, experts) is assumed to grow in
proportion to d_model, as in the muP "simple" recipe (Cerebras-GPT, u-μP): one m for the model.

The rules (Table 3 of the paper, for Adam-like optimizers), by role (`llmjax.models.roles`):

  role                      fan-in / fan-out     init std x      learning rate x
  embedding                 finite / width       1               1
  matrix, expert (hidden)   width / width        m^-1/2          1/m
  head, router (output)     width / finite       1/m             1/m
  norm, bias                (vectors)            1               1

plus attention logits scaled by sqrt(E_base) / E (∝ 1/head_dim, `attention_scale`) instead of
1/sqrt(E). At the base width (m = 1, E = E_base) every multiplier is exactly 1: μP is then
standard parametrisation, bit for bit. The multipliers are applied after `model.init` (a normal
initialisation times a constant) and after the optimizer's learning rate (`optim.py`: a per-leaf
scale of the updates; decoupled weight decay, which optax multiplies by the learning rate, is
scaled with it). The logged `lr` is the base learning rate η (the embedding's).

Only Adam-like optimizers follow these rules (`adamw`, `lion`: updates of size ~lr per entry);
SGD and Adafactor (updates relative to the parameter's scale) need others and are refused. A tied
embedding is both an input and an output weight, whose rules conflict: refused too. Those
configuration rules (`enabled`, `check`) are in `llmjax.config.rules.mup_rules`, re-exported here.
"""

from __future__ import annotations

from typing import Any

from llmjax.config import ModelConfig
from llmjax.config.rules.mup_rules import MUP_OPTIMIZERS, check, enabled

__all__ = ["MUP_OPTIMIZERS", "ROLE_EXPONENTS", "attention_scale", "base_head_dim", "check", "describe", "enabled",
           "init_multipliers", "lr_multipliers", "scale_init", "width_multiplier"]
# role -> (exponent of m in the init multiplier, exponent of m in the learning-rate multiplier)
ROLE_EXPONENTS: dict[str, tuple[float, float]] = {
    "embedding": (0.0, 0.0),
    "matrix": (-0.5, -1.0),
    "expert": (-0.5, -1.0),
    "head": (-1.0, -1.0),
    "router": (-1.0, -1.0),
    "norm": (0.0, 0.0),
    "bias": (0.0, 0.0),
}


def width_multiplier(cfg: ModelConfig) -> float:
    """m = d_model / mup_base_width (1 under standard parametrisation)."""
    return cfg.d_model / cfg.mup_base_width if enabled(cfg) else 1.0


def base_head_dim(cfg: ModelConfig) -> int:
    """The head dim at the base width: `mup_base_head_dim`, else `head_dim` when set (the heads' width is
    fixed and their count grows), else mup_base_width // n_heads (the heads grow wider)."""
    return cfg.mup_base_head_dim or cfg.head_dim or max(1, cfg.mup_base_width // cfg.n_heads)


def attention_scale(cfg: ModelConfig) -> float | None:
    """The attention-logit scale: None (the default 1/sqrt(E)) under standard parametrisation, else
    sqrt(E_base) / E, which equals 1/sqrt(E) at E = E_base and falls as 1/E with the head dim."""
    if not enabled(cfg):
        return None
    base = base_head_dim(cfg)
    return base ** -0.5 * (base / cfg.resolved_head_dim)  # exactly the default E^-1/2 when E == E_base


def _multipliers(cfg: ModelConfig, roles: Any, which: int) -> Any:
    import jax  # not at import time: this module imports without jax

    m = width_multiplier(cfg)
    return jax.tree.map(lambda role: float(m ** ROLE_EXPONENTS[role][which]), roles)


def init_multipliers(cfg: ModelConfig, roles: Any) -> Any | None:
    """A tree of floats like `roles`: what each freshly initialised parameter is multiplied by (None under
    standard parametrisation). See the module docstring."""
    return _multipliers(cfg, roles, 0) if enabled(cfg) else None


def lr_multipliers(cfg: ModelConfig, roles: Any) -> Any | None:
    """A tree of floats like `roles`: each parameter's learning rate / optim.lr (None under standard
    parametrisation)."""
    return _multipliers(cfg, roles, 1) if enabled(cfg) else None


def scale_init(cfg: ModelConfig, params: Any, roles: Any) -> Any:
    """Freshly initialised (unboxed) `params` with the μP init multipliers applied (unchanged under
    standard parametrisation). Shapes and shardings are kept."""
    import jax

    mults = init_multipliers(cfg, roles)
    if mults is None:
        return params
    return jax.tree.map(lambda p, c: p if c == 1.0 else (p * c).astype(p.dtype), params, mults)


def describe(cfg: ModelConfig) -> str:
    """One log line: the width multiplier and what it does."""
    if not enabled(cfg):
        return "standard parametrisation"
    m = width_multiplier(cfg)
    return (f"muP: width multiplier m = {cfg.d_model}/{cfg.mup_base_width} = {m:g}; hidden matrices init x "
            f"{m ** -0.5:.4g}, lr x {1 / m:.4g}; head/router init and lr x {1 / m:.4g}; embeddings, norms, biases "
            f"x 1; attention scale {attention_scale(cfg):.4g} (sqrt({base_head_dim(cfg)})/{cfg.resolved_head_dim})")
