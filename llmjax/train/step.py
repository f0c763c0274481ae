"""Pure training and evaluation steps, for any model family.

Nothing here knows about meshes (shardings are attached by `train.setup` when these functions
are jitted) or about architectures: the family (`llmjax.models.families`) gives the loss as sums
and the metrics, and its batch is a typed pytree whose `weights` field weights the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from llmjax.models.families.base import Params, Sums
from llmjax.parallel.rules import constrain

Metrics = dict[str, jax.Array]


class WeightedBatch(Protocol):
    """What the step reads of a batch (a pytree of [B, ...] arrays): `weights`, whose sum divides the loss."""

    @property
    def weights(self) -> jax.Array: ...


# A batch as the step's callers see it: the family's own type (e.g. `LMBatch`), known to the family only.
Batch = Any
BatchT = TypeVar("BatchT", bound=WeightedBatch)
Batch_contra = TypeVar("Batch_contra", bound=WeightedBatch, contravariant=True)


class TrainObjective(Protocol[Batch_contra]):
    """What the steps ask of a model family (`llmjax.models.families.ModelFamily`) or of an objective that
    wraps one (DPO's `PreferenceObjective`): the loss as sums, the metrics from them, the evaluation sums."""

    @property
    def uses_rng(self) -> bool: ...

    def loss(self, model: nn.Module, params: Params, batch: Batch_contra, z_loss: float,
             rng: jax.Array | None = None) -> tuple[jax.Array, Sums]: ...

    def metrics(self, sums: Sums, total_weight: jax.Array) -> dict[str, jax.Array]: ...

    def eval_sums(self, model: nn.Module, params: Params, batch: Batch_contra) -> Sums: ...


class TrainState(struct.PyTreeNode):
    """Everything a step changes. `rng` is a raw uint32[2] key so it checkpoints as an array."""

    step: jax.Array
    params: Any  # what the optimizer trains: the model's parameters, or LoRA adapters
    opt_state: Any
    rng: jax.Array
    frozen: Any = None  # parameters the optimizer does not train (LoRA's base model); not checkpointed


def split_microbatches(batch: BatchT, n: int) -> BatchT:
    """[B, ...] -> [n, B/n, ...]; microbatch a takes rows a, a+n, a+2n, ...

    Rows are interleaved so that each device's contiguous shard of the batch dimension
    stays on that device (no data movement to form microbatches).
    """

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "act_batch", *([None] * (x.ndim - 2))))

    micros: BatchT = jax.tree.map(split, batch)
    return micros


# (frozen, trained params, rng or None) -> the model's parameters (LoRA: the merged weights)
ModelParams = Callable[[Any, Any, "jax.Array | None"], Any]


def batch_gradients(family: TrainObjective[BatchT], model: nn.Module, params: Params, batch: BatchT, z_loss: float,
                    accum_steps: int, rng: jax.Array | None = None, frozen: Any = None,
                    model_params: ModelParams | None = None, params_rng: jax.Array | None = None
                    ) -> tuple[Any, Metrics]:
    """Gradient of the mean token loss over the whole batch, accumulated over microbatches.

    Returns (grads with the params' structure, the family's metrics + "tokens"). With `accum_steps`
    > 1 the microbatch gradients are summed in float32 and divided by the batch's total weight once,
    so the result equals the single-pass gradient (auxiliary statistics such as MoE router losses are
    then per-microbatch statistics, weighted by the microbatches' weights). `rng` feeds training
    randomness (MoE router jitter); each microbatch folds in its index. With `model_params` the gradient
    is taken with respect to `params` of the loss at `model_params(frozen, params, params_rng)` (LoRA:
    the adapters, through the merged weights).
    """
    total_weight = jnp.maximum(jnp.sum(batch.weights), 1.0)
    if model_params is None:
        grad_fn = jax.grad(lambda p, b, r: family.loss(model, p, b, z_loss, r), has_aux=True)
    else:
        grad_fn = jax.grad(lambda p, b, r: family.loss(model, model_params(frozen, p, params_rng), b, z_loss, r),
                           has_aux=True)
    if accum_steps == 1:
        grads, sums = grad_fn(params, batch, rng)
    else:
        micros = split_microbatches(batch, accum_steps)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        sum_shapes = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micros), rng)[1])
        init = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sum_shapes))

        def body(carry: tuple[Any, Sums], xs: tuple[jax.Array, BatchT]) -> tuple[tuple[Any, Sums], None]:
            g_acc, sums_acc = carry
            i, micro = xs
            g, sums = grad_fn(params, micro, None if rng is None else jax.random.fold_in(rng, i))
            g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
            return (g_acc, jax.tree.map(jnp.add, sums_acc, sums)), None

        (grads, sums), _ = jax.lax.scan(body, init, (jnp.arange(accum_steps), micros))
    grads = jax.tree.map(lambda g, p: (g / total_weight).astype(p.dtype), grads, params)
    return grads, {**family.metrics(sums, total_weight), "tokens": total_weight}


PARAMS_KEY = 0x10A4  # folded into the step's key for `model_params` randomness (LoRA dropout)


def make_train_step(family: TrainObjective[BatchT], model: nn.Module, tx: optax.GradientTransformation, z_loss: float,
                    accum_steps: int, model_params: ModelParams | None = None
                    ) -> Callable[[TrainState, BatchT], tuple[TrainState, Metrics]]:
    """train_step(state, batch) -> (new state, metrics): one optimizer update on the global batch.
    `model_params`: see `batch_gradients` (its rng: the step's key with `PARAMS_KEY` folded in)."""

    def train_step(state: TrainState, batch: BatchT) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step) if family.uses_rng else None
        params_rng = None
        if model_params is not None:
            params_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), PARAMS_KEY)
        grads, metrics = batch_gradients(family, model, state.params, batch, z_loss, accum_steps, rng,
                                         state.frozen, model_params, params_rng)
        with jax.named_scope("optimizer"):  # the names profiles attribute ops by (`llmjax bench --profile`)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        with jax.named_scope("metrics"):
            metrics["grad_norm"] = optax.tree.norm(grads)
            metrics["param_norm"] = optax.tree.norm(params)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(family: TrainObjective[BatchT], model: nn.Module) -> Callable[[Params, BatchT], Metrics]:
    """eval_step(params, batch) -> the family's evaluation sums (nll_sum, weight_sum, ...), added over batches."""

    def eval_step(params: Params, batch: BatchT) -> Metrics:
        return family.eval_sums(model, params, batch)

    return eval_step
