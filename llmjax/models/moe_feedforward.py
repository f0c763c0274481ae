"""The Mixture-of-Experts feed-forward kind: how the MoE layer (`llmjax.models.moe`) plugs into the
block's feed-forward contract (`llmjax.models.feedforward`): its aux losses, metrics and FLOPs."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.models.feedforward import Aux, FeedForward
from llmjax.models.layers import mlp_matrices
from llmjax.models.moe import MoE


def merge_microbatch_aux(mean_aux: Aux) -> Aux:
    """The aux of one call over M equal-sized microbatches, from the means over the microbatches of
    their own aux dicts (leaves [...] or stacked over layers [N, ...]).

    Every entry is a mean over tokens, hence the mean of the microbatches' values, except the
    load-balancing loss, a product of two such means: it is recomputed from the merged load and
    mean_probs. Routing and capacity groups are per token and per sequence, so this gives exactly
    the one-call statistics."""
    num_experts = mean_aux["load"].shape[-1]
    lb = num_experts * jnp.sum(jax.lax.stop_gradient(mean_aux["load"]) * mean_aux["mean_probs"], axis=-1)
    return {**mean_aux, "lb_loss": lb}


class MoEFeedForward(FeedForward):
    """The Mixture-of-Experts kind (`model.moe`): parameters under `moe`, router statistics as aux.

    Loss terms: (aux_loss_weight * lb + z_loss_weight * router_z) * weight, lb and router_z being the
    load-balancing and router z-losses averaged over MoE layers, so that after division by the batch
    weight the loss holds their weighted values. Metrics (weighted means over the batch and its
    microbatches): moe_aux_loss, moe_z_loss, moe_dropped_fraction (means over MoE layers), and per
    layer i: moe_lb_loss/layer{i}, moe_z_loss/layer{i}, moe_dropped/layer{i}, moe_load_max/layer{i}
    (largest expert load x num_experts: 1 is perfectly balanced) and moe_load/layer{i}/expert{j}
    (fraction of the layer's token->expert assignments that went to expert j). i is the layer's index in
    the whole stack: MoE layers are every-1, 2*every-1, ..."""

    name = "moe"

    def apply(self, cfg: ModelConfig, x_BLD: jax.Array) -> tuple[jax.Array, Aux]:
        return MoE(cfg, name=self.name)(x_BLD)

    def loss_terms(self, cfg: ModelConfig, aux: Aux, weight: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        lb, rz = jnp.mean(aux["lb_loss"]), jnp.mean(aux["z_loss"])
        total = (cfg.moe.aux_loss_weight * lb + cfg.moe.z_loss_weight * rz) * weight
        sums = dict(moe_aux_sum=lb * weight, moe_z_sum=rz * weight,
                    moe_dropped_sum=jnp.mean(aux["dropped_fraction"]) * weight, moe_load_sum=aux["load"] * weight,
                    moe_layer_lb_sum=aux["lb_loss"] * weight, moe_layer_z_sum=aux["z_loss"] * weight,
                    moe_layer_dropped_sum=aux["dropped_fraction"] * weight)
        return total, sums

    def metrics(self, cfg: ModelConfig, sums: dict[str, jax.Array], total_weight: jax.Array) -> dict[str, jax.Array]:
        if "moe_aux_sum" not in sums:
            return {}
        every = cfg.moe.every
        out = {"moe_aux_loss": sums["moe_aux_sum"] / total_weight, "moe_z_loss": sums["moe_z_sum"] / total_weight,
               "moe_dropped_fraction": sums["moe_dropped_sum"] / total_weight}
        load = sums["moe_load_sum"] / total_weight  # [N, X]
        n_layers, n_experts = load.shape
        for n in range(n_layers):
            i = n * every + every - 1
            out[f"moe_lb_loss/layer{i}"] = sums["moe_layer_lb_sum"][n] / total_weight
            out[f"moe_z_loss/layer{i}"] = sums["moe_layer_z_sum"][n] / total_weight
            out[f"moe_dropped/layer{i}"] = sums["moe_layer_dropped_sum"][n] / total_weight
            out[f"moe_load_max/layer{i}"] = jnp.max(load[n]) * n_experts
            for j in range(n_experts):
                out[f"moe_load/layer{i}/expert{j}"] = load[n, j]
        return out

    def uses_rng(self, cfg: ModelConfig) -> bool:
        return cfg.moe.router_jitter > 0

    def merge_microbatches(self, mean_aux: Aux) -> Aux:
        return merge_microbatch_aux(mean_aux)

    def matmul_params(self, cfg: ModelConfig) -> int:
        """The token's top_k experts and the shared experts, plus the router d_model x num_experts (the
        capacity path's one-hot dispatch/combine einsums are routing overhead, not counted)."""
        e = cfg.moe
        experts = mlp_matrices(cfg.mlp) * cfg.d_model * cfg.d_ff * (e.top_k + e.shared_experts)
        return experts + cfg.d_model * e.num_experts
