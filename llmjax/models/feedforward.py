"""Feed-forward kinds: what a block's MLP slot holds, and what that kind adds to the loss.

A kind (`FeedForward`) builds its module inside a block (`apply`: x -> (y, aux or None), with
its parameters under `kind.name`), turns the per-layer aux it returned into loss terms and
metric sums (`loss_terms`), those sums into logged metrics (`metrics`), merges aux over pipeline
microbatches, and says how many matmul parameters a token uses (FLOPs). The dense MLP has no
aux; Mixture-of-Experts (`llmjax.models.moe_feedforward.MoEFeedForward`) returns router statistics and
owns its loss coefficients and metric names. The train step only ever sees the kinds through
this interface (`ffn_kinds`, `layer_kinds`), so it has no MoE code.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.models.layers import MLP, mlp_matrices

Aux = dict[str, jax.Array]


class FeedForward:
    """The dense MLP (`model.mlp`, width `model.d_ff`); the base of every kind."""

    name = "mlp"

    def apply(self, cfg: ModelConfig, x_BLD: jax.Array) -> tuple[jax.Array, Aux | None]:
        """Inside a block's compact method: x [B, L, D] -> (y [B, L, D], per-layer aux or None)."""
        return MLP(cfg, name=self.name)(x_BLD), None

    def loss_terms(self, cfg: ModelConfig, aux: Aux, weight: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Aux stacked over this kind's layers -> (sum to add to the loss, metric sums), both already
        multiplied by `weight` (the batch's token weight), so they add up over microbatches."""
        return jnp.zeros((), jnp.float32), {}

    def metrics(self, cfg: ModelConfig, sums: dict[str, jax.Array], total_weight: jax.Array) -> dict[str, jax.Array]:
        """Logged metrics from the summed `loss_terms` sums."""
        return {}

    def uses_rng(self, cfg: ModelConfig) -> bool:
        """Whether training this kind needs a "router" rng (noise)."""
        return False

    def merge_microbatches(self, mean_aux: Aux) -> Aux:
        """The aux of one call from the mean over equal microbatches of their aux (pipeline)."""
        return mean_aux

    def matmul_params(self, cfg: ModelConfig) -> int:
        """Matmul parameters one token uses in one layer of this kind (FLOPs = 6 x this per token)."""
        return mlp_matrices(cfg.mlp) * cfg.d_model * cfg.d_ff


@functools.cache
def ffn_kinds() -> dict[str, FeedForward]:
    """Every kind by name (imported on first use: moe.py builds on this module)."""
    from llmjax.models.moe_feedforward import MoEFeedForward

    return {k.name: k for k in (FeedForward(), MoEFeedForward())}


def layer_kinds(cfg: ModelConfig, n_layers: int | None = None) -> tuple[str, ...]:
    """The feed-forward kind of each of `n_layers` (default `model.n_layers`) layers: MoE in layers every-1,
    2*every-1, ... when `model.moe` is on, else the dense MLP."""
    e, n = cfg.moe, cfg.n_layers if n_layers is None else n_layers
    return tuple("moe" if e.enabled and (i + 1) % e.every == 0 else "mlp" for i in range(n))


def aux_loss_terms(cfg: ModelConfig, aux: dict[str, Aux], weight: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
    """Every kind's loss terms for the aux a model sowed ({kind name: aux stacked over its layers})."""
    total = jnp.zeros((), jnp.float32)
    sums: dict[str, Any] = {}
    for name, a in aux.items():
        t, s = ffn_kinds()[name].loss_terms(cfg, a, weight)
        total, sums = total + t, {**sums, **s}
    return total, sums


def aux_metrics(cfg: ModelConfig, sums: dict[str, jax.Array], total_weight: jax.Array) -> dict[str, jax.Array]:
    out: dict[str, jax.Array] = {}
    for kind in ffn_kinds().values():
        out.update(kind.metrics(cfg, sums, total_weight))
    return out
