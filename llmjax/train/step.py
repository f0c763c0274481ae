"""Pure training and evaluation steps.

Nothing here knows about meshes: shardings are attached by `train.setup` when these
functions are jitted. A batch is a dict of [B, L] arrays: `inputs`, `targets`,
`segment_ids`, `positions` (int32) and `weights` (float32, 0 for padding).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from llmjax.parallel.rules import constrain

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(struct.PyTreeNode):
    """Everything a step changes. `rng` is a raw uint32[2] key so it checkpoints as an array."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def _moe_config(model: nn.Module) -> Any:
    """The model's `MoEConfig` when it is a Mixture-of-Experts model, else None."""
    moe = getattr(getattr(model, "cfg", None), "moe", None)
    return moe if moe is not None and moe.enabled else None


def forward(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """-> (logits [B, L, V] float32, MoE aux stacked over layers, or None for a dense model).

    `rng` (training only) feeds the MoE router jitter; dense models ignore it."""
    args = (batch["inputs"], batch["segment_ids"], batch["positions"])
    if _moe_config(model) is None:
        return model.apply({"params": params}, *args), None
    rngs = {"router": rng} if rng is not None and _moe_config(model).router_jitter > 0 else None
    logits, state = model.apply({"params": params}, *args, rngs=rngs, mutable=["intermediates"])
    return logits, state["intermediates"]["moe"][0]


def _losses_from_logits(logits_BLV: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    logz_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    # One-hot contraction keeps the vocabulary dimension sharded (no gather across devices).
    onehot_BLV = jax.nn.one_hot(batch["targets"], logits_BLV.shape[-1], dtype=logits_BLV.dtype)
    onehot_BLV = constrain(onehot_BLV, ("act_batch", "act_length", "act_vocab"))
    target_logit_BL = jnp.sum(logits_BLV * onehot_BLV, axis=-1)
    return logz_BL - target_logit_BL, logz_BL


def token_losses(model: nn.Module, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood and log-partition, both [B, L] float32."""
    return _losses_from_logits(forward(model, params, batch)[0], batch)


def summed_loss(model: nn.Module, params: Any, batch: Batch, z_loss: float, rng: jax.Array | None = None
                ) -> tuple[jax.Array, Metrics]:
    """Sum over tokens of (NLL + z_loss * logZ^2), weighted; aux sums for logging.

    MoE models add (aux_loss_weight * lb + z_loss_weight * router_z) * sum(weights), lb and router_z
    being the load-balancing and router z-losses averaged over MoE layers, so that after division
    by the batch weight the loss holds their weighted values. Their sums (and the dropped fraction
    and per-layer expert load, times the weight) come back as `moe_*_sum` for logging."""
    logits_BLV, moe_aux = forward(model, params, batch, rng)
    nll_BL, logz_BL = _losses_from_logits(logits_BLV, batch)
    w_BL = batch["weights"]
    nll_sum = jnp.sum(nll_BL * w_BL)
    z_sum = z_loss * jnp.sum(jnp.square(logz_BL) * w_BL)
    sums = {"nll_sum": nll_sum, "z_sum": z_sum}
    total = nll_sum + z_sum
    moe = _moe_config(model)
    if moe is not None:
        w = jnp.sum(w_BL)
        lb, rz = jnp.mean(moe_aux["lb_loss"]), jnp.mean(moe_aux["z_loss"])
        total = total + (moe.aux_loss_weight * lb + moe.z_loss_weight * rz) * w
        sums.update(moe_aux_sum=lb * w, moe_z_sum=rz * w, moe_dropped_sum=jnp.mean(moe_aux["dropped_fraction"]) * w,
                    moe_load_sum=moe_aux["load"] * w, moe_layer_lb_sum=moe_aux["lb_loss"] * w,
                    moe_layer_z_sum=moe_aux["z_loss"] * w, moe_layer_dropped_sum=moe_aux["dropped_fraction"] * w)
    return total, sums


def moe_metrics(sums: Metrics, total_weight: jax.Array, every: int = 1) -> Metrics:
    """Scalar MoE metrics from the `moe_*_sum` entries: weighted means over the batch (microbatches).

    moe_aux_loss, moe_z_loss, moe_dropped_fraction (means over MoE layers), and per layer i:
    moe_lb_loss/layer{i}, moe_z_loss/layer{i}, moe_dropped/layer{i}, moe_load_max/layer{i}
    (largest expert load x num_experts: 1 is perfectly balanced) and moe_load/layer{i}/expert{j}
    (fraction of the layer's token->expert assignments that went to expert j). i is the layer's
    index in the whole stack: MoE layers are every-1, 2*every-1, ..."""
    if "moe_aux_sum" not in sums:
        return {}
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


def split_microbatches(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B/n, ...]; microbatch a takes rows a, a+n, a+2n, ...

    Rows are interleaved so that each device's contiguous shard of the batch dimension
    stays on that device (no data movement to form microbatches).
    """

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "act_batch", *([None] * (x.ndim - 2))))

    return jax.tree.map(split, batch)


def batch_gradients(model: nn.Module, params: Any, batch: Batch, z_loss: float, accum_steps: int,
                    rng: jax.Array | None = None) -> tuple[Any, Metrics]:
    """Gradient of the mean token loss over the whole batch, accumulated over microbatches.

    Returns (grads with the params' structure, {"loss", "z_loss", "tokens"}). With
    `accum_steps` > 1 the microbatch gradients are summed in float32 and divided by the
    batch's total weight once, so the result equals the single-pass gradient (for MoE models the
    router losses are then per-microbatch statistics, weighted by the microbatches' weights).
    `rng` feeds MoE router jitter (each microbatch folds in its index). MoE models add the
    `moe_metrics` entries.
    """
    total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    grad_fn = jax.grad(lambda p, b, r: summed_loss(model, p, b, z_loss, r), has_aux=True)
    if accum_steps == 1:
        grads, aux = grad_fn(params, batch, rng)
    else:
        micros = split_microbatches(batch, accum_steps)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        aux_shapes = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micros), rng)[1])
        init = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shapes))

        def body(carry, xs):
            g_acc, aux_acc = carry
            i, micro = xs
            g, aux = grad_fn(params, micro, None if rng is None else jax.random.fold_in(rng, i))
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            return (g_acc, jax.tree.map(jnp.add, aux_acc, aux)), None

        (grads, aux), _ = jax.lax.scan(body, init, (jnp.arange(accum_steps), micros))
    grads = jax.tree.map(lambda g, p: (g / total_weight).astype(p.dtype), grads, params)
    metrics = {"loss": aux["nll_sum"] / total_weight, "z_loss": aux["z_sum"] / total_weight, "tokens": total_weight}
    moe = _moe_config(model)
    metrics.update(moe_metrics(aux, total_weight, moe.every if moe is not None else 1))
    return grads, metrics


def _jitter(model: nn.Module) -> bool:
    moe = _moe_config(model)
    return moe is not None and moe.router_jitter > 0


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, z_loss: float, accum_steps: int
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """train_step(state, batch) -> (new state, metrics): one optimizer update on the global batch."""

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step) if _jitter(model) else None
        grads, metrics = batch_gradients(model, state.params, batch, z_loss, accum_steps, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["param_norm"] = optax.tree.norm(params)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module) -> Callable[[Any, Batch], Metrics]:
    """eval_step(params, batch) -> {"nll_sum", "weight_sum"} (sums, to be added over batches)."""

    def eval_step(params: Any, batch: Batch) -> Metrics:
        nll_BL, _ = token_losses(model, params, batch)
        return {"nll_sum": jnp.sum(nll_BL * batch["weights"]), "weight_sum": jnp.sum(batch["weights"])}

    return eval_step
