"""int4 weight-only quantization with group-wise scales, for inference (`--quant int4`).

The leaves quantized are the ones int8 quantizes (`llmjax.models.roles.contracted_axes`: every
attention and MLP matrix, routed expert, the untied output head and every embedding table; norms,
biases and the MoE router stay float). A leaf's contracted (input) dimensions, flattened, are cut
into groups of `group_size` consecutive inputs; each group of each output channel (per layer and
per expert) has its own float32 scale:

    scale = max |w| over the group / 7,   q = clip(round(w / scale), -7, 7),   w ~ q * scale

Symmetric, without a zero point: a trained weight group is close to zero-centred, the dequantization
is one multiply (no zero point to store, add or pack), and GPTQ's error compensation (`llmjax.infer.gptq`)
recovers more than an asymmetric grid would. Every weight satisfies |w - q * scale| <= scale / 2.

Storage: two 4-bit values per byte (`pack`), packed along the group dimension, so a [D, F] float32
matrix takes D*F/2 bytes plus 4 * D*F/group_size bytes of scales (about 1/7 of float32 at group 128).
`jnp.int4` exists, but XLA:CPU stores it one value per byte (measured: a 1,024-element int4 array
takes 1,024 bytes on the device), so the packed form is the one that saves memory on every backend.
The model code is unchanged: `dequantize` unpacks and rescales inside the jitted step, as int8 does.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

QMAX = 7  # symmetric 4-bit grid: -7 .. 7 (the code -8 is never produced)


@struct.dataclass
class Int4Weight:
    """One int4 leaf. `packed` uint8 [*pre, groups, group_size / 2, *post]: two codes per byte (low nibble the
    even input, high nibble the odd one); `scale` float32 [*pre, groups, 1, *post]. `shape`: the float leaf's
    shape; `start`/`stop`: its contracted dimensions [start, stop) (flattened into groups x group_size)."""

    packed: jax.Array
    scale: jax.Array
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    start: int = struct.field(pytree_node=False)
    stop: int = struct.field(pytree_node=False)

    @property
    def group_size(self) -> int:
        return 2 * self.packed.shape[self.start + 1]


def contraction_span(reduce: tuple[int, ...]) -> tuple[int, int]:
    """The contracted dimensions as a half-open span [start, stop) (they are consecutive for every role)."""
    start, stop = min(reduce), max(reduce) + 1
    if tuple(range(start, stop)) != tuple(sorted(reduce)):
        raise ValueError(f"int4: contracted dimensions {reduce} are not consecutive")
    return start, stop


def grouped(w: jax.Array, start: int, stop: int, group_size: int) -> jax.Array:
    """w [*pre, *contracted, *post] -> [*pre, groups, group_size, *post] (contracted dims flattened, cut in groups)."""
    n = math.prod(w.shape[start:stop])
    if n % group_size:
        raise ValueError(f"int4: {n} inputs are not a multiple of the group size {group_size}")
    return w.reshape(*w.shape[:start], n // group_size, group_size, *w.shape[stop:])


def group_scales(g: jax.Array, axis: int) -> jax.Array:
    """max |w| / 7 over `axis` (kept), float32; an all-zero group gets scale 1."""
    s = jnp.max(jnp.abs(g.astype(jnp.float32)), axis=axis, keepdims=True) / QMAX
    return jnp.where(s == 0, 1.0, s)


def round_to_grid(w: jax.Array, scale: jax.Array) -> jax.Array:
    """int32 codes in [-7, 7]: round(w / scale), clipped."""
    return jnp.clip(jnp.round(w.astype(jnp.float32) / scale), -QMAX, QMAX).astype(jnp.int32)


def pack(codes: jax.Array, axis: int) -> jax.Array:
    """int codes in [-8, 7], even length along `axis` -> uint8 with half that length (pairs along `axis`)."""
    n = codes.shape[axis]
    if n % 2:
        raise ValueError(f"int4: cannot pack an odd length {n}")
    pairs = codes.reshape(*codes.shape[:axis], n // 2, 2, *codes.shape[axis + 1:]).astype(jnp.int32) & 0xF
    lo, hi = jnp.take(pairs, 0, axis=axis + 1), jnp.take(pairs, 1, axis=axis + 1)
    return (lo | (hi << 4)).astype(jnp.uint8)


def unpack(packed: jax.Array, axis: int) -> jax.Array:
    """Inverse of `pack`: uint8 -> int32 codes in [-8, 7], twice the length along `axis`."""
    x = packed.astype(jnp.int32)
    lo, hi = x & 0xF, x >> 4
    lo, hi = lo - 16 * (lo >= 8), hi - 16 * (hi >= 8)
    both = jnp.stack([lo, hi], axis=axis + 1)
    return both.reshape(*packed.shape[:axis], 2 * packed.shape[axis], *packed.shape[axis + 1:])


def quantize_leaf(w: jax.Array, reduce: tuple[int, ...], group_size: int) -> Int4Weight:
    """Round-to-nearest int4 of one float leaf whose contracted dimensions are `reduce`."""
    start, stop = contraction_span(reduce)
    g = grouped(w, start, stop, group_size)
    scale = group_scales(g, start + 1)
    return Int4Weight(pack(round_to_grid(g, scale), start + 1), scale, tuple(w.shape), start, stop)


def from_codes(codes: jax.Array | np.ndarray, scale: jax.Array | np.ndarray, shape: tuple[int, ...],
               start: int, stop: int) -> Int4Weight:
    """An `Int4Weight` from grouped codes [*pre, groups, group_size, *post] and their scales (GPTQ's output)."""
    return Int4Weight(pack(jnp.asarray(codes), start + 1), jnp.asarray(scale, jnp.float32), tuple(shape), start,
                      stop)


def dequantize_leaf(x: Int4Weight, dtype: Any = jnp.float32) -> jax.Array:
    """codes * scale in `dtype`, in the float leaf's shape."""
    w = unpack(x.packed, x.start + 1).astype(jnp.float32) * x.scale
    return w.reshape(x.shape).astype(dtype)


def check_group_size(group_size: int) -> str | None:
    """Why `group_size` cannot be used (None if it can): it must be a positive even number (two codes a byte)."""
    if group_size <= 0 or group_size % 2:
        return f"must be a positive even number (two 4-bit values share a byte), got {group_size}"
    return None
