"""int8 weight-only quantization with per-channel scales, for inference.

Every matrix (Linear kernels, embedding tables, the LM head) is stored as int8 values and
one float32 scale per output channel: scale = max |w| over the input (contracted)
dimensions / 127, q = round(w / scale). Norm scales and biases stay in float. The model
code is unchanged: `dequantize` rebuilds float weights inside the jitted function, so only
the int8 copy is held between calls (the memory saved is that of the stored weights).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _reduce_axes(path: tuple[str, ...], ndim: int) -> tuple[int, ...] | None:
    """Input (contracted) axes of a weight, or None to leave it in float."""
    name = path[-1]
    lead = 1 if "layers" in path else 0  # the stacked `layers` axis keeps one scale per layer
    if name == "embedding":  # [V, D]: one scale per row (token / position), used by lookups and tied logits
        return (ndim - 1,)
    if name != "kernel":
        return None
    if len(path) >= 2 and path[-2] == "o":  # [N, H, E, D]
        return (lead, lead + 1)
    return (lead,)  # [N, D, ...out] / [D, V]


def _path_names(path: Any) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def quantize(params: Any) -> Any:
    """Float params -> the same tree with each matrix replaced by {"int8": q, "scale": s} (s keeps dims)."""

    def q(path, w):
        axes = _reduce_axes(_path_names(path), w.ndim)
        if axes is None or w.ndim < 2:
            return w
        w32 = w.astype(jnp.float32)
        scale = jnp.max(jnp.abs(w32), axis=axes, keepdims=True) / 127.0
        scale = jnp.where(scale == 0, 1.0, scale)
        return {"int8": jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8), "scale": scale}

    return jax.tree_util.tree_map_with_path(q, params)


def _is_q(x: Any) -> bool:
    return isinstance(x, dict) and set(x) == {"int8", "scale"}


def dequantize(qparams: Any, dtype: Any = jnp.float32) -> Any:
    """Inverse of `quantize` (up to rounding): int8 * scale in `dtype`."""
    return jax.tree.map(lambda x: (x["int8"].astype(jnp.float32) * x["scale"]).astype(dtype) if _is_q(x) else x,
                        qparams, is_leaf=_is_q)


def nbytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
