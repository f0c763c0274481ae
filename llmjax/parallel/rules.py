"""Logical axis names and the one table that maps them to mesh axes.

Model code names every parameter dimension and key activation dimension with a logical
axis ("embed", "heads", "act_batch", ...). This module turns those names into
`PartitionSpec`s over the mesh axes through a rule table: defaults (`DEFAULT_RULES`), overridden
per experiment by `mesh.rules` in the config. Changing a parallel layout is therefore a
config change, never a model change.

Activations are constrained with `constrain(x, names)`, which reads the mesh and rules
installed by `use_sharding(mesh, rules)`; outside that context it is the identity, so
models run unchanged on one device and in tests.

The default table (`DEFAULT_RULES`, `LOGICAL_AXES`) is declared in `llmjax.config.logical_axes`
(jax-free, so config validation checks `mesh.rules` without jax) and re-exported here.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmjax.config.logical_axes import DEFAULT_RULES, LOGICAL_AXES, Rules, merge_rules

__all__ = ["DEFAULT_RULES", "LOGICAL_AXES", "Rules", "constrain", "constrain_leading", "current_sharding",
           "logical_to_spec", "make_rules", "stage_mesh_axes", "tree_shardings", "unsharded", "use_sharding"]


def make_rules(overrides: dict[str, Any] | None = None, mesh_shape: dict[str, int] | None = None,
               n_kv_heads: int | None = None) -> Rules:
    """Defaults updated by `overrides` ({logical: None | axis | [axes]}).

    Mesh axes absent from `mesh_shape` are dropped. When the "stage" axes have more than one
    device (pipeline parallelism), "layers" follows "stage" unless overridden. When `n_kv_heads` does not divide
    over the tensor axis (e.g. MQA with tensor=2), key/value heads are replicated
    instead of split.
    """
    rules = merge_rules(overrides)
    if mesh_shape is not None and "layers" not in (overrides or {}) and any(
            mesh_shape.get(a, 1) > 1 for a in rules["stage"]):
        # Pipelined: the stacked layer dimension of every parameter is split into the stages.
        rules["layers"] = rules["stage"]
    if mesh_shape is not None:
        rules = {k: tuple(a for a in v if a in mesh_shape) for k, v in rules.items()}
        if n_kv_heads is not None:
            for name in ("kv_heads", "act_kv_heads"):
                split = 1
                for a in rules[name]:
                    split *= mesh_shape[a]
                if n_kv_heads % split:
                    rules[name] = ()
    return rules


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules) -> PartitionSpec:
    """Map logical names of each dimension to a PartitionSpec; a mesh axis is used once at most."""
    if names is None:
        return PartitionSpec()
    used: set[str] = set()
    out: list[Any] = []
    for name in names:
        axes = tuple(a for a in (rules.get(name, ()) if name else ()) if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def tree_shardings(logical_specs: Any, mesh: Mesh, rules: Rules) -> Any:
    """A tree of logical-name PartitionSpecs (from `flax.linen.get_partition_spec`) -> NamedShardings."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, logical_to_spec(tuple(spec), rules)),
        logical_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("llmjax_sharding", default=None)


@contextlib.contextmanager
def use_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Install `mesh` and `rules` for `constrain` while tracing a model under jit."""
    token = _CONTEXT.set((mesh, rules))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


@contextlib.contextmanager
def unsharded() -> Iterator[None]:
    """No installed layout while tracing code that runs per device (inside a `shard_map` body): `constrain`
    is then the identity and kernels do not open shard_maps of their own."""
    token = _CONTEXT.set(None)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_sharding() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) installed by `use_sharding`, or None (one device, tests)."""
    return _CONTEXT.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrain activation `x` (one logical name per dimension) to the installed layout."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} names {tuple(names)} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))


def stage_mesh_axes() -> tuple[str, ...] | None:
    """The mesh axes of the logical "act_stage" axis under the installed layout (None outside it).

    Used as `vmap(..., spmd_axis_name=...)` so constraints inside a function vmapped over
    pipeline stages keep the stage dimension split over those axes."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return None
    return ctx[1].get("act_stage", ()) or None


def constrain_leading(x: jax.Array, name: str) -> jax.Array:
    """Constrain only the leading dimension of `x` to logical axis `name`; the others are left
    to the compiler (`PartitionSpec.UNCONSTRAINED`), e.g. a parameter reshaped to [stage, ...]."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    lead = logical_to_spec((name,), rules)[0]
    spec = PartitionSpec(lead, *([PartitionSpec.UNCONSTRAINED] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
