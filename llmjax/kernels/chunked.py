"""Blockwise attention with an online softmax in pure JAX (`model.attention=chunked`).

Flash-attention's algorithm (Dao et al. 2022; Rabe & Staats 2021) written with `lax` loops, so
it runs on every backend: queries are cut into blocks of `Blocks.q`, keys into blocks of
`Blocks.kv`; for each query block a `lax.scan` over the key blocks keeps the running maximum
m, normaliser l and weighted sum of values, rescaled as each block arrives. Only one
[B, K, G, block_q, block_kv] score tile is live at a time, so memory is O(L) instead of the
reference's O(L S). A custom VJP recomputes the tiles in the backward pass from the saved
log-sum-exp (FlashAttention-2's backward), so training is O(L) memory too.

The mask (`MaskSpec`: segment ids, causal, query offset, window) is evaluated per tile, and a
tile that no query of its block may see (causal: all keys in the future; window: all keys too
old; segments: no id in common) is skipped with `lax.cond` (about half the tiles for causal
attention). Sequence lengths need not divide the block sizes: queries and keys are padded
with segment ids that match nothing. A query that may see no key at all gets output 0 (the
reference averages every value instead); real tokens always see themselves.

Sharding: pure jnp/lax code, partitioned by GSPMD like the reference (batch over the data axes,
key/value heads over `tensor`).
"""

from __future__ import annotations

import functools
import math
from typing import cast

import jax
import jax.numpy as jnp

from llmjax.models.attention import NEG_INF, Blocks, MaskSpec, register

PAD_Q_SEGMENT, PAD_KV_SEGMENT = -1, -2  # padding rows/columns: never equal to anything else
_BATCHED = ((0, 1), (0, 1))  # dot_general batch dims (B, K)


def chunked_attention(q_BLHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, mask: MaskSpec, scale: float,
                      blocks: Blocks | None = None) -> jax.Array:
    """Attention of L queries over S keys under `mask`, tile by tile -> [B, L, H, E] in q's dtype.

    q [B, L, H, E], k/v [B, S, K, E] with H = K G. `blocks` sets the tile (default `Blocks()`;
    a block longer than its sequence is shortened to it)."""
    return cast(jax.Array, _tiled(q_BLHE, k_BSKE, v_BSKE, mask, scale, blocks, with_lse=False))


def chunked_attention_lse(q_BLHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, mask: MaskSpec, scale: float,
                          blocks: Blocks | None = None) -> tuple[jax.Array, jax.Array]:
    """`chunked_attention`'s `BlockImpl` (context parallelism's ring): (out [B, L, H, E] in q's dtype, its
    log-sum-exp [B, L, H] float32, NEG_INF for a query that sees no key); the backward takes both cotangents."""
    return cast(tuple[jax.Array, jax.Array], _tiled(q_BLHE, k_BSKE, v_BSKE, mask, scale, blocks, with_lse=True))


def _tiled(q_BLHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, mask: MaskSpec, scale: float,
           blocks: Blocks | None, with_lse: bool) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Tiles the inputs, runs `_blockwise` (or `_blockwise_lse`) and untiles: out [B, L, H, E] (and lse [B, L, H])."""
    blocks = blocks or Blocks()
    B, L, H, E = q_BLHE.shape
    S, K = k_BSKE.shape[1], k_BSKE.shape[2]
    G = H // K
    bq, bkv = min(blocks.q, L), min(blocks.kv, S)
    nq, nk = math.ceil(L / bq), math.ceil(S / bkv)

    q = q_BLHE.reshape(B, L, K, G, E).transpose(0, 2, 3, 1, 4)  # [B, K, G, L, E]
    q = pad_axis(q, 3, nq * bq).reshape(B, K, G, nq, bq, E).transpose(3, 0, 1, 2, 4, 5)  # [nq, B, K, G, bq, E]
    k, v = (pad_axis(x.transpose(0, 2, 1, 3), 2, nk * bkv).reshape(B, K, nk, bkv, E).transpose(2, 0, 1, 3, 4)
            for x in (k_BSKE, v_BSKE))  # [nk, B, K, bkv, E]
    q_seg = pad_axis(mask.q_segment_ids.astype(jnp.int32), 1, nq * bq, PAD_Q_SEGMENT).reshape(B, nq, bq).swapaxes(0, 1)
    kv_seg = pad_axis(mask.kv_segment_ids.astype(jnp.int32), 1, nk * bkv, PAD_KV_SEGMENT).reshape(B, nk, bkv)
    kv_seg = kv_seg.swapaxes(0, 1)
    offset = jnp.asarray(mask.q_offset, jnp.int32)

    static = (scale, mask.causal, mask.window)
    if with_lse:
        out, lse = _blockwise_lse(q, k, v, q_seg, kv_seg, offset, static)  # lse [nq, B, K, G, bq]
    else:
        out = _blockwise(q, k, v, q_seg, kv_seg, offset, static)  # [nq, B, K, G, bq, E]
    out = out.transpose(1, 2, 3, 0, 4, 5).reshape(B, K, G, nq * bq, E)[:, :, :, :L]
    out = out.transpose(0, 3, 1, 2, 4).reshape(B, L, H, E)
    if not with_lse:
        return out
    return out, lse.transpose(1, 0, 4, 2, 3).reshape(B, nq * bq, H)[:, :L]


def pad_axis(x: jax.Array, axis: int, size: int, value: int | float = 0) -> jax.Array:
    """`x` padded with `value` along `axis` to length `size` (tiles of the blockwise kernels)."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


# ----------------------------------------------------------------------------- one tile

Static = tuple[float, bool, int]  # (scale, causal, window)
Arrays3 = tuple[jax.Array, jax.Array, jax.Array]
Arrays4 = tuple[jax.Array, jax.Array, jax.Array, jax.Array]


def _tile_mask(q_seg: jax.Array, kv_seg: jax.Array, q_start: jax.Array, k_start: jax.Array, offset: jax.Array,
               static: Static) -> jax.Array:
    """[B, bq] and [B, bkv] segment ids of one tile -> allowed [B, 1, 1, bq, bkv] (broadcast over K, G)."""
    _, causal, window = static
    allowed = q_seg[:, :, None] == kv_seg[:, None, :]
    q_slot = q_start + offset + jnp.arange(q_seg.shape[1])[:, None]
    k_slot = k_start + jnp.arange(kv_seg.shape[1])[None, :]
    if causal:
        allowed &= (k_slot <= q_slot)[None]
    if window > 0:
        allowed &= (q_slot - k_slot < window)[None]
    return allowed[:, None, None]


def _tile_visible(q_seg: jax.Array, kv_seg: jax.Array, q_start: jax.Array, k_start: jax.Array, offset: jax.Array,
                  static: Static) -> jax.Array:
    """False when no query of the tile may see any of its keys (the tile is skipped)."""
    _, causal, window = static
    bq, bkv = q_seg.shape[1], kv_seg.shape[1]
    first_q, last_q = q_start + offset, q_start + offset + bq - 1
    visible = jnp.any((jnp.min(kv_seg, 1) <= jnp.max(q_seg, 1)) & (jnp.max(kv_seg, 1) >= jnp.min(q_seg, 1)))
    if causal:
        visible &= k_start <= last_q
    if window > 0:
        visible &= first_q - (k_start + bkv - 1) < window
    return visible


def _scores(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
    """q [B, K, G, bq, E], k [B, K, bkv, E] -> float32 scores [B, K, G, bq, bkv]."""
    B, K, G, bq, E = q.shape
    s = jax.lax.dot_general(q.reshape(B, K, G * bq, E), k, (((3,), (3,)), _BATCHED),
                            preferred_element_type=jnp.float32)
    return s.reshape(B, K, G, bq, -1) * scale


def _probs_times(p: jax.Array, v: jax.Array) -> jax.Array:
    """p [B, K, G, bq, bkv], v [B, K, bkv, E] -> float32 [B, K, G, bq, E]."""
    B, K, G, bq, bkv = p.shape
    out = jax.lax.dot_general(p.reshape(B, K, G * bq, bkv), v, (((3,), (2,)), _BATCHED),
                              preferred_element_type=jnp.float32)
    return out.reshape(B, K, G, bq, -1)


# ----------------------------------------------------------------------------- forward and backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _blockwise(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array, kv_seg: jax.Array, offset: jax.Array,
               static: Static) -> jax.Array:
    return _forward(q, k, v, q_seg, kv_seg, offset, static)[0]


def _forward(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array, kv_seg: jax.Array, offset: jax.Array,
             static: Static) -> tuple[jax.Array, jax.Array]:
    """Blocked q [nq, B, K, G, bq, E], k/v [nk, B, K, bkv, E] -> (out like q, log-sum-exp [nq, B, K, G, bq])."""
    scale = static[0]
    nq, B, K, G, bq, E = q.shape
    nk, bkv = k.shape[0], k.shape[3]

    def query_block(args: Arrays3) -> tuple[jax.Array, jax.Array]:
        qi, q_blk, q_seg_blk = args

        def key_block(carry: Arrays3, xs: Arrays4) -> tuple[Arrays3, None]:
            kj, k_blk, v_blk, kv_seg_blk = xs
            q0, k0 = qi * bq, kj * bkv

            def update(carry: Arrays3) -> Arrays3:
                m, denom, acc = carry
                allowed = _tile_mask(q_seg_blk, kv_seg_blk, q0, k0, offset, static)
                s = jnp.where(allowed, _scores(q_blk, k_blk, scale), NEG_INF)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
                correction = jnp.exp(m - m_new)
                denom_new = denom * correction + jnp.sum(p, axis=-1)
                acc_new = acc * correction[..., None] + _probs_times(p.astype(v_blk.dtype), v_blk)
                return m_new, denom_new, acc_new

            visible = _tile_visible(q_seg_blk, kv_seg_blk, q0, k0, offset, static)
            return jax.lax.cond(visible, update, lambda c: c, carry), None

        init = (jnp.full((B, K, G, bq), NEG_INF, jnp.float32), jnp.zeros((B, K, G, bq), jnp.float32),
                jnp.zeros((B, K, G, bq, E), jnp.float32))
        (m, denom, acc), _ = jax.lax.scan(key_block, init, (jnp.arange(nk), k, v, kv_seg))
        seen = denom > 0
        denom = jnp.where(seen, denom, 1.0)
        out = acc / denom[..., None]
        lse = jnp.where(seen, m + jnp.log(denom), NEG_INF)
        return out.astype(q.dtype), lse

    out_lse: tuple[jax.Array, jax.Array] = jax.lax.map(query_block, (jnp.arange(nq), q, q_seg))
    return out_lse


def _blockwise_fwd(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array, kv_seg: jax.Array, offset: jax.Array,
                   static: Static) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    out, lse = _forward(q, k, v, q_seg, kv_seg, offset, static)
    return out, (q, k, v, q_seg, kv_seg, offset, out, lse)


def _blockwise_bwd(static: Static, residuals: tuple[jax.Array, ...], d_out: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array, None, None, None]:
    return _backward(static, residuals, d_out, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _blockwise_lse(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array, kv_seg: jax.Array, offset: jax.Array,
                   static: Static) -> tuple[jax.Array, jax.Array]:
    """`_blockwise` that also returns the log-sum-exp (NEG_INF where a query saw no key)."""
    return _forward(q, k, v, q_seg, kv_seg, offset, static)


def _blockwise_lse_fwd(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array, kv_seg: jax.Array,
                       offset: jax.Array, static: Static) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, ...]]:
    out, lse = _forward(q, k, v, q_seg, kv_seg, offset, static)
    return (out, lse), (q, k, v, q_seg, kv_seg, offset, out, lse)


def _blockwise_lse_bwd(static: Static, residuals: tuple[jax.Array, ...], cts: tuple[jax.Array, jax.Array]
                       ) -> tuple[jax.Array, jax.Array, jax.Array, None, None, None]:
    return _backward(static, residuals, cts[0], cts[1])


def _backward(static: Static, residuals: tuple[jax.Array, ...], d_out: jax.Array, d_lse: jax.Array | None
              ) -> tuple[jax.Array, jax.Array, jax.Array, None, None, None]:
    """FlashAttention-2 backward: per key block, a scan over the query blocks accumulates dk, dv;
    dq is accumulated over the key blocks. ds = p (dp - rowsum(d_out * out) + d_lse) (d lse / d s = p)."""
    q, k, v, q_seg, kv_seg, offset, out, lse = residuals
    scale = static[0]
    nq, B, K, G, bq, E = q.shape
    nk, bkv = k.shape[0], k.shape[3]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [nq, B, K, G, bq]
    if d_lse is not None:
        delta = delta - d_lse.astype(jnp.float32)
    lse = jnp.where(lse == NEG_INF, 0.0, lse)  # no key seen: every p is masked to 0 anyway

    def key_block(dq_acc: jax.Array, xs: Arrays4) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        kj, k_blk, v_blk, kv_seg_blk = xs
        k0 = kj * bkv

        def query_block(carry: tuple[jax.Array, jax.Array], ys: tuple[jax.Array, ...]
                        ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
            dk, dv = carry
            qi, q_blk, do_blk, lse_blk, delta_blk, q_seg_blk = ys
            q0 = qi * bq

            def grads(_: None) -> Arrays3:
                allowed = _tile_mask(q_seg_blk, kv_seg_blk, q0, k0, offset, static)
                p = jnp.where(allowed, jnp.exp(_scores(q_blk, k_blk, scale) - lse_blk[..., None]), 0.0)
                do2 = do_blk.reshape(B, K, G * bq, E)
                dv_c = jax.lax.dot_general(p.astype(do_blk.dtype).reshape(B, K, G * bq, bkv), do2,
                                           (((2,), (2,)), _BATCHED), preferred_element_type=jnp.float32)
                dp = jax.lax.dot_general(do2, v_blk, (((3,), (3,)), _BATCHED), preferred_element_type=jnp.float32)
                ds = p * (dp.reshape(p.shape) - delta_blk[..., None]) * scale  # [B, K, G, bq, bkv]
                ds2 = ds.astype(q_blk.dtype).reshape(B, K, G * bq, bkv)
                dq_c = jax.lax.dot_general(ds2, k_blk, (((3,), (2,)), _BATCHED), preferred_element_type=jnp.float32)
                dk_c = jax.lax.dot_general(ds2, q_blk.reshape(B, K, G * bq, E), (((2,), (2,)), _BATCHED),
                                           preferred_element_type=jnp.float32)
                return dq_c.reshape(B, K, G, bq, E), dk_c, dv_c

            def skipped(_: None) -> Arrays3:
                return (jnp.zeros((B, K, G, bq, E), jnp.float32), jnp.zeros((B, K, bkv, E), jnp.float32),
                        jnp.zeros((B, K, bkv, E), jnp.float32))

            visible = _tile_visible(q_seg_blk, kv_seg_blk, q0, k0, offset, static)
            dq_c, dk_c, dv_c = jax.lax.cond(visible, grads, skipped, None)
            return (dk + dk_c, dv + dv_c), dq_c

        zeros_kv = jnp.zeros((B, K, bkv, E), jnp.float32)
        (dk, dv), dq_c = jax.lax.scan(query_block, (zeros_kv, zeros_kv),
                                      (jnp.arange(nq), q, d_out, lse, delta, q_seg))
        return dq_acc + dq_c, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), (jnp.arange(nk), k, v, kv_seg))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
_blockwise_lse.defvjp(_blockwise_lse_fwd, _blockwise_lse_bwd)

register("chunked", chunked_attention, block=chunked_attention_lse)
