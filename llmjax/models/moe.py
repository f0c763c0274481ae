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
- capacity_factor > 0 (GShard): capacity groups are sequences, so the result does not depend on
  how the batch is laid out over devices. In each sequence of L tokens every expert takes at most
  C = ceil(capacity_factor * L * K / X) assignments, first choices of all its tokens before second
  choices, each in token order; assignments over capacity are dropped (a token whose every choice
  is dropped gets MoE output 0, so only its residual passes). Dispatch and combine are one-hot
  einsums over [B, L, X, C].
- capacity_factor <= 0 (dropless): the T*K assignments are sorted by expert and the expert
  MLPs run as grouped matmuls (`jax.lax.ragged_dot`), then unsorted and combined.

Expert parallelism (`mesh.expert` = E > 1): the layer runs inside `shard_map` over the whole mesh.
Each device routes its own tokens (the batch is split over data x fsdp x expert), sends every
assignment to the device that holds its expert with an all-to-all over `expert`, runs its X / E
experts (their MLP width split over `tensor`, the partial outputs summed with psum), and gets the
outputs back with a second all-to-all. The capacity path exchanges the [X, B_local, C, D] slot
buffers; the dropless path a buffer of B_local * L * K rows per peer (the most one device can send
to one peer), sorted by expert, so nothing is ever dropped. Router statistics are summed over the
batch axes, so losses and metrics equal the one-device values.

Parameters (logical axes):
  router/kernel                [D, X]      ("embed", "router")
  experts/{wi_0,wi_1}_kernel   [X, D, F]   ("expert", "embed", "mlp")      wi_1: gated MLPs only
  experts/wo_kernel            [X, F, D]   ("expert", "mlp", "embed")
  experts/{wi_0,wi_1,wo}_bias  [X, F] / [X, D]                             use_bias only
  shared/...                   a dense MLP of width shared_experts * d_ff   shared_experts > 0
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from llmjax.config import ModelConfig
from llmjax.kernels.fp8 import fp8_matmul, fp8_ragged_dot
from llmjax.models.feedforward import Aux
from llmjax.models.layers import _ACTIVATIONS, MLP, Linear, dtype, logical_init
from llmjax.parallel.rules import constrain, current_sharding


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
            init = logical_init(nn.initializers.normal(std), axes)
            w[name + "_kernel"] = self.param(f"{name}_kernel", init, shape, pdt)
            if cfg.use_bias:
                w[name + "_bias"] = self.param(f"{name}_bias", logical_init(
                    nn.initializers.zeros, (axes[0], axes[2])), (shape[0], shape[2]), pdt)
        return w


@dataclasses.dataclass(frozen=True)
class Collectives:
    """How the expert computation talks to other devices. The default (no axes) is one device or
    plain GSPMD, where every array is global and every method is the identity."""

    batch_axes: tuple[str, ...] = ()  # mesh axes the tokens are split over: statistics are summed over them
    expert_axis: str | None = None  # the axis the experts are split over (all-to-all)
    expert_shards: int = 1
    mlp_axes: tuple[str, ...] = ()  # axes the expert MLP width is split over: output partial sums

    def total(self, v: jax.Array) -> jax.Array:
        return jax.lax.psum(v, self.batch_axes) if self.batch_axes else v

    def exchange(self, v: jax.Array, split_axis: int, concat_axis: int) -> jax.Array:
        """Chunk i of `split_axis` goes to expert shard i; what arrives is stacked along `concat_axis`."""
        if self.expert_axis is None:
            return v
        return jax.lax.all_to_all(v, self.expert_axis, split_axis, concat_axis, tiled=True)

    def reduce_mlp(self, v: jax.Array) -> jax.Array:
        return jax.lax.psum(v, self.mlp_axes) if self.mlp_axes else v


def expert_mlp(cfg: ModelConfig, w: dict[str, jax.Array], x: jax.Array, matmul: Any, bias: Any,
               comm: Collectives) -> jax.Array:
    """The expert MLPs (the dense MLP's kind) on dispatched rows; `matmul(a, kernel)` multiplies by a
    stacked kernel (float32 accumulation; float8 operands with `model.matmul_dtype=fp8`) and `bias(b)`
    lays out a stacked bias for the rows. Each matmul's output is cast to the compute dtype, as in
    `layers.MLP`; the output projection's partial sums over a split MLP width are summed before its
    bias is added."""
    compute = dtype(cfg.compute_dtype)

    def lin(a: jax.Array, name: str, reduce: Any = lambda v: v) -> jax.Array:
        y = reduce(matmul(a.astype(compute), w[name + "_kernel"].astype(compute)))
        if cfg.use_bias:
            y = y + bias(w[name + "_bias"].astype(jnp.float32))
        return y.astype(compute)

    h = _ACTIVATIONS[cfg.mlp](lin(x, "wi_0"))
    if "wi_1_kernel" in w:
        h = h * lin(x, "wi_1")
    return lin(h, "wo", comm.reduce_mlp)


def route_and_dispatch(cfg: ModelConfig, x_BLD: jax.Array, logits_BLX: jax.Array, w: dict[str, jax.Array],
                       comm: Collectives) -> tuple[jax.Array, Aux]:
    """Routing, router statistics and both dispatch paths, on this device's tokens (all of them
    without expert parallelism). -> (y [B, L, D] float32, aux as in `MoE`)."""
    moe = cfg.moe
    B, L, D = x_BLD.shape
    X, K = moe.num_experts, moe.top_k
    weights_BLK, experts_BLK, probs_BLX = route(logits_BLX, K, moe.score, moe.renormalize)
    tokens = comm.total(jnp.asarray(B * L, jnp.float32))
    counts_X = comm.total(jnp.sum(jax.nn.one_hot(experts_BLK, X, dtype=jnp.float32), axis=(0, 1, 2)))
    load_X = counts_X / (tokens * K)
    mean_probs_X = comm.total(jnp.sum(probs_BLX, axis=(0, 1))) / tokens
    lb = X * jnp.sum(jax.lax.stop_gradient(load_X) * mean_probs_X)
    z = comm.total(jnp.sum(jnp.square(jax.nn.logsumexp(logits_BLX, axis=-1)))) / tokens
    if moe.capacity_factor > 0:
        y_BLD, dropped = _capacity_dispatch(cfg, x_BLD, weights_BLK, experts_BLK, w, comm)
        dropped = comm.total(dropped) / (tokens * K)
    else:
        T = B * L
        y_TD = _dropless_dispatch(cfg, x_BLD.reshape(T, D), weights_BLK.reshape(T, K),
                                  experts_BLK.reshape(T, K), w, comm)
        y_BLD, dropped = y_TD.reshape(B, L, D), jnp.zeros((), jnp.float32)
    return y_BLD, {"lb_loss": lb, "z_loss": z, "dropped_fraction": dropped, "load": load_X,
                   "mean_probs": mean_probs_X}


def _capacity_dispatch(cfg: ModelConfig, x_BLD: jax.Array, weights_BLK: jax.Array, experts_BLK: jax.Array,
                       w: dict[str, jax.Array], comm: Collectives) -> tuple[jax.Array, jax.Array]:
    """GShard dispatch with capacity C per sequence -> ([B, L, D] float32, number of dropped assignments)."""
    B, L, K = experts_BLK.shape
    X = cfg.moe.num_experts
    C = capacity(L, K, X, cfg.moe.capacity_factor)
    compute = dtype(cfg.compute_dtype)
    mask_BKLX = jax.nn.one_hot(experts_BLK.transpose(0, 2, 1), X, dtype=jnp.int32)  # all first choices first
    pos_BKLX = (jnp.cumsum(mask_BKLX.reshape(B, K * L, X), axis=1) - 1).reshape(B, K, L, X)
    pos_BKL = jnp.sum(pos_BKLX * mask_BKLX, axis=-1)
    keep_BKL = pos_BKL < C
    slot_BKLC = jax.nn.one_hot(jnp.where(keep_BKL, pos_BKL, C), C, dtype=jnp.float32)  # index C: all zeros
    mask_f = mask_BKLX.astype(jnp.float32)
    dispatch_BLXC = jnp.einsum("bklx,bklc->blxc", mask_f, slot_BKLC)
    combine_BLXC = jnp.einsum("bklx,bklc,blk->blxc", mask_f, slot_BKLC, weights_BLK)
    x_XBCD = jnp.einsum("blxc,bld->xbcd", dispatch_BLXC.astype(compute), x_BLD.astype(compute),
                        preferred_element_type=jnp.float32).astype(compute)
    if comm.expert_axis is None:
        x_XBCD = constrain(x_XBCD, ("act_expert", "act_batch", None, "act_embed"))
    x_XNCD = comm.exchange(x_XBCD, 0, 1)  # [X / E, E * B, C, D]: this shard's experts, every shard's slots

    def expert_matmul(a: jax.Array, kernel: jax.Array) -> jax.Array:
        if cfg.matmul_dtype == "fp8":  # one batched [N*C, D] x [D, F] matmul per local expert
            Xl, N, Cs, _ = a.shape
            return fp8_matmul(a.reshape(Xl, N * Cs, -1), kernel).reshape(Xl, N, Cs, -1)
        # plain einsum, not kernels.matmul: under shard_map (expert parallelism) the custom VJP's kernel gradient
        # varies over more mesh axes than the kernel, which jax refuses ("manual axis types do not match")
        return jnp.einsum("xncd,xdf->xncf", a, kernel, preferred_element_type=jnp.float32)

    y_XNCD = expert_mlp(cfg, w, x_XNCD, expert_matmul, lambda b: b[:, None, None, :], comm)
    y_XBCD = comm.exchange(y_XNCD, 1, 0)
    y_BLD = jnp.einsum("blxc,xbcd->bld", combine_BLXC, y_XBCD.astype(jnp.float32))
    return y_BLD, jnp.sum(~keep_BKL).astype(jnp.float32)


def _dropless_dispatch(cfg: ModelConfig, x_TD: jax.Array, weights_TK: jax.Array, experts_TK: jax.Array,
                       w: dict[str, jax.Array], comm: Collectives) -> jax.Array:
    """Sort the T*K assignments by expert, grouped matmuls, unsort, weighted sum -> [T, D] float32.

    With E expert shards the sorted rows go to their expert's shard in a [E, T*K] buffer per
    direction (padding rows carry expert id X / E: last after the local sort, outside every group,
    and their outputs are never read)."""
    T, K = experts_TK.shape
    M, X, E = T * K, cfg.moe.num_experts, comm.expert_shards
    flat_M = experts_TK.reshape(M)  # M = T*K assignments, token-major
    order_M = jnp.argsort(flat_M, stable=True)
    expert_sorted_M = flat_M[order_M]
    x_MD = jnp.take(x_TD, order_M // K, axis=0)
    if E == 1:
        y_MD = _grouped_experts(cfg, w, x_MD, expert_sorted_M, X, comm)
    else:
        Xl = X // E
        peer_M = expert_sorted_M // Xl
        counts_E = jnp.bincount(peer_M, length=E)
        slot_M = jnp.arange(M) - (jnp.cumsum(counts_E) - counts_E)[peer_M]
        send_EMD = jnp.zeros((E, M, x_MD.shape[-1]), x_MD.dtype).at[peer_M, slot_M].set(x_MD)
        ids_EM = jnp.full((E, M), Xl, jnp.int32).at[peer_M, slot_M].set(expert_sorted_M % Xl)
        recv_RD = comm.exchange(send_EMD, 0, 0).reshape(E * M, -1)  # R = E*M rows from every shard
        ids_R = comm.exchange(ids_EM, 0, 0).reshape(E * M)
        local_order_R = jnp.argsort(ids_R, stable=True)
        y_RD = _grouped_experts(cfg, w, jnp.take(recv_RD, local_order_R, axis=0), ids_R[local_order_R], Xl, comm)
        y_RD = jnp.zeros_like(y_RD).at[local_order_R].set(y_RD)
        y_EMD = comm.exchange(y_RD.reshape(E, M, -1), 0, 0)
        y_MD = y_EMD[peer_M, slot_M]
    inverse_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(M, dtype=order_M.dtype))
    y_TKD = jnp.take(y_MD, inverse_M, axis=0).reshape(T, K, -1).astype(jnp.float32)
    return jnp.einsum("tkd,tk->td", y_TKD, weights_TK)


def _grouped_experts(cfg: ModelConfig, w: dict[str, jax.Array], x_RD: jax.Array, ids_R: jax.Array,
                     num_groups: int, comm: Collectives) -> jax.Array:
    """Rows sorted by expert id (ids >= num_groups: padding, last) through their experts -> [R, D]."""
    group_sizes = jnp.bincount(ids_R, length=num_groups).astype(jnp.int32)

    def matmul(a: jax.Array, kernel: jax.Array) -> jax.Array:
        if cfg.matmul_dtype == "fp8":
            return fp8_ragged_dot(a, kernel, group_sizes)
        return jax.lax.ragged_dot(a, kernel, group_sizes, preferred_element_type=jnp.float32)

    def bias(b_XN: jax.Array) -> jax.Array:
        return jnp.take(b_XN, ids_R, axis=0, mode="clip")

    return expert_mlp(cfg, w, x_RD, matmul, bias, comm)


def expert_parallel_plan(batch: int) -> tuple[Any, Collectives, PartitionSpec] | None:
    """(mesh, collectives, token spec) when the installed mesh has an `expert` axis above 1 and the
    batch splits evenly over the batch axes; else None (one device or plain GSPMD)."""
    ctx = current_sharding()
    if ctx is None:
        return None
    mesh, rules = ctx
    shards = mesh.shape.get("expert", 1)
    if shards == 1:
        return None
    batch_axes = tuple(rules["act_batch"])
    if rules["expert"] != ("expert",) or "expert" not in batch_axes:
        raise ValueError("expert parallelism needs mesh.rules.expert = expert and 'expert' in mesh.rules.act_batch, "
                         f"got {rules['expert']} and {batch_axes}")
    if batch % math.prod(mesh.shape[a] for a in batch_axes):
        return None
    comm = Collectives(batch_axes, "expert", shards, tuple(rules["mlp"]))
    return mesh, comm, PartitionSpec(batch_axes)


def _weight_specs(w: dict[str, jax.Array], comm: Collectives) -> dict[str, PartitionSpec]:
    """Expert weights inside shard_map: experts over `expert`, the MLP width over the mlp axes, the model
    width whole (an fsdp split of it is gathered on the way in, as FSDP does for every weight)."""
    ex, mlp = comm.expert_axis, comm.mlp_axes or None
    specs = {}
    for name in w:
        if name == "wo_kernel":
            specs[name] = PartitionSpec(ex, mlp, None)
        elif name == "wo_bias":
            specs[name] = PartitionSpec(ex, None)
        elif name.endswith("_kernel"):
            specs[name] = PartitionSpec(ex, None, mlp)
        else:
            specs[name] = PartitionSpec(ex, mlp)
    return specs


class MoE(nn.Module):
    """x [B, L, D] -> (y [B, L, D] in the compute dtype, aux): the routed experts (+ shared experts).

    aux: {"lb_loss": [], "z_loss": [], "dropped_fraction": [], "load": [X], "mean_probs": [X]} float32
    (mean_probs: the router probabilities of the load-balancing loss, averaged over tokens).
    x is sharded ("act_batch", "act_length", "act_embed"); with `mesh.expert` > 1 see the module
    docstring (expert parallelism)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> tuple[jax.Array, Aux]:
        cfg, moe = self.cfg, self.cfg.moe
        B, L, D = x_BLD.shape
        X = moe.num_experts
        compute = dtype(cfg.compute_dtype)

        router_in = x_BLD
        if moe.router_jitter > 0 and self.has_rng("router"):
            noise = jax.random.uniform(self.make_rng("router"), x_BLD.shape, jnp.float32,
                                       1.0 - moe.router_jitter, 1.0 + moe.router_jitter)
            router_in = x_BLD.astype(jnp.float32) * noise
        logits_BLX = Linear((X,), ("embed", "router"), init_std=cfg.init_std, compute_dtype=jnp.float32,
                            param_dtype=dtype(cfg.param_dtype), output_dtype=jnp.float32, name="router")(router_in)
        w = ExpertWeights(cfg, name="experts")()
        plan = expert_parallel_plan(B)
        if plan is None:
            y_BLD, aux = route_and_dispatch(cfg, x_BLD, logits_BLX, w, Collectives())
        else:
            mesh, comm, tokens = plan
            stats = {k: PartitionSpec() for k in ("lb_loss", "z_loss", "dropped_fraction", "load", "mean_probs")}
            y_BLD, aux = jax.shard_map(
                functools.partial(route_and_dispatch, cfg, comm=comm), mesh=mesh,
                in_specs=(tokens, tokens, _weight_specs(w, comm)), out_specs=(tokens, stats), check_vma=True,
            )(x_BLD, logits_BLX, w)
        y_BLD = y_BLD.astype(compute)
        if moe.shared_experts > 0:
            shared_cfg = dataclasses.replace(cfg, d_ff=cfg.d_ff * moe.shared_experts)
            y_BLD = y_BLD + MLP(shared_cfg, name="shared")(x_BLD)
        return y_BLD, aux
