"""Learning-rate schedules, weight-decay masks, optimizers and optimizer-state shardings.

Everything here works on plain parameter trees (nested dicts of arrays, logical-partition
boxes removed) and the matching tree of parameter roles. Gradient accumulation is not done here:
the train step scans over microbatches itself, so there is no `optax.MultiSteps`.

The learning rate is not stored in the optimizer state; `current_lr` evaluates the same
schedule on the host for logging.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from llmjax.config import ConfigError, OptimConfig, choices
from llmjax.models.roles import decay_mask

SCHEDULES = choices(OptimConfig, "schedule")
OPTIMIZERS = choices(OptimConfig, "name")

# A learning-rate schedule: update count (a Python int or a traced counter) -> learning rate (an `optax.Schedule`).
LRSchedule = Callable[[jax.typing.ArrayLike], jax.Array]
# A parameter's tree path as hashable, type-tagged entries (`_key`).
PathKey = tuple[tuple[str, Any], ...]

# ----------------------------------------------------------------------------- schedules


def _decay_start(cfg: OptimConfig, total_steps: int) -> int:
    """First step of the decay phase: after warmup, or (wsd) the last `decay_fraction` of the run."""
    warmup = warmup_steps(cfg, total_steps)
    if cfg.schedule == "wsd":
        decay_steps = int(round(cfg.decay_fraction * total_steps))
        return max(warmup, total_steps - decay_steps)
    return warmup


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """`optim.warmup_steps`, clamped to the run's length (a warmup longer than the run warms up over all of it;
    `config_warnings` says so)."""
    return min(int(cfg.warmup_steps), int(total_steps))


def make_schedule(cfg: OptimConfig, total_steps: int) -> LRSchedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then the configured decay.

    - `cosine`: half cosine from `lr` at the end of warmup to `lr * min_lr_ratio` at `total_steps`.
    - `linear`: straight line between the same two points.
    - `constant`: `lr` after warmup.
    - `wsd` (warmup-stable-decay, Hägele et al. 2024): `lr` until the last
      `round(decay_fraction * total_steps)` steps, then linear to `lr * min_lr_ratio` at `total_steps`.

    Boundaries: lr(0) = 0 when warmup_steps > 0 (optax counts updates from 0, so the first
    update uses lr 0), lr(warmup_steps) = lr, lr(total_steps) = lr * min_lr_ratio for every
    decaying schedule; steps past `total_steps` keep the final value. Works on Python ints and
    traced step counters alike.
    """
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule: '{cfg.schedule}' is not one of {', '.join(SCHEDULES)}")
    peak = cfg.lr if isinstance(cfg.lr, jax.Array) else float(cfg.lr)  # traced in a packed sweep's program
    final = peak * float(cfg.min_lr_ratio)
    warmup = warmup_steps(cfg, total_steps)
    start = _decay_start(cfg, total_steps)
    length = max(total_steps - start, 1)

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        s = jnp.asarray(step, jnp.float32)
        warm = peak * s / max(warmup, 1)
        frac = jnp.clip((s - start) / length, 0.0, 1.0)
        if cfg.schedule == "constant":
            decayed = jnp.full_like(s, peak)
        elif cfg.schedule == "cosine":
            decayed = final + (peak - final) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        else:  # linear, wsd
            decayed = peak + (final - peak) * frac
        return jnp.where(s < warmup, warm, decayed)

    return schedule


def current_lr(cfg: OptimConfig, total_steps: int, step: int) -> float:
    """The learning rate the optimizer applies at update number `step` (host side, for logging)."""
    return float(make_schedule(cfg, total_steps)(step))


# ----------------------------------------------------------------------------- optimizers


def _adafactor(cfg: OptimConfig, schedule: optax.Schedule, mask: Any) -> optax.GradientTransformation:
    """optax.adafactor's default recipe with decoupled, learning-rate-scaled, masked weight decay.

    `optax.adafactor(weight_decay_rate=...)` adds the decay after the learning-rate scaling, so
    its rate is an absolute per-step shrink (0.1 would remove 10 % of every weight per step).
    Here the same pieces are chained with the decay before the learning rate, as in AdamW:
    update = -lr(t) * (param_scale * clipped_factored_direction + weight_decay * param).
    With weight_decay = 0 this equals `optax.adafactor(learning_rate=schedule)`.
    b1, b2 and eps are not used (optax defaults: decay_rate 0.8, no momentum, eps 1e-30).
    """
    parts = [
        optax.scale_by_factored_rms(),
        optax.clip_by_block_rms(1.0),
        optax.scale_by_param_block_rms(),
    ]
    if cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts)


def _base_optimizer(cfg: OptimConfig, schedule: optax.Schedule, roles: Any) -> optax.GradientTransformation:
    mask = decay_mask(roles, cfg.decay_embeddings)
    if cfg.name == "adamw":
        return optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    if cfg.name == "adafactor":
        return _adafactor(cfg, schedule, mask)
    if cfg.name == "lion":
        return optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask)
    if cfg.name == "sgd":
        return optax.sgd(schedule, momentum=cfg.b1 if cfg.b1 > 0 else None)
    raise ConfigError(f"optim.name: '{cfg.name}' is not one of {', '.join(OPTIMIZERS)}")


def scale_by_tree(factors: Any) -> optax.GradientTransformation:
    """Multiply each leaf's update by its constant factor (a tree of floats like the params); no state."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        return jax.tree.map(lambda u, f: u if f == 1.0 else u * jnp.asarray(f, u.dtype), updates, factors), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: OptimConfig, total_steps: int, roles: Any,
                   lr_multipliers: Any | None = None) -> optax.GradientTransformation:
    """Global-norm clipping (skipped when `clip_norm <= 0`) followed by the configured optimizer.

    `roles` is the tree of parameter roles (`llmjax.models.roles.param_roles`): weight decay applies to
    matrices, experts, the output head and the router, to embeddings only with `decay_embeddings`,
    never to norms and biases (`roles.decay_mask`). `lr_multipliers` (μP, `llmjax.models.mup`): a
    tree of floats like `roles`, each leaf's learning rate / `lr`; the optimizer's updates (weight
    decay included, as optax scales it by the learning rate) are multiplied by them.

    - `adamw`: b1, b2, eps, decoupled weight decay (scaled by the lr) on the decay mask.
    - `adafactor`: see `_adafactor` (factored second moments, lr-scaled masked weight decay).
    - `lion`: b1, b2, masked weight decay (scaled by the lr).
    - `sgd`: plain SGD with heavy-ball momentum b1 (none when b1 == 0); no weight decay.
    """
    schedule = make_schedule(cfg, total_steps)
    tx = _base_optimizer(cfg, schedule, roles)
    if lr_multipliers is not None:
        tx = optax.chain(tx, scale_by_tree(lr_multipliers))
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
    return tx


# ----------------------------------------------------------------------------- shardings


def _key(entry: Any) -> tuple[str, Any]:
    """A hashable, type-tagged form of one tree-path entry."""
    if isinstance(entry, jax.tree_util.DictKey):
        return ("dict", entry.key)
    if isinstance(entry, jax.tree_util.GetAttrKey):
        return ("attr", entry.name)
    if isinstance(entry, jax.tree_util.SequenceKey):
        return ("seq", entry.idx)
    if isinstance(entry, jax.tree_util.FlattenedIndexKey):
        return ("flat", entry.key)
    return ("other", str(entry))


def _param_table(params_shardings: Any, params_shapes: Any) -> dict[PathKey, tuple[tuple[int, ...], Any]]:
    """Map each param path (as `_key` tuples) to (shape, sharding)."""
    shape_leaves, treedef = jax.tree_util.tree_flatten_with_path(params_shapes)
    shardings = treedef.flatten_up_to(params_shardings)  # type: ignore[attr-defined]  # jaxlib has no PyTreeDef stub
    return {
        tuple(_key(e) for e in path): (tuple(leaf.shape), sharding)
        for (path, leaf), sharding in zip(shape_leaves, shardings, strict=True)
    }


def opt_state_shardings(opt_state_shapes: Any, params_shardings: Any, params_shapes: Any, replicated: Any) -> Any:
    """Shardings for an optimizer state, derived from the params' shardings.

    A state leaf whose tree path ends with a param's path and whose shape equals that param's
    shape (Adam's mu/nu, Lion's and SGD's momentum, Adafactor's unfactored `v`) gets the param's
    sharding; everything else (step counts, Adafactor's factored row/column vectors, scalars,
    injected hyperparameters) gets `replicated`. Works for any optax state tree (chains,
    masked states, `inject_hyperparams`).

    Args:
      opt_state_shapes: the abstract optimizer state, e.g. `jax.eval_shape(tx.init, params)`.
      params_shardings: a tree like the params whose leaves are shardings.
      params_shapes: the params' abstract shapes (anything with `.shape`).
      replicated: the sharding for everything that does not mirror a param.
    """
    table = _param_table(params_shardings, params_shapes)
    lengths = sorted({len(p) for p in table}, reverse=True)

    def pick(path: tuple[Any, ...], leaf: Any) -> Any:
        keys = tuple(_key(e) for e in path)
        shape = tuple(getattr(leaf, "shape", ()))
        for n in lengths:
            if n <= len(keys):
                hit = table.get(keys[len(keys) - n :])
                if hit is not None and hit[0] == shape:
                    return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_state_shapes)
