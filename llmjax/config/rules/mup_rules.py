"""The configuration rules of maximal update parametrisation (`model.parametrization=mup`), jax-free.

What μP does to a model (per-role init and learning-rate multipliers, the attention scale) is in
`llmjax.models.mup`, whose docstring explains the rules. The settings those rules do not cover
are refused here, when the config is validated: optimizers that are not Adam-like (SGD and
Adafactor update relative to a parameter's scale and need other rules), tied embeddings (both an
input and an output weight, whose rules conflict), LoRA adapters (no μP rules) and an explicit
attention scale (μP sets it).
"""

from __future__ import annotations

from typing import Any

from llmjax.errors import ConfigError

MUP_OPTIMIZERS = ("adamw", "lion")


def enabled(cfg: Any) -> bool:
    """Whether the model config `cfg` (a ModelConfig) uses μP."""
    return bool(cfg.parametrization == "mup")


def check(cfg: Any, optimizer: str) -> None:
    """ConfigError for model settings (a ModelConfig `cfg`) the μP rules do not cover, with `optimizer`
    (optim.name)."""
    if not enabled(cfg):
        return
    if optimizer not in MUP_OPTIMIZERS:
        raise ConfigError(f"model.parametrization=mup: optim.name={optimizer} is not supported (its per-role "
                          f"rules differ from Adam's); use one of {', '.join(MUP_OPTIMIZERS)}")
    if cfg.tie_embeddings:
        raise ConfigError("model.parametrization=mup needs model.tie_embeddings=false (a tied table is both the "
                          "input and the output weight, whose μP rules differ)")


def check_run(cfg: Any) -> None:
    """The μP rules of a whole config (`Config`): `check`, then the sections μP does not cover."""
    m = cfg.model
    check(m, cfg.optim.name)
    if enabled(m) and cfg.lora.rank > 0:
        raise ConfigError("model.parametrization=mup with lora.rank > 0: the adapters have no μP rules; "
                          "fine-tune a μP model with lora.rank=0")
    if enabled(m) and m.attention_scale_dim > 0:
        raise ConfigError(f"model.attention_scale_dim={m.attention_scale_dim}: model.parametrization=mup sets the "
                          "attention scale itself (sqrt(E_base) / head_dim); set model.attention_scale_dim=0")
