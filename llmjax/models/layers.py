"""Building blocks of the models: linear maps, norms, embeddings, RoPE, MLPs (attention: `models.attention`).

Conventions
- Shape suffixes: B batch, L query length, S key length, D model width, H query heads,
  K key/value heads, G query heads per key/value head (H = K * G), E head dim, F MLP width,
  V vocabulary.
- Every parameter is created with logical axis names (`nn.with_logical_partitioning`);
  activations are constrained with `llmjax.parallel.rules.constrain`. Which mesh axes
  those names map to is decided by the rule table, never here.
- Parameters live in `param_dtype`; matmuls take inputs in `compute_dtype` and always
  accumulate in float32 (`preferred_element_type`), which is both more accurate and, on
  CPUs with AMX and on accelerators, the fast path for bfloat16. Their backward matmuls stay in
  the compute dtype too (`llmjax.kernels.matmul`: the float32 output gradient is cast down).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.kernels import matmul
from llmjax.kernels.fp8 import fp8_matmul
from llmjax.parallel.rules import constrain

Initializer = Any


def dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def logical_init(init: Initializer, axes: tuple[str | None, ...]) -> Callable[..., jax.Array]:
    """`nn.with_logical_partitioning(init, axes)`, typed as `Module.param` hands it back.

    The initializer returns a `LogicallyPartitioned` box, but `param` (unbox=True) strips the
    box and returns the bare array; flax's annotations say the box, so the cast says the array.
    """
    return cast(Callable[..., jax.Array], nn.with_logical_partitioning(init, axes))


class Linear(nn.Module):
    """x[..., *in] @ kernel[*in, *out] -> [..., *out], with logical names on the kernel.

    `kernel_axes` names the kernel's dimensions (inputs first, then outputs);
    `n_in` is how many trailing dimensions of x are contracted. `fp8`: the matmul runs in float8
    (`llmjax.kernels.fp8.fp8_matmul`, float32 accumulation) on the compute-dtype operands.
    """

    out_shape: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    n_in: int = 1
    use_bias: bool = False
    init_std: float = 0.02
    compute_dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    output_dtype: Any = None  # default: compute_dtype
    fp8: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.n_in :]
        kernel = self.param(
            "kernel",
            logical_init(nn.initializers.normal(self.init_std), self.kernel_axes),
            (*in_shape, *self.out_shape),
            self.param_dtype,
        )
        # A plain 2-D matmul: XLA:CPU runs the backward of rank-3+ dot_generals ~2x slower,
        # and on accelerators the reshapes are free. Merged dims keep their major dim's sharding.
        lead = x.shape[: x.ndim - self.n_in]
        x2 = x.reshape(math.prod(lead), math.prod(in_shape)).astype(self.compute_dtype)
        k2 = kernel.reshape(math.prod(in_shape), math.prod(self.out_shape)).astype(self.compute_dtype)
        if self.fp8:
            y = fp8_matmul(x2, k2).reshape(*lead, *self.out_shape)
        else:
            y = matmul.dot_general(x2, k2, (((1,), (0,)), ((), ()))).reshape(*lead, *self.out_shape)
        if self.use_bias:
            bias = self.param(
                "bias",
                logical_init(nn.initializers.zeros, self.kernel_axes[self.n_in :]),
                self.out_shape,
                self.param_dtype,
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(self.output_dtype or self.compute_dtype)


def dense_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The `Linear` settings of the model's dense layers (attention projections, MLPs): bias, dtypes, and
    float8 matmuls with `model.matmul_dtype=fp8` (the LM head and the router build their own)."""
    return dict(use_bias=cfg.use_bias, compute_dtype=dtype(cfg.compute_dtype), param_dtype=dtype(cfg.param_dtype),
                fp8=cfg.matmul_dtype == "fp8")


def _scale_init(offset: float) -> Initializer:
    """A norm's scale starts at 1 - offset, so that (offset + scale) = 1: the identity."""
    return nn.initializers.constant(1.0 - offset)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis, computed in float32, times (scale_offset + scale)."""

    eps: float = 1e-5
    compute_dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scale_offset: float = 0.0  # Gemma: 1 (the stored scale is the deviation from 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", logical_init(_scale_init(self.scale_offset), ("norm",)), (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        factor = scale.astype(jnp.float32) + self.scale_offset if self.scale_offset else scale.astype(jnp.float32)
        return (y * factor).astype(self.compute_dtype)


class LayerNorm(nn.Module):
    """Mean/variance norm with scale and bias over the last axis, computed in float32."""

    eps: float = 1e-5
    compute_dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scale_offset: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        ones, zeros = _scale_init(self.scale_offset), nn.initializers.zeros
        scale = self.param("scale", logical_init(ones, ("norm",)), (d,), self.param_dtype)
        bias = self.param("bias", logical_init(zeros, ("norm",)), (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        factor = scale.astype(jnp.float32) + self.scale_offset
        return (y * factor + bias.astype(jnp.float32)).astype(self.compute_dtype)


def make_norm(cfg: ModelConfig, name: str, kind: str | None = None) -> nn.Module:
    """The norm `kind` (default `model.norm`) with the model's epsilon, dtypes and `norm_scale_offset`."""
    cls = RMSNorm if (kind or cfg.norm) == "rmsnorm" else LayerNorm
    return cls(eps=cfg.norm_eps, compute_dtype=dtype(cfg.compute_dtype), param_dtype=dtype(cfg.param_dtype),
               scale_offset=cfg.norm_scale_offset, name=name)


class Embed(nn.Module):
    """Token embedding table [V, D]; `attend` gives tied output logits."""

    num_embeddings: int
    features: int
    axes: tuple[str | None, str | None] = ("vocab", "embed")
    init_std: float = 0.02
    compute_dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding",
            logical_init(nn.initializers.normal(self.init_std), self.axes),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids [...] int -> [..., D] in compute dtype.

        The table is gathered whole (vocab dimension unsplit) before the lookup: a gather
        from a vocab-split table makes GSPMD rematerialise it anyway, less predictably.
        """
        table = constrain(self.embedding, (None, "act_embed"))
        return jnp.take(table, ids, axis=0).astype(self.compute_dtype)

    def attend(self, x_BLD: jax.Array) -> jax.Array:
        """x [B, L, D] -> logits [B, L, V] in float32."""
        return matmul.einsum("bld,vd->blv", x_BLD.astype(self.compute_dtype), self.embedding.astype(self.compute_dtype))


@jax.named_scope("rope")  # the name profiles attribute these ops by (no effect on the computation)
def apply_rope(x_BLHE: jax.Array, positions_BL: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, rotate-half convention (as in HF LLaMA), computed in float32.

    x [B, L, H, E] -> [B, L, H, E]; positions [B, L] int (position within its document).
    """
    half = x_BLHE.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions_BL.astype(jnp.float32)[:, :, None, None] * freqs  # [B, L, 1, half]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x = x_BLHE.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLHE.dtype)


def mlp_matrices(mlp: str) -> int:
    """Dense matrices in one MLP block: 3 for gated (swiglu, geglu), 2 otherwise (gelu, relu)."""
    return 3 if mlp in ("swiglu", "geglu") else 2


_ACTIVATIONS = {"swiglu": nn.silu, "geglu": nn.gelu, "gelu": nn.gelu, "relu": nn.relu}


class MLP(nn.Module):
    """Feed-forward block: gated (SwiGLU/GeGLU: act(x W0) * (x W1)) or plain (GELU/ReLU)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        cfg = self.cfg
        common = dense_kwargs(cfg)
        act = _ACTIVATIONS[cfg.mlp]
        h = act(Linear((cfg.d_ff,), ("embed", "mlp"), init_std=cfg.init_std, name="wi_0", **common)(x_BLD))
        if mlp_matrices(cfg.mlp) == 3:
            h = h * Linear((cfg.d_ff,), ("embed", "mlp"), init_std=cfg.init_std, name="wi_1", **common)(x_BLD)
        h = constrain(h, ("act_batch", "act_length", "act_mlp"))
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        return Linear((cfg.d_model,), ("mlp", "embed"), init_std=out_std, name="wo", **common)(h)

