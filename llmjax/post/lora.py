"""LoRA (Hu et al. 2021): low-rank adapters as their own parameter tree, merged into the frozen base in the step.

A targeted matrix W (a `matrix` or `expert` role from `llmjax.models.roles`; which ones,
`lora.targets`: q/k/v/o by their module name under an attention module, `mlp` for the dense
MLP and shared-expert matrices, `experts` for the routed experts) has dimensions
[stack..., in..., out...]: the stacking axes (layers, stage, expert) lead, and the input
features are its `embed` axis when that comes first (q/k/v, MLP wi, experts' wi), else every
feature axis but the last (o, wo: [heads, head_dim] or [mlp] -> embed), as for int8 scales. Its
adapter is A [stack..., in..., rank] and B [stack..., rank, out...]; the model runs with
W + (alpha / rank) A B, formed once per step inside the jitted step (`merge`), so the model code
is unchanged. A and B carry the base matrix's logical axes (plus `lora_rank`, replicated), so
they are sharded like W. B starts at zero: step 0 computes exactly the base model.

Memory: the base weights are held once (frozen, no gradient or optimizer state); A, B and their
optimizer state are small. The merged weights of the targeted matrices exist for the step
(one transient copy of those matrices), and the backward pass forms their full-size gradient
before projecting it onto A and B, so the compute per step is that of full fine-tuning minus
the optimizer update of the base.

Adapters tree: the base tree's path to each targeted leaf, the leaf replaced by {"a": A, "b": B}
(e.g. adapters["layers"]["attn"]["q"]["kernel"]["a"]).

A task head that an objective adds to the model (a parameter with a logical axis in `WHOLE_AXES`:
the reward model's `score` [D, 1]) has no pre-trained value to keep: it starts from the seed, so
LoRA trains it whole, next to the adapters (its leaf in the adapters tree at its own path, starting
from the base's value; `merge` puts it in place of the base's).
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import PartitionSpec

from llmjax.config import ConfigError
from llmjax.config.post_training import LORA_TARGETS, LoraConfig
from llmjax.models.roles import STACK_AXES, logical_axes

RANK_AXIS = "lora_rank"
WHOLE_AXES = ("score",)  # logical axes of task heads LoRA trains whole (module docstring)
ATTENTION_PROJECTIONS = ("q", "k", "v", "o")


def target_name(path: tuple[str, ...], role: str) -> str | None:
    """The `lora.targets` name a parameter answers to, or None (norms, embeddings, head, router, biases)."""
    if role == "expert":
        return "experts"
    if role != "matrix" or len(path) < 3:
        return None
    if path[-3].endswith("attn") and path[-2] in ATTENTION_PROJECTIONS:
        return path[-2]
    if "mlp" in path or "shared" in path:
        return "mlp"
    return None


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted matrix: its path, shape, logical axes and how its dimensions split."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    n_stack: int  # leading stacking dimensions
    n_in: int  # input feature dimensions after them; the rest are outputs

    @property
    def in_size(self) -> int:
        n = 1
        for d in self.shape[self.n_stack:self.n_stack + self.n_in]:
            n *= d
        return n

    def a_shape(self, rank: int) -> tuple[int, ...]:
        return (*self.shape[:self.n_stack + self.n_in], rank)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        return (*self.shape[:self.n_stack], rank, *self.shape[self.n_stack + self.n_in:])

    def a_axes(self) -> tuple[str, ...]:
        return (*self.axes[:self.n_stack + self.n_in], RANK_AXIS)

    def b_axes(self) -> tuple[str, ...]:
        return (*self.axes[:self.n_stack], RANK_AXIS, *self.axes[self.n_stack + self.n_in:])

    def equation(self) -> str:
        """einsum of A, B -> delta W (e.g. 'abz,azcd->abcd' for q [layers, embed, heads, head_dim])."""
        letters = string.ascii_lowercase
        s, i = self.n_stack, self.n_in
        names = letters[:len(self.shape)]
        stack, ins, outs = names[:s], names[s:s + i], names[s + i:]
        return f"{stack}{ins}z,{stack}z{outs}->{names}"


def _split(axes: tuple[str, ...], path: tuple[str, ...]) -> tuple[int, int]:
    n_stack = 0
    while n_stack < len(axes) and (axes[n_stack] in STACK_AXES or axes[n_stack] == "expert"):
        n_stack += 1
    features = axes[n_stack:]
    if any(a in STACK_AXES or a == "expert" for a in features) or len(features) < 2:
        raise ValueError(f"LoRA: {'/'.join(path)} has axes {axes}: stacking axes must lead, then >= 2 feature axes")
    n_in = 1 if features[0] == "embed" else len(features) - 1
    return n_stack, n_in


class LoraPlan:
    """Which matrices get adapters, and how to initialise, lay out and merge them."""

    def __init__(self, cfg: LoraConfig, shapes: Any, logical: Any, roles: Any):
        self.cfg = cfg
        self.scale = cfg.alpha / cfg.rank
        unknown = [t for t in cfg.targets if t not in LORA_TARGETS]
        if unknown or not cfg.targets:
            raise ConfigError(f"lora.targets: {unknown or cfg.targets!r}: each target is one of "
                              f"{', '.join(LORA_TARGETS)}")
        flat_shapes = traverse_util.flatten_dict(shapes)
        flat_axes = traverse_util.flatten_dict(logical_axes(logical), is_leaf=lambda _, x: isinstance(x, tuple))
        flat_roles = traverse_util.flatten_dict(roles)
        # task heads trained whole: path -> (shape, logical axes, role)
        self.whole: dict[tuple[str, ...], tuple[tuple[int, ...], tuple[str, ...], str]] = {
            path: (tuple(shape.shape), tuple(flat_axes[path]), flat_roles[path]) for path, shape in flat_shapes.items()
            if any(a in WHOLE_AXES for a in flat_axes[path])}
        self.targets: list[Target] = []
        for path, shape in flat_shapes.items():
            name = target_name(path, flat_roles[path])
            if name is None or name not in cfg.targets:
                continue
            axes = tuple(flat_axes[path])
            self.targets.append(Target(path, tuple(shape.shape), axes, *_split(axes, path)))
        if not self.targets:
            found = sorted({n for p, r in flat_roles.items() if (n := target_name(p, r)) is not None})
            raise ConfigError(f"lora.targets={cfg.targets}: no parameter of this model matches (its targetable "
                              f"matrices: {', '.join(found) or 'none'})")
        matched = {n for t in self.targets if (n := target_name(t.path, flat_roles[t.path])) is not None}
        missing = [t for t in cfg.targets if t not in matched]
        if missing:
            raise ConfigError(f"lora.targets: {', '.join(missing)} match no parameter of this model (matched: "
                              f"{', '.join(sorted(matched))})")

    # ------------------------------------------------------------------ trees
    def _tree(self, leaf: Any, whole: Any) -> Any:
        flat = {(*t.path, k): leaf(t, k) for t in self.targets for k in ("a", "b")}
        return traverse_util.unflatten_dict({**flat, **{p: whole(p, *v) for p, v in self.whole.items()}})

    def abstract(self, dtype: Any) -> Any:
        """ShapeDtypeStructs of the adapters (and the heads trained whole)."""
        r = self.cfg.rank
        return self._tree(lambda t, k: jax.ShapeDtypeStruct(t.a_shape(r) if k == "a" else t.b_shape(r), dtype),
                          lambda p, shape, axes, role: jax.ShapeDtypeStruct(shape, dtype))

    def logical(self) -> Any:
        """PartitionSpecs of logical names: the base matrix's axes, `lora_rank` for the rank (a head: its own)."""
        return self._tree(lambda t, k: PartitionSpec(*(t.a_axes() if k == "a" else t.b_axes())),
                          lambda p, shape, axes, role: PartitionSpec(*axes))

    def roles(self) -> Any:
        """Every adapter matrix has the `matrix` role (weight decay as for the matrices it adapts); a head its own."""
        return self._tree(lambda t, k: "matrix", lambda p, shape, axes, role: role)

    def init(self, rng: jax.Array, dtype: Any, base: Any = None) -> Any:
        """A ~ N(0, 1 / in_features), B = 0 (so the adapted model starts as the base); a head trained whole starts
        as the base's (`base`: the base parameters; needed when the model has such a head)."""
        r = self.cfg.rank
        out = {}
        for i, t in enumerate(self.targets):
            a = jax.random.normal(jax.random.fold_in(rng, i), t.a_shape(r), jnp.float32) / jnp.sqrt(t.in_size)
            out[(*t.path, "a")] = a.astype(dtype)
            out[(*t.path, "b")] = jnp.zeros(t.b_shape(r), dtype)
        if self.whole:
            assert base is not None, "LoraPlan.init: a head trained whole starts from the base's value"
            flat_base = traverse_util.flatten_dict(base)
            out.update({p: flat_base[p].astype(dtype) for p in self.whole})
        return traverse_util.unflatten_dict(out)

    # ------------------------------------------------------------------ merge
    def delta(self, t: Target, a: jax.Array, b: jax.Array) -> jax.Array:
        """(alpha / rank) A B in W's shape, float32."""
        return self.scale * jnp.einsum(t.equation(), a.astype(jnp.float32), b.astype(jnp.float32))

    def merge(self, base: Any, adapters: Any, rng: jax.Array | None = None) -> Any:
        """The adapted model's parameters: W + (alpha / rank) A B for every target, the rest of `base` as is.
        With `rng` and `lora.dropout` > 0, each input feature of A is dropped with that probability (scaled by
        1 / (1 - p)), one mask per matrix (and stacked layer) for the whole step."""
        flat = traverse_util.flatten_dict(base)
        flat_ad = traverse_util.flatten_dict(adapters)
        p = self.cfg.dropout
        for i, t in enumerate(self.targets):
            a, b = flat_ad[(*t.path, "a")], flat_ad[(*t.path, "b")]
            if rng is not None and p > 0:
                keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1 - p, (*a.shape[:-1], 1))
                a = jnp.where(keep, a / (1 - p), 0).astype(a.dtype)
            w = flat[t.path]
            flat[t.path] = (w.astype(jnp.float32) + self.delta(t, a, b)).astype(w.dtype)
        for path in self.whole:  # a head trained whole replaces the base's
            flat[path] = flat_ad[path].astype(flat[path].dtype)
        return traverse_util.unflatten_dict(flat)

    def describe(self) -> str:
        n = sum(_size(t.a_shape(self.cfg.rank)) + _size(t.b_shape(self.cfg.rank)) for t in self.targets)
        names = ", ".join("/".join(t.path[:-1]) for t in self.targets)
        heads = "".join(f"; {'/'.join(p)} {list(v[0])} trained whole" for p, v in self.whole.items())
        return (f"LoRA rank {self.cfg.rank}, alpha {self.cfg.alpha} (scale {self.scale:g}), dropout "
                f"{self.cfg.dropout}: {n:,} adapter parameters on {len(self.targets)} matrices ({names}){heads}; "
                "base weights frozen")


def _size(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
