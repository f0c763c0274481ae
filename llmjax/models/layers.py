"""Building blocks of a decoder: linear maps, norms, embeddings, RoPE, attention, MLPs.

Conventions
- Shape suffixes: B batch, L query length, S key length, D model width, H query heads,
  K key/value heads, G query heads per key/value head (H = K * G), E head dim, F MLP width,
  V vocabulary.
- Every parameter is created with logical axis names (`nn.with_logical_partitioning`);
  activations are constrained with `llmjax.parallel.rules.constrain`. Which mesh axes
  those names map to is decided by the rule table, never here.
- Parameters live in `param_dtype`; matmuls take inputs in `compute_dtype` and always
  accumulate in float32 (`preferred_element_type`), which is both more accurate and, on
  CPUs with AMX and on accelerators, the fast path for bfloat16.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.parallel.rules import constrain

Initializer = Any
NEG_INF = -1e30


def dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


class Linear(nn.Module):
    """x[..., *in] @ kernel[*in, *out] -> [..., *out], with logical names on the kernel.

    `kernel_axes` names the kernel's dimensions (inputs first, then outputs);
    `n_in` is how many trailing dimensions of x are contracted.
    """

    out_shape: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    n_in: int = 1
    use_bias: bool = False
    init_std: float = 0.02
    compute_dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    output_dtype: Any = None  # default: compute_dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.n_in :]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.kernel_axes),
            (*in_shape, *self.out_shape),
            self.param_dtype,
        )
        # A plain 2-D matmul: XLA:CPU runs the backward of rank-3+ dot_generals ~2x slower,
        # and on accelerators the reshapes are free. Merged dims keep their major dim's sharding.
        lead = x.shape[: x.ndim - self.n_in]
        x2 = x.reshape(math.prod(lead), math.prod(in_shape)).astype(self.compute_dtype)
        k2 = kernel.reshape(math.prod(in_shape), math.prod(self.out_shape)).astype(self.compute_dtype)
        y = jnp.matmul(x2, k2, preferred_element_type=jnp.float32).reshape(*lead, *self.out_shape)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[self.n_in :]),
                self.out_shape,
                self.param_dtype,
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(self.output_dtype or self.compute_dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis, computed in float32."""

    eps: float = 1e-5
    compute_dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(self.compute_dtype)


class LayerNorm(nn.Module):
    """Mean/variance norm with scale and bias over the last axis, computed in float32."""

    eps: float = 1e-5
    compute_dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        ones, zeros = nn.initializers.ones, nn.initializers.zeros
        scale = self.param("scale", nn.with_logical_partitioning(ones, ("norm",)), (d,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(zeros, ("norm",)), (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.compute_dtype)


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    cls = RMSNorm if cfg.norm == "rmsnorm" else LayerNorm
    return cls(eps=cfg.norm_eps, compute_dtype=dtype(cfg.compute_dtype), param_dtype=dtype(cfg.param_dtype), name=name)


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
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), self.axes),
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
        return jnp.einsum(
            "bld,vd->blv",
            x_BLD.astype(self.compute_dtype),
            self.embedding.astype(self.compute_dtype),
            preferred_element_type=jnp.float32,
        )


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


def attention_mask(segment_ids_BL: jax.Array, kv_segment_ids_BS: jax.Array | None = None,
                   q_offset: jax.Array | int = 0) -> jax.Array:
    """Causal mask restricted to tokens of the same document: [B, 1, L, S] bool.

    Query i may attend to key j iff j <= i + q_offset and both belong to the same segment.
    `q_offset` is the slot of the first query in the key sequence (a KV cache's fill level;
    0 when queries and keys are the same tokens).
    """
    kv = segment_ids_BL if kv_segment_ids_BS is None else kv_segment_ids_BS
    L, S = segment_ids_BL.shape[1], kv.shape[1]
    causal = (jnp.arange(L) + q_offset)[:, None] >= jnp.arange(S)[None, :]
    same_doc = segment_ids_BL[:, :, None] == kv[:, None, :]
    return (causal[None] & same_doc)[:, None]


def dot_product_attention(q_BLHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, mask_B1LS: jax.Array,
                          impl: str = "einsum") -> jax.Array:
    """Grouped-query attention; returns [B, L, H, E] in the inputs' dtype.

    H query heads share K key/value heads in groups of G = H / K (MHA: K = H, MQA: K = 1).
    Scores and softmax are float32. `impl="dot_product_attention"` uses
    `jax.nn.dot_product_attention` (XLA on CPU, cuDNN where the GPU supports it).
    """
    B, L, H, E = q_BLHE.shape
    S, K = k_BSKE.shape[1], k_BSKE.shape[2]
    if impl == "dot_product_attention":
        return jax.nn.dot_product_attention(q_BLHE, k_BSKE, v_BSKE, mask=mask_B1LS).astype(q_BLHE.dtype)
    # Heads-major layout, so both contractions are plain batched matmuls over (B, K): on
    # XLA:CPU this is ~2x faster than the equivalent 5-D einsum, forward and backward.
    G = H // K
    q_BKXE = q_BLHE.reshape(B, L, K, G, E).transpose(0, 2, 3, 1, 4).reshape(B, K, G * L, E)  # X = G*L
    k_BKSE = k_BSKE.transpose(0, 2, 1, 3)
    v_BKSE = v_BSKE.transpose(0, 2, 1, 3)
    batch = ((0, 1), (0, 1))
    scores_BKXS = jax.lax.dot_general(q_BKXE, k_BKSE, (((3,), (3,)), batch), preferred_element_type=jnp.float32)
    scores_BKGLS = scores_BKXS.reshape(B, K, G, L, S) * (E**-0.5)
    scores_BKGLS = jnp.where(mask_B1LS[:, :, None], scores_BKGLS, NEG_INF)  # broadcast over K, G
    probs_BKXS = jax.nn.softmax(scores_BKGLS, axis=-1).astype(v_BSKE.dtype).reshape(B, K, G * L, S)
    out_BKXE = jax.lax.dot_general(probs_BKXS, v_BKSE, (((3,), (2,)), batch), preferred_element_type=jnp.float32)
    out_BLKGE = out_BKXE.reshape(B, K, G, L, E).transpose(0, 3, 1, 2, 4)
    return out_BLKGE.reshape(B, L, H, E).astype(q_BLHE.dtype)


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads and optional RoPE."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array, segment_ids_BL: jax.Array, positions_BL: jax.Array,
                 kv_cache: tuple[jax.Array, jax.Array] | None = None, kv_segment_ids_BS: jax.Array | None = None,
                 cache_index: jax.Array | None = None) -> Any:
        """Without `kv_cache`: attention over `x` itself -> [B, L, D].

        With `kv_cache` = (k [B, S, K, E], v [B, S, K, E]): this chunk's keys/values are written
        at slots [cache_index, cache_index + L) and the queries attend over the whole cache,
        masked by `kv_segment_ids_BS` (the cache's segment ids, this chunk's already written;
        0 marks an empty or padding slot) -> ([B, L, D], (new k, new v)).
        """
        cfg = self.cfg
        E, H, K = cfg.resolved_head_dim, cfg.n_heads, cfg.n_kv_heads
        common = dict(
            use_bias=cfg.use_bias, compute_dtype=dtype(cfg.compute_dtype), param_dtype=dtype(cfg.param_dtype)
        )
        q = Linear((H, E), ("embed", "heads", "head_dim"), init_std=cfg.init_std, name="q", **common)(x_BLD)
        k = Linear((K, E), ("embed", "kv_heads", "head_dim"), init_std=cfg.init_std, name="k", **common)(x_BLD)
        v = Linear((K, E), ("embed", "kv_heads", "head_dim"), init_std=cfg.init_std, name="v", **common)(x_BLD)
        q = constrain(q, ("act_batch", "act_length", "act_heads", None))
        k = constrain(k, ("act_batch", "act_length", "act_kv_heads", None))
        v = constrain(v, ("act_batch", "act_length", "act_kv_heads", None))
        if cfg.position == "rope":
            q = apply_rope(q, positions_BL, cfg.rope_theta)
            k = apply_rope(k, positions_BL, cfg.rope_theta)
        if kv_cache is None:
            out = dot_product_attention(q, k, v, attention_mask(segment_ids_BL), cfg.attention)
            new_cache = None
        else:
            cache_axes = ("act_batch", None, "act_kv_heads", None)
            start = (0, cache_index, 0, 0)
            k_all = jax.lax.dynamic_update_slice(kv_cache[0], k.astype(kv_cache[0].dtype), start)
            v_all = jax.lax.dynamic_update_slice(kv_cache[1], v.astype(kv_cache[1].dtype), start)
            k_all, v_all = constrain(k_all, cache_axes), constrain(v_all, cache_axes)
            mask = attention_mask(segment_ids_BL, kv_segment_ids_BS, cache_index)
            out = dot_product_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask, cfg.attention)
            new_cache = (k_all, v_all)
        out = constrain(out, ("act_batch", "act_length", "act_heads", None))
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        out = Linear((cfg.d_model,), ("heads", "head_dim", "embed"), n_in=2, init_std=out_std, name="o", **common)(out)
        return out if kv_cache is None else (out, new_cache)


_ACTIVATIONS = {"swiglu": nn.silu, "geglu": nn.gelu, "gelu": nn.gelu, "relu": nn.relu}


class MLP(nn.Module):
    """Feed-forward block: gated (SwiGLU/GeGLU: act(x W0) * (x W1)) or plain (GELU/ReLU)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        cfg = self.cfg
        common = dict(
            use_bias=cfg.use_bias, compute_dtype=dtype(cfg.compute_dtype), param_dtype=dtype(cfg.param_dtype)
        )
        act = _ACTIVATIONS[cfg.mlp]
        h = act(Linear((cfg.d_ff,), ("embed", "mlp"), init_std=cfg.init_std, name="wi_0", **common)(x_BLD))
        if cfg.mlp in ("swiglu", "geglu"):
            h = h * Linear((cfg.d_ff,), ("embed", "mlp"), init_std=cfg.init_std, name="wi_1", **common)(x_BLD)
        h = constrain(h, ("act_batch", "act_length", "act_mlp"))
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        return Linear((cfg.d_model,), ("mlp", "embed"), init_std=out_std, name="wo", **common)(h)

