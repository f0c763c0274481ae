"""Mixture-of-Experts feed-forward layer: a float32 router, top-k routing, two dispatch paths.

Shapes: T tokens (B * L flattened), D model width, F expert MLP width (`model.d_ff`), X experts,
K = top_k, C expert capacity (capacity path only).

Router. logits = x W_r (float32, W_r [D, X]); scores = softmax(logits) or sigmoid(logits); the
top-k scores are each token's expert weights, divided by their sum if `renormalize`. With
`router_jitter` = j > 0 and a "router" rng passed to `apply` (training), the router input is
multiplied by noise drawn from U(1 - j, 1 + j) (Switch Transformer); without that rng there is
no noise (evaluation, inference).

Auxiliary losses (float32 scalars, over all T tokens of the call):
- load balancing (Switch/GShard, top-k form): X * sum_e f_e * P_e, with f_e the fraction of the
  T*K token->expert assignments that go to expert e and P_e the mean over tokens of the router
  probability of e (softmax; for sigmoid scores the scores normalised to sum 1 per token).
  It is 1 when load and probabilities are uniform; only P_e carries a gradient.
- z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2.

Dispatch.
- capacity_factor > 0 (GShard): each expert takes at most C = ceil(capacity_factor * T * K / X)
  assignments, first choices of all tokens before second choices, each in token order;
  assignments over capacity are dropped (a token whose every choice is dropped gets MoE output
  0, so only its residual passes). Dispatch and combine are one-hot einsums over [T, X, C].
- capacity_factor <= 0 (dropless): the T*K assignments are sorted by expert and the expert
  MLPs run as grouped matmuls (`jax.lax.ragged_dot`), then unsorted and combined.

Parameters (logical axes):
  router/kernel                [D, X]      ("embed", None)
  experts/{wi_0,wi_1}_kernel   [X, D, F]   ("expert", "embed", "mlp")      wi_1: gated MLPs only
  experts/wo_kernel            [X, F, D]   ("expert", "mlp", "embed")
  experts/{wi_0,wi_1,wo}_bias  [X, F] / [X, D]                             use_bias only
  shared/...                   a dense MLP of width shared_experts * d_ff   shared_experts > 0
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.models.layers import _ACTIVATIONS, MLP, Linear, dtype
from llmjax.parallel.rules import constrain

Aux = dict[str, jax.Array]


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Assignments each expert takes on the capacity path: ceil(factor * T * K / X), at least 1."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def route(logits_TX: jax.Array, top_k: int, score: str, renormalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router logits [T, X] float32 -> (weights [T, K], expert ids [T, K] int32, probabilities [T, X]).

    `probabilities` are the per-token distribution used by the load-balancing loss."""
    if score == "softmax":
        scores_TX = jax.nn.softmax(logits_TX, axis=-1)
        probs_TX = scores_TX
    else:
        scores_TX = jax.nn.sigmoid(logits_TX)
        probs_TX = scores_TX / jnp.sum(scores_TX, axis=-1, keepdims=True)
    weights_TK, experts_TK = jax.lax.top_k(scores_TX, top_k)
    if renormalize:
        weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
    return weights_TK, experts_TK.astype(jnp.int32), probs_TX


def router_losses(logits_TX: jax.Array, probs_TX: jax.Array, experts_TK: jax.Array) -> tuple[jax.Array, ...]:
    """-> (load-balancing loss, z-loss, load [X]: fraction of the T*K assignments per expert)."""
    X = logits_TX.shape[-1]
    T, K = experts_TK.shape
    counts_X = jnp.sum(jax.nn.one_hot(experts_TK, X, dtype=jnp.float32), axis=(0, 1))
    load_X = counts_X / (T * K)
    lb = X * jnp.sum(jax.lax.stop_gradient(load_X) * jnp.mean(probs_TX, axis=0))
    z = jnp.mean(jnp.square(jax.nn.logsumexp(logits_TX, axis=-1)))
    return lb, z, load_X


class ExpertWeights(nn.Module):
    """The stacked weights of the X expert MLPs (see the module docstring); returns them as a dict."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        cfg = self.cfg
        X, D, F = cfg.moe.num_experts, cfg.d_model, cfg.d_ff
        pdt = dtype(cfg.param_dtype)
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        names = ("wi_0", "wi_1", "wo") if cfg.mlp in ("swiglu", "geglu") else ("wi_0", "wo")
        w: dict[str, jax.Array] = {}
        for name in names:
            if name == "wo":
                shape, axes, std = (X, F, D), ("expert", "mlp", "embed"), out_std
            else:
                shape, axes, std = (X, D, F), ("expert", "embed", "mlp"), cfg.init_std
            init = nn.with_logical_partitioning(nn.initializers.normal(std), axes)
            w[name + "_kernel"] = self.param(f"{name}_kernel", init, shape, pdt)
            if cfg.use_bias:
                w[name + "_bias"] = self.param(f"{name}_bias", nn.with_logical_partitioning(
                    nn.initializers.zeros, (axes[0], axes[2])), (shape[0], shape[2]), pdt)
        return w


def _expert_mlp(cfg: ModelConfig, w: dict[str, jax.Array], matmul: Any, bias: Any) -> tuple[Any, Any]:
    """(activation, lin(x, name)) of the expert MLP, given how to multiply by a stacked kernel and add a
    stacked bias. Mirrors `layers.MLP`: each matmul accumulates in float32, then is cast to the compute dtype."""
    compute = dtype(cfg.compute_dtype)

    def lin(x: jax.Array, name: str) -> jax.Array:
        y = matmul(x.astype(compute), w[name + "_kernel"].astype(compute))
        if cfg.use_bias:
            y = y + bias(w[name + "_bias"].astype(jnp.float32))
        return y.astype(compute)

    act = _ACTIVATIONS[cfg.mlp]
    return act, lin


class MoE(nn.Module):
    """x [B, L, D] -> (y [B, L, D] in the compute dtype, aux): the routed experts (+ shared experts).

    aux: {"lb_loss": [], "z_loss": [], "dropped_fraction": [], "load": [X], "mean_probs": [X]} float32
    (mean_probs: the router probabilities of the load-balancing loss, averaged over tokens)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> tuple[jax.Array, Aux]:
        cfg, moe = self.cfg, self.cfg.moe
        B, L, D = x_BLD.shape
        X, K, T = moe.num_experts, moe.top_k, B * L
        compute = dtype(cfg.compute_dtype)
        x_TD = x_BLD.reshape(T, D)

        router_in = x_TD
        if moe.router_jitter > 0 and self.has_rng("router"):
            noise = jax.random.uniform(self.make_rng("router"), x_TD.shape, jnp.float32,
                                       1.0 - moe.router_jitter, 1.0 + moe.router_jitter)
            router_in = x_TD.astype(jnp.float32) * noise
        logits_TX = Linear((X,), ("embed", None), init_std=cfg.init_std, compute_dtype=jnp.float32,
                           param_dtype=dtype(cfg.param_dtype), output_dtype=jnp.float32, name="router")(router_in)
        weights_TK, experts_TK, probs_TX = route(logits_TX, K, moe.score, moe.renormalize)
        lb, z, load_X = router_losses(logits_TX, probs_TX, experts_TK)

        w = ExpertWeights(cfg, name="experts")()
        if moe.capacity_factor > 0:
            y_TD, dropped = self._capacity(x_TD, weights_TK, experts_TK, w)
        else:
            y_TD, dropped = self._dropless(x_TD, weights_TK, experts_TK, w), jnp.zeros((), jnp.float32)
        y_BLD = y_TD.reshape(B, L, D).astype(compute)
        if moe.shared_experts > 0:
            shared_cfg = dataclasses.replace(cfg, d_ff=cfg.d_ff * moe.shared_experts)
            y_BLD = y_BLD + MLP(shared_cfg, name="shared")(x_BLD)
        aux = {"lb_loss": lb, "z_loss": z, "dropped_fraction": dropped, "load": load_X,
               "mean_probs": jnp.mean(probs_TX, axis=0)}
        return y_BLD, aux

    def _dropless(self, x_TD: jax.Array, weights_TK: jax.Array, experts_TK: jax.Array,
                  w: dict[str, jax.Array]) -> jax.Array:
        """Sort the T*K assignments by expert, grouped matmuls, unsort, weighted sum -> [T, D] float32."""
        cfg = self.cfg
        T, K = experts_TK.shape
        X = cfg.moe.num_experts
        flat_M = experts_TK.reshape(T * K)  # M = T*K assignments, token-major
        order_M = jnp.argsort(flat_M, stable=True)
        expert_sorted_M = flat_M[order_M]
        group_sizes_X = jnp.bincount(flat_M, length=X).astype(jnp.int32)
        x_MD = jnp.take(x_TD, order_M // K, axis=0)

        def matmul(a: jax.Array, kernel: jax.Array) -> jax.Array:
            return jax.lax.ragged_dot(a, kernel, group_sizes_X, preferred_element_type=jnp.float32)

        def bias(b_XN: jax.Array) -> jax.Array:
            return jnp.take(b_XN, expert_sorted_M, axis=0)

        act, lin = _expert_mlp(cfg, w, matmul, bias)
        h = act(lin(x_MD, "wi_0"))
        if "wi_1_kernel" in w:
            h = h * lin(x_MD, "wi_1")
        y_MD = lin(h, "wo")
        inverse_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(T * K, dtype=order_M.dtype))
        y_TKD = jnp.take(y_MD, inverse_M, axis=0).reshape(T, K, -1).astype(jnp.float32)
        return jnp.einsum("tkd,tk->td", y_TKD, weights_TK)

    def _capacity(self, x_TD: jax.Array, weights_TK: jax.Array, experts_TK: jax.Array,
                  w: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """GShard dispatch with capacity C -> ([T, D] float32, dropped fraction of the T*K assignments)."""
        cfg = self.cfg
        T, K = experts_TK.shape
        X = cfg.moe.num_experts
        C = capacity(T, K, X, cfg.moe.capacity_factor)
        compute = dtype(cfg.compute_dtype)
        mask_KTX = jax.nn.one_hot(experts_TK.T, X, dtype=jnp.int32)  # priority: all first choices first
        pos_KTX = (jnp.cumsum(mask_KTX.reshape(K * T, X), axis=0) - 1).reshape(K, T, X)
        pos_KT = jnp.sum(pos_KTX * mask_KTX, axis=-1)
        keep_KT = pos_KT < C
        slot_KTC = jax.nn.one_hot(jnp.where(keep_KT, pos_KT, C), C, dtype=jnp.float32)  # index C: all zeros
        mask_f = mask_KTX.astype(jnp.float32)
        dispatch_TXC = jnp.einsum("ktx,ktc->txc", mask_f, slot_KTC)
        combine_TXC = jnp.einsum("ktx,ktc,tk->txc", mask_f, slot_KTC, weights_TK)
        x_XCD = jnp.einsum("txc,td->xcd", dispatch_TXC.astype(compute), x_TD.astype(compute),
                           preferred_element_type=jnp.float32).astype(compute)
        x_XCD = constrain(x_XCD, ("act_expert", None, "act_embed"))

        def matmul(a: jax.Array, kernel: jax.Array) -> jax.Array:
            return jnp.einsum("xcd,xdf->xcf", a, kernel, preferred_element_type=jnp.float32)

        def bias(b_XN: jax.Array) -> jax.Array:
            return b_XN[:, None, :]

        act, lin = _expert_mlp(cfg, w, matmul, bias)
        h = act(lin(x_XCD, "wi_0"))
        if "wi_1_kernel" in w:
            h = h * lin(x_XCD, "wi_1")
        y_XCD = lin(h, "wo")
        y_TD = jnp.einsum("txc,xcd->td", combine_TXC, y_XCD.astype(jnp.float32))
        dropped = jnp.sum(~keep_KT).astype(jnp.float32) / (K * T)
        return y_TD, dropped


def merge_microbatch_aux(mean_aux: Aux) -> Aux:
    """The aux of one call over M equal-sized microbatches, from the means over the microbatches of
    their own aux dicts (leaves [...] or stacked over layers [N, ...]).

    Every entry is a mean over tokens, hence the mean of the microbatches' values, except the
    load-balancing loss, a product of two such means: it is recomputed from the merged load and
    mean_probs. Dropless routing then gives exactly the one-call statistics; with a capacity
    (capacity_factor > 0) each microbatch has its own capacity, so drops can differ."""
    num_experts = mean_aux["load"].shape[-1]
    lb = num_experts * jnp.sum(jax.lax.stop_gradient(mean_aux["load"]) * mean_aux["mean_probs"], axis=-1)
    return {**mean_aux, "lb_loss": lb}
