"""Float8 matmuls for training (`model.matmul_dtype=fp8`): per-tensor current scaling, float32 accumulation.

Each operand is scaled so that its largest magnitude lands on the format's largest finite value
(current scaling: the scale comes from this call's tensor, no state), cast to float8, and the
float8 x float8 product accumulates in float32 (`preferred_element_type`); the output is
multiplied back by the two scales. Forward operands (activations, weights) are e4m3 (3 mantissa
bits, max 448); the incoming output gradient of the backward pass is e5m2 (2 mantissa bits, max
57344: gradients need the range more than the precision), multiplied with the forward's saved
e4m3 operands (e5m2 x e4m3 and e4m3 x e5m2: the pairs H100 tensor cores take). The saved
residuals are the float8 operands, not the inputs.

These are plain `jax.lax.dot_general` / `ragged_dot` calls on jax's float8 dtypes inside a
`custom_vjp` (the recipe of flax's `fp8_ops`, without its delayed-scaling state): XLA lowers
them to float8 GEMMs on Hopper GPUs (cuBLASLt or a Triton GEMM fusion,
`benchmarks/fp8_hlo.py` checks the compiled HLO) and emulates them on CPU, so the numerics are
tested here. Master weights, their gradients and the optimizer stay in `param_dtype`.

A scale is per tensor as the tracer sees it: under GSPMD the amax is global (a max all-reduce, the
same scales as one device); inside `shard_map` (expert parallelism) each shard scales its own block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from llmjax.errors import ConfigError

E4M3 = jnp.float8_e4m3fn  # forward: activations and weights
E5M2 = jnp.float8_e5m2  # backward: the output gradient


def quantize(x: jax.Array, qdtype: Any) -> tuple[jax.Array, jax.Array]:
    """x (any float, any shape) -> (q in `qdtype`, scale float32 []), with x ~= q * scale.

    Per-tensor current scaling: scale = amax(|x|) / finfo(qdtype).max, so the largest magnitude maps
    to the largest finite float8 value; |x / scale| is clipped to that value (saturation: e4m3fn has no
    infinity and would turn an overflow into NaN). An all-zero tensor gets scale 1; a non-finite x
    stays non-finite (the trainer's non-finite check sees it)."""
    x32 = x.astype(jnp.float32)
    fmax = float(jnp.finfo(qdtype).max)
    amax = jnp.max(jnp.abs(x32))
    scale = jnp.where(amax > 0, amax / fmax, jnp.float32(1.0))
    return jnp.clip(x32 / scale, -fmax, fmax).astype(qdtype), scale


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """q (float8) * scale -> float32."""
    return q.astype(jnp.float32) * scale


def _dtype_token(x: jax.Array) -> jax.Array:
    """A 0-d array of x's dtype: residuals must be arrays, and the backward casts its gradients to it."""
    return jnp.zeros((), x.dtype)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int], batch: int) -> jax.Array:
    """dot_general of two float8 operands with `batch` leading batch dims, float32 accumulation."""
    dims = tuple(range(batch))
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), (dims, dims)),
                               preferred_element_type=jnp.float32)


@jax.custom_vjp
def fp8_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., M, K] @ w [..., K, N] -> [..., M, N] float32 (the same leading batch dims on both, or none),
    in float8 (module docstring). Gradients come back in x's and w's dtypes."""
    return _fp8_matmul_fwd(x, w)[0]


def _fp8_matmul_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, Any]:
    nb = x.ndim - 2
    xq, sx = quantize(x, E4M3)
    wq, sw = quantize(w, E4M3)
    y = _dot(xq, wq, (nb + 1, nb), nb) * (sx * sw)
    return y, (xq, sx, wq, sw, _dtype_token(x), _dtype_token(w))


def _fp8_matmul_bwd(res: Any, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    xq, sx, wq, sw, x_dtype, w_dtype = res
    x_dtype, w_dtype = x_dtype.dtype, w_dtype.dtype
    nb = xq.ndim - 2
    gq, sg = quantize(g, E5M2)
    dx = _dot(gq, wq, (nb + 1, nb + 1), nb) * (sg * sw)  # [.., M, N] x [.., K, N] -> [.., M, K]
    dw = _dot(xq, gq, (nb, nb), nb) * (sx * sg)  # [.., M, K] x [.., M, N] -> [.., K, N]
    return dx.astype(x_dtype), dw.astype(w_dtype)


fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


@jax.custom_vjp
def fp8_ragged_dot(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Grouped matmul in float8: rows x [M, K] in consecutive groups of `group_sizes` [G] (int32) times
    their group's w [G, K, N] -> [M, N] float32 (`jax.lax.ragged_dot`; rows past the groups give 0)."""
    return _fp8_ragged_fwd(x, w, group_sizes)[0]


def _fp8_ragged_fwd(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> tuple[jax.Array, Any]:
    xq, sx = quantize(x, E4M3)
    wq, sw = quantize(w, E4M3)
    y = jax.lax.ragged_dot(xq, wq, group_sizes, preferred_element_type=jnp.float32) * (sx * sw)
    return y, (xq, sx, wq, sw, group_sizes, _dtype_token(x), _dtype_token(w))


def _fp8_ragged_bwd(res: Any, g: jax.Array) -> tuple[jax.Array, jax.Array, None]:
    xq, sx, wq, sw, group_sizes, x_dtype, w_dtype = res
    x_dtype, w_dtype = x_dtype.dtype, w_dtype.dtype
    gq, sg = quantize(g, E5M2)
    dx = jax.lax.ragged_dot(gq, jnp.swapaxes(wq, 1, 2), group_sizes, preferred_element_type=jnp.float32)
    # dw[g] = x[rows of g].T @ g[rows of g]: contract the ragged row dimension, one [K, N] per group.
    dims = jax.lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                             lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    dw = jax.lax.ragged_dot_general(xq, gq, group_sizes, dims, preferred_element_type=jnp.float32)
    return (dx * (sg * sw)).astype(x_dtype), (dw * (sx * sg)).astype(w_dtype), None


fp8_ragged_dot.defvjp(_fp8_ragged_fwd, _fp8_ragged_bwd)


def check_backend(devices: Sequence[Any]) -> None:
    """ConfigError naming `model.matmul_dtype` when the devices' backend cannot compile the float8 matmuls
    (forward e4m3 x e4m3 and backward e5m2 x e4m3, float32 accumulation): a tiny probe compiled for
    `devices[0]` (real or compile-only), before anything large is built. CPUs run them emulated."""
    from jax.sharding import SingleDeviceSharding

    dev = devices[0]
    spec = jax.ShapeDtypeStruct((16, 32), jnp.float32, sharding=SingleDeviceSharding(dev))
    try:
        jax.jit(jax.grad(lambda x, w: jnp.sum(fp8_matmul(x, w)), argnums=(0, 1))).lower(
            spec, jax.ShapeDtypeStruct((32, 16), jnp.float32, sharding=SingleDeviceSharding(dev))).compile()
    except Exception as e:  # noqa: BLE001 - backends report unsupported types in many ways
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"model.matmul_dtype=fp8: the {dev.platform} backend ({dev.device_kind}) cannot compile "
                          f"float8 matmuls ({first[:200]}); use model.matmul_dtype=compute") from None
