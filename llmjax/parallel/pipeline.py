"""Pipeline parallelism in pure SPMD: a stack of identical units split into stages over a mesh axis.

Notation: S stages (`mesh.pipeline`), R repeats (`pipeline.repeats`), M microbatches
(`pipeline.microbatches`), N stacked units (layers, or MoE layer groups), U = N / (S R) units
per stage and repeat. Unit n belongs to repeat r = n // (S U) and stage s = (n // U) % S, so
stage s holds the R non-adjacent groups [(r S + s) U, (r S + s + 1) U), r < R (R = 1: one
contiguous block of N / S units, the plain GPipe split).

Schedule (GPipe order; circular when R > 1). The batch is cut into M microbatches (rows m,
m + M, ...: each device keeps its own rows). The schedule is a `lax.scan` over
T = R M + S - 1 iterations; in each, every stage runs at once, as a `vmap` over a leading
stage dimension that is sharded over the stage mesh axes (`spmd_axis_name`), so each device
runs only its own stage. Stage s at iteration t works on microbatch (t - s) mod M of repeat
(t - s) // M when 0 <= t - s < R M; otherwise it is idle (it computes on a don't-care value
whose result never reaches the output; these idle slots are the bubble, a fraction
(S - 1) / (R M + S - 1) of the stage-iterations). Outputs move to the next stage by a roll of
the stage dimension, which XLA lowers to one collective-permute. The last stage's output
lands, through the same roll, on stage 0's device, in a buffer of M microbatch slots (seeded
with the inputs) from which stage 0 reads its next input: microbatch m's next repeat is read
M - S + 1 iterations after it was written, hence R > 1 needs M >= S. After the last
iteration the buffer holds the outputs of the final repeat. Gradients come from autodiff
through the scan (the backward pass runs the schedule in reverse, permutes reversed).

Memory per device: the stage's parameters and optimizer state (1/S of the stack's), plus the
activations saved for the backward pass, T iterations x U units x one microbatch, i.e.
(R M + S - 1) / (S R M) of the unpipelined stack's for the same per-device batch, plus the
input/output buffer (one activation of the device's rows). Each stage's work in one iteration
is one remat region under the caller's policy (`remat_policy`), so remat trades those saved
activations for recomputation as in the unpipelined model.

Parameters stay in the stacked [N, ...] layout (checkpoints are layout-independent), their
leading dimension split over the stage axes: device s holds units [s N / S, (s + 1) N / S).
With R = 1 that is exactly stage s's block and the [N] -> [S, U] reshape moves nothing. With
R > 1 stage s needs the groups s, S + s, ... instead of its contiguous block, so every step
reshards the stacked unit parameters between the pipeline devices before the schedule (an
all-to-all of up to (S - 1) / S of each device's unit parameters) and their gradients back
after the backward pass (the same volume); the optimizer state stays in the contiguous layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from llmjax.parallel.rules import constrain, constrain_leading, stage_mesh_axes

# stage_fn(unit params (leaves [U, ...]), x [b, ...], side arrays ([b, ...] each), index of the stage's first
# unit in the whole stack (int32 scalar), microbatch index (int32 scalar)) -> (y like x, aux: leaves [U, ...] or None)
StageFn = Callable[[Any, jax.Array, tuple[jax.Array, ...], jax.Array, jax.Array], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A pipeline schedule: `stages` x `repeats` unit groups, `microbatches` per batch (hashable)."""

    stages: int
    microbatches: int = 1
    repeats: int = 1

    @property
    def iterations(self) -> int:
        """Steps of the schedule: R M + S - 1."""
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        """Idle fraction of the stage-iterations: (S - 1) / (R M + S - 1)."""
        return (self.stages - 1) / self.iterations

    def describe(self) -> str:
        S, M, R = self.stages, self.microbatches, self.repeats
        kind = f"circular, {R} repeats" if R > 1 else "GPipe"
        return (f"pipeline: {S} stages ({kind}), {M} microbatches, {self.iterations} iterations; "
                f"bubble (S-1)/(R*M+S-1) = {S - 1}/{self.iterations} = {self.bubble:.1%}")


# Primitives that only move or re-view data: their outputs are cheap to recompute.
_DATA_MOVEMENT = frozenset({"dynamic_slice", "gather", "slice", "squeeze", "reshape", "broadcast_in_dim", "transpose",
                            "convert_element_type", "copy"})


def _without_data_movement(policy: Callable[..., bool] | None) -> Callable[..., bool]:
    """A remat policy: what `policy` saves (None: everything), except outputs of data-movement primitives.

    With R > 1 each iteration slices its repeat's parameters out of the loop-invariant stage
    parameters; saving those slices (or views of them) for the backward pass would keep T
    copies of a repeat's parameters. Recomputing them costs copies, no arithmetic."""

    def saveable(prim: Any, *args: Any, **params: Any) -> bool:
        return prim.name not in _DATA_MOVEMENT and (policy is None or policy(prim, *args, **params))

    return saveable


def stage_params(params: Any, schedule: Schedule) -> Any:
    """Stacked unit parameters (leaves [N, ...]) -> leaves [S, R, U, ...], stage dimension split over
    the stage axes (free for R = 1; an all-to-all over the pipeline devices for R > 1, see the module
    docstring)."""
    S, R = schedule.stages, schedule.repeats

    def split(a: jax.Array) -> jax.Array:
        U = a.shape[0] // (S * R)
        return constrain_leading(a.reshape(R, S, U, *a.shape[1:]).swapaxes(0, 1), "stage")

    return jax.tree.map(split, params)


def unstage(tree: Any) -> Any:
    """Leaves [S, R, U, ...] -> [N, ...] in stack order (the inverse of `stage_params`'s reshape)."""
    return jax.tree.map(lambda a: a.swapaxes(0, 1).reshape(-1, *a.shape[3:]), tree)


def _to_microbatches(x: jax.Array, M: int, axes: Sequence[str | None]) -> jax.Array:
    """[B, ...] -> [M, B / M, ...]; microbatch m takes rows m, m + M, ... (no data movement)."""
    x = x.reshape(x.shape[0] // M, M, *x.shape[1:]).swapaxes(0, 1)
    return constrain(x, (None, *axes))


def _from_microbatches(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """The inverse of `_to_microbatches`."""
    return constrain(x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), axes)


def _bcast(v: jax.Array, like: jax.Array) -> jax.Array:
    """[S] -> broadcastable against an array with a leading stage dimension."""
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def run(schedule: Schedule, stage_fn: StageFn, params: Any, x: jax.Array, side: tuple[jax.Array, ...],
        x_axes: Sequence[str | None], side_axes: Sequence[Sequence[str | None]],
        remat_policy: Callable[..., bool] | None = None) -> tuple[jax.Array, Any]:
    """Apply the N stacked units to `x` with the pipeline `schedule` (see the module docstring).

    params: leaves [N, ...], the leading (`layers`) dimension split over the stage axes.
    x: [B, ...] activations with logical axes `x_axes` (B over the batch axes); B divisible by M.
    side: per-row inputs of every unit ([B, ...] each, logical axes `side_axes`: e.g. segment ids),
      which follow their rows through the microbatches.
    stage_fn: applies one stage's U units (see `StageFn`); it must return its aux (or None) with the
      same structure whatever its inputs. Each stage's work in each iteration is one remat region
      (`jax.checkpoint`) that saves what `remat_policy` saves (None: everything) except the outputs of
      data-movement primitives (parameter slices); stage_fn should not checkpoint again inside.
    Returns (y [B, ...] like x, aux with leaves [N, ...] in stack order: each unit's aux averaged
    over the M microbatches, or None when stage_fn returns None).
    """
    S, M, R = schedule.stages, schedule.microbatches, schedule.repeats
    if x.shape[0] % M:
        raise ValueError(f"pipeline: batch of {x.shape[0]} rows is not divisible by {M} microbatches")
    if R > 1 and M < S:
        raise ValueError(f"pipeline: {R} repeats need at least as many microbatches ({M}) as stages ({S})")
    units = jax.tree.leaves(params)[0].shape[0]
    if units % (S * R):
        raise ValueError(f"pipeline: {units} units are not divisible by {S} stages x {R} repeats")
    U = units // (S * R)

    staged = stage_params(params, schedule)  # [S, R, U, ...]
    x_M = _to_microbatches(x, M, x_axes)
    side_M = tuple(_to_microbatches(a, M, ax) for a, ax in zip(side, side_axes, strict=True))

    def on_stages(a: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        return constrain(a, ("act_stage", *axes))

    def one_stage(p_RU: Any, r: jax.Array, x_b: jax.Array, side_b: tuple[jax.Array, ...], first: jax.Array,
                  m: jax.Array) -> tuple[jax.Array, Any]:
        if R == 1:  # a static slice: no per-iteration gather of the stage's parameters
            p_U = jax.tree.map(lambda a: a[0], p_RU)
        else:
            p_U = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, r, 0, keepdims=False), p_RU)
        return stage_fn(p_U, x_b, side_b, first, m)

    saveable = _without_data_movement(remat_policy)
    all_stages = jax.vmap(jax.checkpoint(one_stage, policy=saveable, prevent_cse=False),
                          spmd_axis_name=stage_mesh_axes())
    stage_ids = jnp.arange(S, dtype=jnp.int32)
    is_first = stage_ids == 0

    # Stage 0's buffer of microbatch slots: every device holds a copy, only stage 0's is read.
    buf = on_stages(jnp.broadcast_to(x_M, (S, *x_M.shape)), (None, *x_axes))
    state = on_stages(jnp.where(_bcast(is_first, buf[:, 0]), buf[:, 0], jnp.zeros_like(buf[:, 0])), x_axes)

    zero_i = jnp.zeros((), jnp.int32)
    aux_shape = jax.eval_shape(
        lambda: stage_fn(jax.tree.map(lambda a: a[0, 0], staged), x_M[0], tuple(a[0] for a in side_M), zero_i,
                         zero_i)[1])
    aux_acc = jax.tree.map(lambda s: jnp.zeros((S, R, *s.shape), s.dtype), aux_shape)

    def iteration(carry: tuple[jax.Array, jax.Array, Any], t: jax.Array) -> tuple[tuple[jax.Array, jax.Array, Any],
                                                                                    None]:
        state, buf, aux_acc = carry
        k = t - stage_ids  # [S]: position of each stage's work in its microbatch stream
        valid = (k >= 0) & (k < R * M)
        m = jnp.mod(k, M)
        r = jnp.clip(k // M, 0, R - 1)
        first_unit = (r * S + stage_ids) * U
        side_S = tuple(on_stages(jnp.take(a, m, axis=0), ax) for a, ax in zip(side_M, side_axes, strict=True))
        out, aux = all_stages(staged, r, state, side_S, first_unit, m)
        # Stage s -> s + 1, and the last stage -> stage 0's device: one collective-permute.
        rolled = on_stages(jnp.roll(on_stages(out, x_axes), 1, axis=0), x_axes)
        k_last = t - (S - 1)  # the last stage's output (of microbatch k_last mod M) goes to its slot
        slot = jnp.mod(k_last, M)

        def write(b: jax.Array, v: jax.Array) -> jax.Array:
            old = jax.lax.dynamic_index_in_dim(b, slot, 0, keepdims=False)
            return jax.lax.dynamic_update_index_in_dim(b, jnp.where(k_last >= 0, v, old), slot, 0)

        buf = on_stages(jax.vmap(write)(buf, rolled), (None, *x_axes))
        nxt = jax.lax.dynamic_index_in_dim(buf, jnp.mod(t + 1, M), 1, keepdims=False)
        state = on_stages(jnp.where(_bcast(is_first, rolled), nxt, rolled), x_axes)
        if aux is not None:
            aux = jax.tree.map(lambda a: jnp.where(_bcast(valid, a), a, jnp.zeros_like(a)), aux)
            aux_acc = jax.tree.map(
                lambda acc, a: jax.vmap(lambda c, i, v: c.at[i].add(v))(acc, r, a), aux_acc, aux)
        return (state, buf, aux_acc), None

    (state, buf, aux_acc), _ = jax.lax.scan(iteration, (state, buf, aux_acc), jnp.arange(schedule.iterations))
    y = _from_microbatches(constrain(buf[0], (None, *x_axes)), x_axes)
    aux = None if aux_shape is None else unstage(jax.tree.map(lambda a: a / M, aux_acc))
    return y, aux
