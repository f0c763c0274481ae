"""Parameter roles, derived from logical axis names alone (never from leaf names).

Every parameter is created with logical axis names (`nn.with_logical_partitioning`); its
role follows from them, after dropping the stacking axes (`layers`, `stage`):

  norm       any `norm` axis                                  RMSNorm/LayerNorm scales and biases
  router     any `router` axis                                MoE router kernel [embed, router]
  embedding  (vocab|position, embed)                          lookup tables (tokens, learned positions)
  head       (embed, vocab)                                   an untied output projection
  expert     an `expert` axis and, besides it, `embed` and another feature axis: routed expert matrices
  matrix     `embed` and at least one other feature axis       attention q/k/v/o, MLP wi/wo, shared experts
  bias       anything else (no `embed`, or `embed` alone)      biases of matrices, experts included

Weight decay, int8 quantization, parameter counts (and, later, muP and LoRA targets) all
read this one classification (`param_roles`), so a new module only has to name its axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec

Role = Literal["embedding", "head", "matrix", "expert", "router", "norm", "bias"]
ROLES: tuple[str, ...] = ("embedding", "head", "matrix", "expert", "router", "norm", "bias")
STACK_AXES = ("layers", "stage")  # stacking dimensions: one slice per layer (or stage), not a feature
DECAYED_ROLES = frozenset({"matrix", "expert", "head", "router"})  # + "embedding" with optim.decay_embeddings
QUANTIZED_ROLES = frozenset({"matrix", "expert", "head", "embedding"})  # the router stays float (routing)


def role_of(axes: Sequence[str | None]) -> Role:
    """The role of a parameter whose dimensions carry the logical names `axes` (see the module docstring).

    Raises ValueError for a parameter without names (every parameter must have them)."""
    names = [a for a in axes if a not in STACK_AXES]
    if not names or any(a is None for a in names):
        raise ValueError(f"parameter with logical axes {tuple(axes)}: every dimension needs a logical name")
    if "norm" in names:
        return "norm"
    if "router" in names:
        return "router"
    if len(names) == 2 and names[0] in ("vocab", "position") and names[1] == "embed":
        return "embedding"
    if names == ["embed", "vocab"]:
        return "head"
    features = [a for a in names if a != "expert"]
    if "embed" in features and len(features) >= 2:
        return "expert" if "expert" in names else "matrix"
    return "bias"


def _specs_are_leaves(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def param_roles(logical_specs: Any) -> Any:
    """A tree of logical PartitionSpecs (`nn.get_partition_spec` of the boxed params) -> a tree of roles."""
    return jax.tree.map(lambda spec: role_of(tuple(spec)), logical_specs, is_leaf=_specs_are_leaves)


def logical_axes(logical_specs: Any) -> Any:
    """The same tree with each spec as a plain tuple of names (a leaf-friendly form)."""
    return jax.tree.map(tuple, logical_specs, is_leaf=_specs_are_leaves)


def boxed_roles(boxed_params: Any) -> Any:
    """Roles of the parameters of `model.init(...)` (or its `jax.eval_shape`), still boxed."""
    return param_roles(nn.get_partition_spec(boxed_params))


def decay_mask(roles: Any, decay_embeddings: bool) -> Any:
    """Tree of bools like `roles`: which parameters get weight decay (matrices, experts, the head and the
    router; embeddings only with `decay_embeddings`; never norms or biases)."""
    decayed = DECAYED_ROLES | ({"embedding"} if decay_embeddings else set())
    return jax.tree.map(lambda r: r in decayed, roles)


def contracted_axes(axes: Sequence[str | None], role: str) -> tuple[int, ...] | None:
    """Dimensions an int8 scale is shared over (one scale per output channel), or None to keep a leaf in float.

    Embedding tables [V, D] get one scale per row (token). A matrix whose first feature axis is `embed`
    maps from the model width (q/k/v, MLP inputs, experts' wi, the head): its `embed` dimension is
    contracted; otherwise it maps *to* the model width (o, MLP/expert wo) and every feature dimension but
    the last (`embed`) is contracted. Stacking and expert dimensions keep their own scales."""
    if role not in QUANTIZED_ROLES:
        return None
    feature = [i for i, a in enumerate(axes) if a not in STACK_AXES and a != "expert"]
    if role == "embedding":
        return (feature[-1],)
    if axes[feature[0]] == "embed":
        return (feature[0],)
    return tuple(feature[:-1])


def describe_decay(roles: Any, mask: Any) -> str:
    """One log line: the parameter paths that are weight-decayed and those that are not."""
    on: list[str] = []
    off: list[str] = []
    for (path, decayed), role in zip(jax.tree_util.tree_flatten_with_path(mask)[0], jax.tree.leaves(roles),
                                     strict=True):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        (on if decayed else off).append(f"{name} ({role})")
    return f"weight decay on {len(on)} tensors: {', '.join(on) or 'none'}; not decayed: {', '.join(off) or 'none'}"
