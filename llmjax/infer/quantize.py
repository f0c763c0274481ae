"""int8 weight-only quantization with per-channel scales, for inference.

Which leaves are quantized, and over which dimensions a scale is shared, follows from each
parameter's role and logical axes (`llmjax.models.roles.contracted_axes`): every matrix
(attention and MLP kernels, routed experts, the output head) and every embedding table is
stored as int8 values and one float32 scale per output channel (per layer and per expert):
scale = max |w| over the contracted dimensions / 127, q = round(w / scale). Norms, biases and
the MoE router stay in float. The model code is unchanged: `dequantize` rebuilds float weights
inside the jitted function, so only the int8 copy is held between calls.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from llmjax.models.roles import contracted_axes, role_of


def quantize(params: Any, logical_specs: Any) -> Any:
    """Float params -> the same tree with each quantized leaf replaced by {"int8": q, "scale": s} (s keeps
    dims). `logical_specs`: the params' logical PartitionSpecs (`AbstractParams.logical`)."""
    specs = jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    leaves, treedef = jax.tree.flatten(params)

    def q(w: jax.Array, spec: PartitionSpec) -> Any:
        axes = tuple(spec)
        reduce = contracted_axes(axes, role_of(axes))
        if reduce is None:
            return w
        w32 = w.astype(jnp.float32)
        scale = jnp.max(jnp.abs(w32), axis=reduce, keepdims=True) / 127.0
        scale = jnp.where(scale == 0, 1.0, scale)
        return {"int8": jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8), "scale": scale}

    return jax.tree.unflatten(treedef, [q(w, s) for w, s in zip(leaves, specs, strict=True)])


def _is_q(x: Any) -> bool:
    return isinstance(x, dict) and set(x) == {"int8", "scale"}


def dequantize(qparams: Any, dtype: Any = jnp.float32) -> Any:
    """Inverse of `quantize` (up to rounding): int8 * scale in `dtype`."""
    return jax.tree.map(lambda x: (x["int8"].astype(jnp.float32) * x["scale"]).astype(dtype) if _is_q(x) else x,
                        qparams, is_leaf=_is_q)


def quantized_paths(qparams: Any) -> list[str]:
    """'/'-joined paths of the quantized leaves (to report what was quantized)."""
    flat = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=_is_q)[0]
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path, x in flat if _is_q(x)]


def nbytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
