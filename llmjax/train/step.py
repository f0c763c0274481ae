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


def token_losses(model: nn.Module, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood and log-partition, both [B, L] float32."""
    logits_BLV = model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"])
    logz_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    # One-hot contraction keeps the vocabulary dimension sharded (no gather across devices).
    onehot_BLV = jax.nn.one_hot(batch["targets"], logits_BLV.shape[-1], dtype=logits_BLV.dtype)
    onehot_BLV = constrain(onehot_BLV, ("act_batch", "act_length", "act_vocab"))
    target_logit_BL = jnp.sum(logits_BLV * onehot_BLV, axis=-1)
    return logz_BL - target_logit_BL, logz_BL


def summed_loss(model: nn.Module, params: Any, batch: Batch, z_loss: float) -> tuple[jax.Array, Metrics]:
    """Sum over tokens of (NLL + z_loss * logZ^2), weighted; aux sums for logging."""
    nll_BL, logz_BL = token_losses(model, params, batch)
    w_BL = batch["weights"]
    nll_sum = jnp.sum(nll_BL * w_BL)
    z_sum = z_loss * jnp.sum(jnp.square(logz_BL) * w_BL)
    return nll_sum + z_sum, {"nll_sum": nll_sum, "z_sum": z_sum}


def split_microbatches(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B/n, ...]; microbatch a takes rows a, a+n, a+2n, ...

    Rows are interleaved so that each device's contiguous shard of the batch dimension
    stays on that device (no data movement to form microbatches).
    """

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "act_batch", *([None] * (x.ndim - 2))))

    return jax.tree.map(split, batch)


def batch_gradients(model: nn.Module, params: Any, batch: Batch, z_loss: float, accum_steps: int
                    ) -> tuple[Any, Metrics]:
    """Gradient of the mean token loss over the whole batch, accumulated over microbatches.

    Returns (grads with the params' structure, {"loss", "z_loss", "tokens"}). With
    `accum_steps` > 1 the microbatch gradients are summed in float32 and divided by the
    batch's total weight once, so the result equals the single-pass gradient.
    """
    total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    grad_fn = jax.grad(lambda p, b: summed_loss(model, p, b, z_loss), has_aux=True)
    if accum_steps == 1:
        grads, aux = grad_fn(params, batch)
    else:
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        init = (zeros, {"nll_sum": jnp.zeros(()), "z_sum": jnp.zeros(())})

        def body(carry, micro):
            g_acc, aux_acc = carry
            g, aux = grad_fn(params, micro)
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            return (g_acc, jax.tree.map(jnp.add, aux_acc, aux)), None

        (grads, aux), _ = jax.lax.scan(body, init, split_microbatches(batch, accum_steps))
    grads = jax.tree.map(lambda g, p: (g / total_weight).astype(p.dtype), grads, params)
    metrics = {"loss": aux["nll_sum"] / total_weight, "z_loss": aux["z_sum"] / total_weight, "tokens": total_weight}
    return grads, metrics


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, z_loss: float, accum_steps: int
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """train_step(state, batch) -> (new state, metrics): one optimizer update on the global batch."""

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        grads, metrics = batch_gradients(model, state.params, batch, z_loss, accum_steps)
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
