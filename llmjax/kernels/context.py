"""Attention with the sequence split over the context axes: `all_gather` and `ring` (`model.context_parallel`).

The tokens are in balanced order (`llmjax.parallel.context`): device i holds the chunks i and 2C-1-i
of c = L / (2C) tokens of every row, for queries, keys and values alike. Both strategies run in one
`shard_map` over the whole mesh: batch over the `act_batch` axes, the sequence over the context
axes, heads over the `act_heads` axes (key/value heads that are not split like the query heads are
repeated to one per query head first).

- `all_gather`: keys, values and their segment ids are gathered along the context axes and put back
  in natural order; each of the device's two query chunks is contiguous, so it is one call of the
  configured implementation (`model.attention`: xla, chunked, cudnn; not splash, whose static mask cannot
  take a per-device offset) with the chunk's start
  as the mask's query offset (`MaskSpec.q_offset`), which every implementation honours. Memory: the
  whole sequence's keys and values per device (small with few KV heads).
- `ring`: each device keeps its queries; the key/value blocks (with their segment ids) go around
  the ring with `ppermute`, C steps, and an online softmax (running max and sum, float32) combines
  the blocks. Each block's mask is built from the true slots of its tokens (`local_slots`). Every
  block step is rematerialised (`jax.checkpoint`), so the backward pass keeps only the blocks'
  inputs; its gradients are JAX's transpose of the ring (the reverse ring of ppermutes). Memory:
  one key/value block in flight. The blocks are computed here (einsum, float32 scores), not by
  `model.attention` (whose kernels do not return the log-sum-exp a ring must combine).

Both are equal to one device's attention for causal, bidirectional, packed-document (segment ids)
and sliding-window masks (tests/kernels/test_context.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from llmjax.models.attention import NEG_INF, AttentionImpl, Blocks, MaskSpec, compiling_for, target_platform
from llmjax.parallel.context import ContextPlan, local_slots, natural_order
from llmjax.parallel.rules import unsharded


def context_attention(plan: ContextPlan, mode: str, q_BLHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array,
                      mask: MaskSpec, impl: AttentionImpl, scale: float, blocks: Blocks) -> jax.Array:
    """Self-attention of a balanced-order sequence split over `plan`'s axes -> [B, L, H, E] in q's dtype.

    q [B, L, H, E], k/v [B, L, K, E], `mask` a self-attention mask (its segment ids [B, L] in the same
    balanced order; causal, window). `mode` "all_gather" calls `impl` per local query chunk; "ring" computes
    its blocks itself. Sharding: ("act_batch", "act_length", "act_heads", None) in and out."""
    H, K = q_BLHE.shape[2], k_BSKE.shape[2]
    rules = plan.rules
    if K != H and tuple(rules.get("act_kv_heads", ())) != tuple(rules.get("act_heads", ())):
        k_BSKE, v_BSKE = (jnp.repeat(x, H // K, axis=2) for x in (k_BSKE, v_BSKE))  # split like the query heads
    heads = plan.spec(("act_batch", "act_length", "act_heads", None))
    segs = plan.spec(("act_batch", "act_length"))
    static = (mask.causal, mask.window)
    platform = target_platform()  # the kernels inside see no mesh, but must still compile for its devices

    def local(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array, kv_seg: jax.Array) -> jax.Array:
        with unsharded(), compiling_for(platform):
            if mode == "ring":
                return _ring(plan, q, k, v, q_seg, kv_seg, scale, static)
            return _gathered(plan, q, k, v, q_seg, kv_seg, impl, scale, blocks, static)

    fn = jax.shard_map(local, mesh=plan.mesh, in_specs=(heads, heads, heads, segs, segs), out_specs=heads,
                       check_vma=False)
    out: jax.Array = fn(q_BLHE, k_BSKE, v_BSKE, mask.q_segment_ids, mask.kv_segment_ids)
    return out.astype(q_BLHE.dtype)


def _gathered(plan: ContextPlan, q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array, kv_seg: jax.Array,
              impl: AttentionImpl, scale: float, blocks: Blocks, static: tuple[bool, int]) -> jax.Array:
    """Per device: local queries [b, 2c, h, E] against all keys, gathered and put in natural order."""
    causal, window = static
    C, c = plan.size, plan.chunk
    k_all, v_all, seg_all = (natural_order(jax.lax.all_gather(x, plan.axes, axis=1, tiled=True), C)
                             for x in (k, v, kv_seg))
    if not causal and window == 0:  # no positions in the rule: all local queries in one call
        return impl(q, k_all, v_all, MaskSpec(q_seg, seg_all, 0, False, 0), scale, blocks)
    i = jax.lax.axis_index(plan.axes)
    outs = []
    for half, chunk in ((0, i), (1, 2 * C - 1 - i)):
        part = slice(half * c, (half + 1) * c)
        m = MaskSpec(q_seg[:, part], seg_all, (chunk * c).astype(jnp.int32), causal, window)
        outs.append(impl(q[:, part], k_all, v_all, m, scale, blocks))
    return jnp.concatenate(outs, axis=1)


def _ring(plan: ContextPlan, q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array, kv_seg: jax.Array,
          scale: float, static: tuple[bool, int]) -> jax.Array:
    """Per device: local queries [b, 2c, h, E]; the key/value block [b, 2c, k, E] visits every device."""
    C, c = plan.size, plan.chunk
    b, Lq, H, E = q.shape
    K = k.shape[2]
    G = H // K
    i = jax.lax.axis_index(plan.axes)
    q_pos = local_slots(i, C, c)
    q_BKGLE = q.reshape(b, Lq, K, G, E).transpose(0, 2, 3, 1, 4)
    step = jax.checkpoint(_block_step, static_argnums=(8, 9))
    m = jnp.full((b, K, G, Lq), NEG_INF, jnp.float32)
    shift = [(j, (j + 1) % C) for j in range(C)]

    def ring_step(carry: Any, s: jax.Array) -> tuple[Any, None]:
        state, (k, v, kv_seg) = carry
        src = (i - s) % C  # the device this key/value block started on
        state = step(state, q_BKGLE, k, v, q_seg, kv_seg, q_pos, local_slots(src, C, c), scale, static)
        return (state, tuple(jax.lax.ppermute(x, plan.axes, shift) for x in (k, v, kv_seg))), None

    # C - 1 steps that pass the block on, then the last block without a send
    init = ((m, jnp.zeros_like(m), jnp.zeros((b, K, G, Lq, E), jnp.float32)), (k, v, kv_seg))
    (state, (k, v, kv_seg)), _ = jax.lax.scan(ring_step, init, jnp.arange(C - 1))
    state = step(state, q_BKGLE, k, v, q_seg, kv_seg, q_pos, local_slots((i + 1) % C, C, c), scale, static)
    _, l_sum, acc = state
    out: jax.Array = acc / jnp.where(l_sum == 0, 1.0, l_sum)[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, Lq, H, E)


def _block_step(state: tuple[jax.Array, jax.Array, jax.Array], q_BKGLE: jax.Array, k: jax.Array, v: jax.Array,
                q_seg: jax.Array, kv_seg: jax.Array, q_pos: jax.Array, kv_pos: jax.Array, scale: float,
                static: tuple[bool, int]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One online-softmax update of the local queries with one key/value block [b, S, K, E]."""
    causal, window = static
    m, l_sum, acc = state
    k_BKSE, v_BKSE = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    s = jnp.einsum("bkgle,bkse->bkgls", q_BKGLE, k_BKSE, preferred_element_type=jnp.float32) * scale
    allowed = q_seg[:, :, None] == kv_seg[:, None, :]  # [b, Lq, S]
    if causal:
        allowed &= (q_pos[:, None] >= kv_pos[None, :])[None]
    if window > 0:
        allowed &= (q_pos[:, None] - kv_pos[None, :] < window)[None]
    allowed = allowed[:, None, None]  # broadcast over K, G
    s = jnp.where(allowed, s, NEG_INF)
    m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(axis=-1)))  # the result does not depend on it
    p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
    correction = jnp.exp(m - m_new)
    l_sum = l_sum * correction + p.sum(axis=-1)
    pv = jnp.einsum("bkgls,bkse->bkgle", p.astype(v.dtype), v_BKSE, preferred_element_type=jnp.float32)
    return m_new, l_sum, acc * correction[..., None] + pv
