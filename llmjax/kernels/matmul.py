"""Matmuls with float32 accumulation whose backward stays in the operands' low precision.

`jax.lax.dot_general(a, b, preferred_element_type=float32)` on bfloat16 operands gives a float32
output, so its cotangent is float32 and jax's transpose rule multiplies that float32 cotangent with
the other (bfloat16) operand: XLA promotes both backward matmuls to float32 x float32 (measured in
the deviceless H100 compile of `benchmarks/fp8_hlo.py`: every backward dot of a bfloat16 step), the
slow path on GPU/TPU tensor cores. `dot_general` and `einsum` here are the same forward product
inside a `custom_vjp` whose backward casts the cotangent to the operands' dtype and multiplies with
float32 accumulation again (the usual mixed-precision recipe: bfloat16 x bfloat16 -> float32 in all
three matmuls), returning the gradients in the operands' dtypes, as jax's rule does.

Only operands of one floating dtype narrower than 32 bits take that path; anything else (float32,
mixed dtypes) is the plain `jax.lax.dot_general` / `jnp.einsum` with `preferred_element_type=float32`,
so float32 training is unchanged bit for bit. Float8 matmuls have their own VJP (`llmjax.kernels.fp8`).
"""

from __future__ import annotations

import string
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]


def low_precision(a: jax.Array, b: jax.Array) -> bool:
    """Whether a and b share one floating dtype narrower than float32 (bfloat16, float16)."""
    return (a.dtype == b.dtype and jnp.issubdtype(a.dtype, jnp.floating) and jnp.dtype(a.dtype).itemsize < 4)


def dims_to_spec(dims: DimensionNumbers, a_ndim: int, b_ndim: int) -> str:
    """The einsum spec of `jax.lax.dot_general(a, b, dims)`: output = batch dims, a's free dims, b's free dims."""
    (ca, cb), (ba, bb) = dims
    letters = iter(string.ascii_letters)
    a_spec = [next(letters) for _ in range(a_ndim)]
    b_spec = [next(letters) for _ in range(b_ndim)]
    for i, j in (*zip(ca, cb, strict=True), *zip(ba, bb, strict=True)):
        b_spec[j] = a_spec[i]
    out = ([a_spec[i] for i in ba] + [a_spec[i] for i in range(a_ndim) if i not in (*ca, *ba)]
           + [b_spec[j] for j in range(b_ndim) if j not in (*cb, *bb)])
    return f"{''.join(a_spec)},{''.join(b_spec)}->{''.join(out)}"


def _product(spec: str, dims: DimensionNumbers | None, a: jax.Array, b: jax.Array) -> jax.Array:
    if dims is not None:
        return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _low_precision_product(spec: str, dims: DimensionNumbers | None, a: jax.Array, b: jax.Array) -> jax.Array:
    return _product(spec, dims, a, b)


def _fwd(spec: str, dims: DimensionNumbers | None, a: jax.Array, b: jax.Array) -> tuple[jax.Array, Any]:
    return _product(spec, dims, a, b), (a, b)


def _bwd(spec: str, dims: DimensionNumbers | None, res: Any, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    a, b = res
    ins, out = spec.split("->")
    a_spec, b_spec = ins.split(",")
    g = g.astype(a.dtype)  # the point: a low-precision cotangent, so both products below stay low precision
    da = jnp.einsum(f"{out},{b_spec}->{a_spec}", g, b, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{a_spec},{out}->{b_spec}", a, g, preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


_low_precision_product.defvjp(_fwd, _bwd)


def _transposable(spec: str) -> bool:
    """Each operand's indices all appear in the output or the other operand (no index summed within one operand,
    none repeated), so each gradient is one einsum of the cotangent with the other operand."""
    ins, out = spec.replace(" ", "").split("->")
    a_spec, b_spec = ins.split(",")
    return (len(set(a_spec)) == len(a_spec) and len(set(b_spec)) == len(b_spec)
            and set(a_spec) <= set(out) | set(b_spec) and set(b_spec) <= set(out) | set(a_spec))


def dot_general(a: jax.Array, b: jax.Array, dims: DimensionNumbers) -> jax.Array:
    """`jax.lax.dot_general(a, b, dims, preferred_element_type=float32)` (float32 output, any shapes and
    dimension numbers), with low-precision operands' backward matmuls in their dtype (module docstring)."""
    if not low_precision(a, b):
        return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
    dims = (tuple(map(tuple, dims[0])), tuple(map(tuple, dims[1])))  # type: ignore[assignment]  # hashable
    return _low_precision_product(dims_to_spec(dims, a.ndim, b.ndim), dims, a, b)


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`jnp.einsum(spec, a, b, preferred_element_type=float32)` for an explicit two-operand spec ("...->..."),
    with low-precision operands' backward matmuls in their dtype (module docstring)."""
    if not (low_precision(a, b) and "->" in spec and "." not in spec and _transposable(spec)):
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return _low_precision_product(spec.replace(" ", ""), None, a, b)
