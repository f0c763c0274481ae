"""Weight-only quantization for inference: int8 per channel, and the entry points of int4 (`llmjax.infer.int4`).

Which leaves are quantized, and over which dimensions a scale is shared, follows from each
parameter's role and logical axes (`llmjax.models.roles.contracted_axes`): every matrix
(attention and MLP kernels, routed experts, the output head) and every embedding table is
stored as int8 values and one float32 scale per output channel (per layer and per expert):
scale = max |w| over the contracted dimensions / 127, q = round(w / scale). Norms, biases and
the MoE router stay in float. The model code is unchanged: `dequantize` rebuilds float weights
inside the jitted function, so only the int8 copy is held between calls.

`--quant int4` quantizes the same leaves to 4 bits with one scale per group of inputs
(`llmjax.infer.int4`); `--quant int4-gptq` chooses the same grid's codes with GPTQ (`llmjax.infer.gptq`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from llmjax.config import ConfigError
from llmjax.infer.int4 import Int4Weight, check_group_size, dequantize_leaf, quantize_leaf
from llmjax.models.roles import contracted_axes, role_of

METHODS = ("none", "int8", "int4", "int4-gptq")  # `--quant`


def _specs(logical_specs: Any) -> list[PartitionSpec]:
    return jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def quantized_axes(spec: PartitionSpec) -> tuple[int, ...] | None:
    """The contracted dimensions of a leaf with logical axes `spec`, or None when the leaf stays float."""
    axes = tuple(spec)
    return contracted_axes(axes, role_of(axes))


def quantize(params: Any, logical_specs: Any) -> Any:
    """Float params -> the same tree with each quantized leaf replaced by {"int8": q, "scale": s} (s keeps
    dims). `logical_specs`: the params' logical PartitionSpecs (`AbstractParams.logical`)."""
    specs = _specs(logical_specs)
    leaves, treedef = jax.tree.flatten(params)

    def q(w: jax.Array, spec: PartitionSpec) -> Any:
        reduce = quantized_axes(spec)
        if reduce is None:
            return w
        w32 = w.astype(jnp.float32)
        scale = jnp.max(jnp.abs(w32), axis=reduce, keepdims=True) / 127.0
        scale = jnp.where(scale == 0, 1.0, scale)
        return {"int8": jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8), "scale": scale}

    return jax.tree.unflatten(treedef, [q(w, s) for w, s in zip(leaves, specs, strict=True)])


def quantize_int4(params: Any, logical_specs: Any, group_size: int, codes: dict[int, Int4Weight] | None = None
                  ) -> Any:
    """Float params -> the same tree with each quantized leaf an `Int4Weight` (round to nearest, `group_size`
    inputs a scale), or `codes[i]` for the i-th leaf (in `jax.tree.leaves` order) where given (GPTQ's)."""
    leaves, treedef = jax.tree.flatten(params)
    out = []
    for i, (w, spec) in enumerate(zip(leaves, _specs(logical_specs), strict=True)):
        reduce = quantized_axes(spec)
        if reduce is None:
            out.append(w)
        else:
            out.append(codes[i] if codes and i in codes else quantize_leaf(w, reduce, group_size))
    return jax.tree.unflatten(treedef, out)


def int4_widths(shapes: Any, logical_specs: Any) -> list[tuple[str, int]]:
    """(path, contracted width) of every leaf int4 would quantize; `shapes`: arrays or ShapeDtypeStructs."""
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    out = []
    for (path, x), spec in zip(flat, _specs(logical_specs), strict=True):
        reduce = quantized_axes(spec)
        if reduce is not None:
            out.append(("/".join(str(getattr(k, "key", k)) for k in path), int(np.prod([x.shape[d] for d in reduce]))))
    return out


def _is_q(x: Any) -> bool:
    return isinstance(x, Int4Weight) or (isinstance(x, dict) and set(x) == {"int8", "scale"})


def dequantize(qparams: Any, dtype: Any = jnp.float32) -> Any:
    """Inverse of `quantize` / `quantize_int4` (up to rounding): codes * scale in `dtype`."""
    def deq(x: Any) -> Any:
        if isinstance(x, Int4Weight):
            return dequantize_leaf(x, dtype)
        if _is_q(x):
            return (x["int8"].astype(jnp.float32) * x["scale"]).astype(dtype)
        return x

    return jax.tree.map(deq, qparams, is_leaf=_is_q)


def quantized_paths(qparams: Any) -> list[str]:
    """'/'-joined paths of the quantized leaves (to report what was quantized)."""
    flat = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=_is_q)[0]
    return ["/".join(str(getattr(k, "key", k)) for k in path) for path, x in flat if _is_q(x)]


def nbytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


@dataclasses.dataclass(frozen=True)
class QuantOptions:
    """What `--quant` and its options ask for: `method` one of METHODS; int4's `group_size`; GPTQ's calibration
    sequences and damping."""

    method: str = "none"
    group_size: int = 128
    calib_sequences: int = 256
    damp: float = 0.01

    def check(self) -> QuantOptions:
        """ConfigError naming the option when a value cannot be used (before any workdir is read)."""
        if self.method not in METHODS:
            raise ConfigError(f"--quant: unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.method.startswith("int4"):
            why = check_group_size(self.group_size)
            if why:
                raise ConfigError(f"--quant-group-size {why}")
        if self.method == "int4-gptq":
            if self.calib_sequences < 1:
                raise ConfigError(f"--calib-sequences must be >= 1, got {self.calib_sequences}")
            if not (math.isfinite(self.damp) and 0 < self.damp <= 1):
                raise ConfigError(f"--gptq-damp must be in (0, 1], got {self.damp}")
        return self

    def check_widths(self, shapes: Any, logical_specs: Any, cfg: Any) -> None:
        """ConfigError naming --quant-group-size and the first leaf whose input width it does not divide."""
        if not self.method.startswith("int4"):
            return
        widths = int4_widths(shapes, logical_specs)
        bad = [(path, w) for path, w in widths if w % self.group_size]
        if bad:
            path, w = bad[0]
            fits = math.gcd(*(w for _, w in widths))
            raise ConfigError(
                f"--quant-group-size {self.group_size} does not divide the input width {w} of {path} "
                f"(model.d_model={cfg.d_model}, model.d_ff={cfg.d_ff})"
                + (f"; every width is a multiple of {fits}: use an even divisor of it" if fits % 2 == 0 else ""))
