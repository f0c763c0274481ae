"""Context parallelism's layout: the sequence split over the `context` mesh axis, load-balanced for causal masks.

The logical axis `act_length` maps to the context axes (`mesh.context`, default rule `("context",)`), so
every [B, L, ...] activation is split along L. Causal attention does uneven work along L (the last
tokens see every key), so the sequence is not split into C contiguous pieces but into 2C chunks of
c = L / (2C) tokens, and device i holds chunks i and 2C-1-i (a front and a back chunk: each device
has the same causal work). Training and evaluation batches arrive in this *balanced* order: the host
permutes every row's fields (`balance_rows`, a numpy gather of the sequence axis) before they go on the
devices (`Setup.put_batch`), so the model moves nothing, and the loss (a sum over tokens whose targets
and weights travel with the inputs) needs no inverse. A caller that hands `Transformer` natural-order
rows (the preference and RL objectives, which build their `LMBatch` on device) gets them moved on entry
(`ContextPlan.balance`: two `ppermute`s, no gather) and the hidden states moved back before the output
head (`unbalance`). RoPE reads the true positions, which travel with the tokens; attention
(`llmjax.kernels.context`) knows each token's slot from `local_slots`.

`plan(L)` is None (no context parallelism) outside `use_sharding`, with a context axis of size 1,
or when L does not divide into 2C chunks (e.g. an evaluation prompt of another length: it then
runs unsplit, which is correct, only not balanced).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from llmjax.parallel.rules import Rules, current_sharding, logical_to_spec


@dataclasses.dataclass(frozen=True)
class ContextPlan:
    """The sequence of length `length` split over mesh axes `axes` (`size` devices) in 2 x size chunks."""

    mesh: Mesh
    rules: Rules
    axes: tuple[str, ...]
    size: int
    length: int

    @property
    def chunk(self) -> int:
        """c = L / (2C): tokens per chunk."""
        return self.length // (2 * self.size)

    def spec(self, names: tuple[str | None, ...]) -> PartitionSpec:
        """The PartitionSpec of logical `names` under the installed rules (the length dim over `axes`)."""
        return logical_to_spec(names, self.rules)

    def balance(self, x: jax.Array) -> jax.Array:
        """[B, L, ...] natural order -> balanced order (device i: chunks i, 2C-1-i); sharding
        ("act_batch", "act_length", replicated...) in and out."""
        return self._move(x, _balance_local)

    def unbalance(self, x: jax.Array) -> jax.Array:
        """The inverse of `balance`: [B, L, ...] balanced -> natural order."""
        return self._move(x, _unbalance_local)

    def _move(self, x: jax.Array, local: Callable[[jax.Array, tuple[str, ...], int], jax.Array]) -> jax.Array:
        spec = self.spec(("act_batch", "act_length") + (None,) * (x.ndim - 2))
        fn = jax.shard_map(lambda a: local(a, self.axes, self.size), mesh=self.mesh,
                           in_specs=(spec,), out_specs=spec, check_vma=False)
        out: jax.Array = fn(x)
        return out


def plan(length: int) -> ContextPlan | None:
    """The context layout of a sequence of `length` tokens under the installed mesh and rules, or None
    (no sharding installed, context size 1, or `length` not divisible by 2 x the context size)."""
    ctx = current_sharding()
    if ctx is None:
        return None
    mesh, rules = ctx
    axes = tuple(a for a in rules.get("act_length", ()) if mesh.shape.get(a, 1) > 1)
    size = context_size(mesh, rules)
    if size == 1 or length % (2 * size):
        return None
    return ContextPlan(mesh, rules, axes, size, length)


def context_size(mesh: Mesh, rules: Rules) -> int:
    """Devices a sequence splits over under `mesh` and `rules`: the product of the `act_length` axes."""
    return math.prod(mesh.shape.get(a, 1) for a in rules.get("act_length", ()))


def balanced_order(length: int, size: int) -> np.ndarray:
    """[L] int: the natural slot at each index of a balanced row (device d's 2c indices: chunks d, 2C-1-d)."""
    c = length // (2 * size)
    chunks = [k for d in range(size) for k in (d, 2 * size - 1 - d)]
    return np.concatenate([np.arange(k * c, (k + 1) * c) for k in chunks])


def balance_rows(rows: np.ndarray, size: int) -> np.ndarray:
    """Host side: rows [B, L, ...] in natural order -> balanced order over `size` devices (what `balance` does on
    device, as a numpy gather of the sequence axis; `data.seq_len` divisible by 2 x size)."""
    return rows[:, balanced_order(rows.shape[1], size)]


def unbalance_rows(rows: np.ndarray, size: int) -> np.ndarray:
    """The inverse of `balance_rows`."""
    return rows[:, np.argsort(balanced_order(rows.shape[1], size))]


def local_slots(index: jax.Array, size: int, chunk: int) -> jax.Array:
    """Inside shard_map: the natural positions (slots) [2c] of the tokens device `index` holds in balanced
    order: chunk `index` then chunk 2C-1-`index`."""
    ar = jnp.arange(chunk, dtype=jnp.int32)
    return jnp.concatenate([ar + index * chunk, ar + (2 * size - 1 - index) * chunk])


def natural_order(gathered: jax.Array, size: int, axis: int = 1) -> jax.Array:
    """All devices' balanced chunks gathered in device order ([.., 2C c, ..] along `axis`) -> natural order."""
    shape = gathered.shape
    c = shape[axis] // (2 * size)
    g = gathered.reshape(*shape[:axis], size, 2, c, *shape[axis + 1:])
    front = jax.lax.index_in_dim(g, 0, axis + 1, keepdims=False)  # [.., C, c, ..]: chunks 0 .. C-1
    back = jnp.flip(jax.lax.index_in_dim(g, 1, axis + 1, keepdims=False), axis)  # chunks C .. 2C-1
    return jnp.concatenate([front, back], axis).reshape(shape)


def _holder(k: int, size: int) -> int:
    """The device that holds chunk k in balanced order."""
    return k if k < size else 2 * size - 1 - k


def _balance_local(x: jax.Array, axes: tuple[str, ...], size: int) -> jax.Array:
    """Inside shard_map: device j holds natural chunks 2j, 2j+1 -> chunks j, 2C-1-j. Chunks of even index
    travel in one ppermute and odd ones in another (each a permutation of the devices)."""
    first, second = jnp.split(x, 2, axis=1)  # chunk 2j (even), chunk 2j+1 (odd)
    r_even = jax.lax.ppermute(first, axes, [(j, _holder(2 * j, size)) for j in range(size)])
    r_odd = jax.lax.ppermute(second, axes, [(j, _holder(2 * j + 1, size)) for j in range(size)])
    even_device = jax.lax.axis_index(axes) % 2 == 0  # device j's front chunk j has j's parity
    return jnp.where(even_device, jnp.concatenate([r_even, r_odd], 1), jnp.concatenate([r_odd, r_even], 1))


def _unbalance_local(x: jax.Array, axes: tuple[str, ...], size: int) -> jax.Array:
    """Inside shard_map: the inverse of `_balance_local` (the chunk of even index goes home to slot 0)."""
    front, back = jnp.split(x, 2, axis=1)
    even_device = jax.lax.axis_index(axes) % 2 == 0
    even_chunk, odd_chunk = jnp.where(even_device, front, back), jnp.where(even_device, back, front)

    def home(j: int, parity: int) -> int:
        k = j if j % 2 == parity else 2 * size - 1 - j
        return k // 2

    r_even = jax.lax.ppermute(even_chunk, axes, [(j, home(j, 0)) for j in range(size)])
    r_odd = jax.lax.ppermute(odd_chunk, axes, [(j, home(j, 1)) for j in range(size)])
    return jnp.concatenate([r_even, r_odd], 1)
