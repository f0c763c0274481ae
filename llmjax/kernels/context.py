"""Attention with the sequence split over the context axes: `all_gather` and `ring` (`model.context_parallel`).

The tokens are in balanced order (`llmjax.parallel.context`): device i holds the chunks i and 2C-1-i
of c = L / (2C) tokens of every row, for queries, keys and values alike. Both strategies run in one
`shard_map` over the whole mesh: batch over the `act_batch` axes, the sequence over the context
axes, heads over the `act_heads` axes (key/value heads that are not split like the query heads are
repeated to one per query head first).

- `all_gather`: keys, values and their segment ids are gathered along the context axes and put back
  in natural order; each of the device's two query chunks is contiguous, so it is one call of the
  configured implementation (`model.attention`: xla, chunked, cudnn) with the chunk's start
  as the mask's query offset (`MaskSpec.q_offset`), which every implementation honours. An implementation
  whose mask must be known before the `shard_map` (splash: a static kernel mask) registers a
  `GatheredForm` instead (`register_gathered`): it builds one kernel for the whole balanced-order
  sequence, its mask over every device's query slots, sharded over the context axes and passed into
  the `shard_map`, and each device runs its slice. Memory: the
  whole sequence's keys and values per device (small with few KV heads).
- `ring`: each device keeps its queries; the key/value blocks (with their segment ids) go around
  the ring with `ppermute`, C steps. At each step the device's two query chunks meet the block's two
  key chunks: 2 x 2 contiguous attentions, each one call of the configured implementation's log-sum-exp
  form (`BlockImpl`, registered with it: `xla`, `chunked`, `splash`) with the chunks' slot difference as the
  mask's query offset (traced; its 4C-1 possible values in `MaskSpec.offsets`, from which splash builds
  one static kernel per chunk-pair kind: `llmjax.kernels.splash_ring`), merged by their log-sum-exp
  (`merge_blocks`, float32). Every block step is rematerialised (`jax.checkpoint`), so the backward pass
  keeps only the blocks' inputs; its gradients are JAX's transpose of the ring (the reverse ring of
  ppermutes) through the implementation's own backward (chunked's and splash's take the log-sum-exp's
  cotangent too). Memory: one key/value block in flight. cudnn returns no log-sum-exp
  (`jax.nn.dot_product_attention`), so the config rules refuse it with the ring.

Both are equal to one device's attention for causal, bidirectional, packed-document (segment ids)
and sliding-window masks (tests/kernels/test_context.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from llmjax.models.attention import (
    NEG_INF,
    AttentionImpl,
    BlockImpl,
    Blocks,
    MaskSpec,
    block_form,
    compiling_for,
    merge_blocks,
    target_platform,
)
from llmjax.parallel.context import ContextPlan, natural_order
from llmjax.parallel.rules import unsharded

# Inside the shard_map: (operand, q [b, 2c, h, E], k, v [b, L, k, E] natural order, q segment ids [b, 2c],
# kv segment ids [b, L], scale) -> [b, 2c, h, E]
GatheredLocal = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, float], jax.Array]


class GatheredForm(Protocol):
    """An implementation's form for `all_gather` with a causal or windowed mask, prepared outside the shard_map:
    (plan, query heads per device, causal, window, blocks) -> (operand: a pytree of arrays, its shard_map
    in_spec (a prefix tree), the per-device function that takes the operand's slice)."""

    def __call__(self, plan: ContextPlan, heads: int, causal: bool, window: int, blocks: Blocks, /
                 ) -> tuple[Any, Any, GatheredLocal]: ...


_GATHERED: dict[AttentionImpl, GatheredForm] = {}


def register_gathered(fn: AttentionImpl, form: GatheredForm) -> None:
    """Let `all_gather` run implementation `fn` through `form` (its mask built for the whole sequence)."""
    _GATHERED[fn] = form


def context_attention(plan: ContextPlan, mode: str, q_BLHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array,
                      mask: MaskSpec, impl: AttentionImpl, scale: float, blocks: Blocks) -> jax.Array:
    """Self-attention of a balanced-order sequence split over `plan`'s axes -> [B, L, H, E] in q's dtype.

    q [B, L, H, E], k/v [B, L, K, E], `mask` a self-attention mask (its segment ids [B, L] in the same
    balanced order; causal, window). `mode` "all_gather" calls `impl` per local query chunk; "ring" calls
    `impl`'s `BlockImpl` per (query chunk, key chunk) pair (ConfigError where it has none).
    Sharding: ("act_batch", "act_length", "act_heads", None) in and out."""
    H, K = q_BLHE.shape[2], k_BSKE.shape[2]
    rules = plan.rules
    if K != H and tuple(rules.get("act_kv_heads", ())) != tuple(rules.get("act_heads", ())):
        k_BSKE, v_BSKE = (jnp.repeat(x, H // K, axis=2) for x in (k_BSKE, v_BSKE))  # split like the query heads
    heads = plan.spec(("act_batch", "act_length", "act_heads", None))
    segs = plan.spec(("act_batch", "act_length"))
    static = (mask.causal, mask.window)
    block = block_form(impl) if mode == "ring" else None  # ConfigError before tracing where there is none
    platform = target_platform()  # the kernels inside see no mesh, but must still compile for its devices
    form = _GATHERED.get(impl) if mode == "all_gather" and (mask.causal or mask.window > 0) else None
    operand, operand_spec, gathered = None, PartitionSpec(), None
    if form is not None:
        head_axes = heads[2] if heads[2] is None or isinstance(heads[2], tuple) else (heads[2],)
        with compiling_for(platform):
            operand, operand_spec, gathered = form(plan, H // math.prod(plan.mesh.shape[a] for a in head_axes or ()),
                                                   mask.causal, mask.window, blocks)

    def local(q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array, kv_seg: jax.Array, op: Any) -> jax.Array:
        with unsharded(), compiling_for(platform):
            if block is not None:
                return _ring(plan, q, k, v, q_seg, kv_seg, block, scale, blocks, static)
            if gathered is not None:
                k_all, v_all, seg_all = (natural_order(jax.lax.all_gather(x, plan.axes, axis=1, tiled=True), plan.size)
                                         for x in (k, v, kv_seg))
                return gathered(op, q, k_all, v_all, q_seg, seg_all, scale)
            return _gathered(plan, q, k, v, q_seg, kv_seg, impl, scale, blocks, static)

    fn = jax.shard_map(local, mesh=plan.mesh, in_specs=(heads, heads, heads, segs, segs, operand_spec),
                       out_specs=heads, check_vma=False)
    out: jax.Array = fn(q_BLHE, k_BSKE, v_BSKE, mask.q_segment_ids, mask.kv_segment_ids, operand)
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
          block: BlockImpl, scale: float, blocks: Blocks, static: tuple[bool, int]) -> jax.Array:
    """Per device: local queries [b, 2c, h, E]; the key/value block [b, 2c, k, E] visits every device.

    Each visit is 2 x 2 calls of `block` (the configured implementation's `BlockImpl`): a query chunk
    (slots q0..q0+c) against a key chunk (slots k0..k0+c) is a plain contiguous attention whose mask's query
    offset is q0 - k0 (causal and window depend only on the slots' difference). Their (out, lse) are merged
    by `merge_blocks`."""
    C, c = plan.size, plan.chunk
    i = jax.lax.axis_index(plan.axes)
    causal, window = static
    step = jax.checkpoint(_block_step, static_argnums=(6, 7, 8, 9, 10))
    b, Lq, H, E = q.shape
    shift = [(j, (j + 1) % C) for j in range(C)]

    def ring_step(carry: Any, s: jax.Array) -> tuple[Any, None]:
        state, (k, v, kv_seg) = carry
        src = (i - s) % C  # the device this key/value block started on
        state = step(state, q, k, v, q_seg, kv_seg, i, src, (C, c), block, (scale, blocks, causal, window))
        return (state, tuple(jax.lax.ppermute(x, plan.axes, shift) for x in (k, v, kv_seg))), None

    # C - 1 steps that pass the block on, then the last block without a send
    init = ((jnp.zeros((b, Lq, H, E), jnp.float32), jnp.full((b, Lq, H), NEG_INF, jnp.float32)), (k, v, kv_seg))
    (state, (k, v, kv_seg)), _ = jax.lax.scan(ring_step, init, jnp.arange(C - 1))
    state = step(state, q, k, v, q_seg, kv_seg, i, (i + 1) % C, (C, c), block, (scale, blocks, causal, window))
    out: jax.Array = state[0]
    return out


def _block_step(state: tuple[jax.Array, jax.Array], q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array,
                kv_seg: jax.Array, dev: jax.Array, src: jax.Array, sizes: tuple[int, int], block: BlockImpl,
                static: tuple[float, Blocks, bool, int]) -> tuple[jax.Array, jax.Array]:
    """The local queries' (out [b, 2c, h, E] float32, lse [b, 2c, h]) merged with one key/value block's.

    The 2 x 2 (query chunk, key chunk) pairs are one `lax.map` over `block` (traced and compiled once; a
    `vmap` would turn a blockwise kernel's tile skipping into selects)."""
    C, c = sizes
    scale, blocks, causal, window = static
    b, _, H, E = q.shape
    halves = lambda x: x.reshape(x.shape[0], 2, c, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731  [2, b, c, ...]
    qh, q_segh, kh, vh, kv_segh = (halves(x) for x in (q, q_seg, k, v, kv_seg))
    qi, ki = jnp.array([0, 0, 1, 1]), jnp.array([0, 1, 0, 1])
    q_chunk = jnp.stack([dev, 2 * C - 1 - dev])[qi]
    k_chunk = jnp.stack([src, 2 * C - 1 - src])[ki]

    offsets = tuple(d * c for d in range(1 - 2 * C, 2 * C))  # every (q_chunk - k_chunk) * c

    def pair(xs: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        q_, q_seg_, k_, v_, kv_seg_, offset = xs
        m = MaskSpec(q_seg_, kv_seg_, offset, causal, window, offsets=offsets)
        o, lse = block(q_, k_, v_, m, scale, blocks)
        return o.astype(jnp.float32), lse

    o, lse = jax.lax.map(pair, (qh[qi], q_segh[qi], kh[ki], vh[ki], kv_segh[ki],
                                ((q_chunk - k_chunk) * c).astype(jnp.int32)))  # [4, b, c, ...]
    o, lse = merge_blocks((o[0::2], lse[0::2]), (o[1::2], lse[1::2]))  # over the key chunks: [2(q), b, c, ...]
    block_out = (o.swapaxes(0, 1).reshape(b, 2 * c, H, E), lse.swapaxes(0, 1).reshape(b, 2 * c, H))
    return merge_blocks(state, block_out)
