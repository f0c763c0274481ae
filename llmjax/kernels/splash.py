"""TPU splash attention (`model.attention=splash`): the Pallas kernel of
`jax.experimental.pallas.ops.tpu.splash_attention`, behind the `MaskSpec` interface.

Translation of the mask description:
- causal / window -> a static kernel mask (`CausalMask`, `LocalMask` with left window
  `window - 1`, or `FullMask`), whose all-masked tiles the kernel skips;
- segment ids (packed documents; 0 = padding) -> the kernel's `SegmentIds`: a query sees a key
  only when their ids are equal, as in the reference;
- GQA / MQA: the kernel's grouped heads (query head h reads key/value head h // G);
- the query offset. A Python int (training: 0) becomes the static mask's offset. A traced
  offset (a KV cache's fill level o in prefill/decode) cannot be a static mask, so the keys
  are rotated instead: slot j moves to (j + c - o) mod S', with c = S' - L' the static offset
  (S', L' the padded lengths) and the key axis padded by L' - L so that no slot the chunk may
  see wraps around; the slots that do wrap (j >= o + L', never visible to a causal query) get a
  segment id that matches nothing. The rotation costs one copy of the keys and values per call.
Sequences are padded to the tiles (`Blocks.q` queries and `Blocks.kv` keys, multiples of 128,
shortened for short sequences; padded keys match no segment). With a traced offset (a KV cache:
inference) the kernel is built without its backward and the query tile may be as short as 8
rows, so a decode step pads its one query to 8, not 128.

q is multiplied by `scale` before the kernel (the kernel does not scale). The kernel works on
one sequence; `jax.vmap` maps it over the batch. Under an installed mesh it runs in `shard_map`
over the batch axes ("act_batch") and the head axes ("act_heads"): each device runs its rows
and heads; when key/value heads are not split like the query heads (MQA with tensor > 1) each
device picks the key/value heads its query heads read. On CPU (tests) the kernel runs in
Pallas interpret mode: exact, but slow; on GPU it is refused (use `cudnn` or `chunked`).

Under context parallelism's `all_gather` (`llmjax.kernels.context`) a causal or windowed mask is one
kernel for the whole balanced-order sequence (`_context_form`): its rows are every device's query
slots, the kernel computes the mask from each row's slot, and the mask info is split over the
context axes, so each device runs its own rows. Under the ring each (query chunk, key chunk) pair is one
call of `splash_attention_lse` (`llmjax.kernels.splash_ring`: a kernel per static mask the pair's offset can
need, and a custom VJP around jax's splash forward with its log-sum-exp and its backward kernels).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llmjax.config import ConfigError
from llmjax.kernels.chunked import pad_axis
from llmjax.kernels.context import GatheredLocal, register_gathered
from llmjax.models.attention import Blocks, MaskSpec, register, target_platform
from llmjax.parallel.context import ContextPlan
from llmjax.parallel.rules import current_sharding, logical_to_spec

_IMPORT_ERROR: ImportError | None
try:  # the module path is jax-version dependent; without it the implementation refuses to run
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
except ImportError as e:  # pragma: no cover - depends on the installed jax
    splash = None  # type: ignore[assignment]  # optional module: `check` refuses to run without it
    _IMPORT_ERROR = e
else:
    _IMPORT_ERROR = None

PAD_Q_SEGMENT, PAD_KV_SEGMENT = -1, -2
LANES, SUBLANES = 128, 8


def check(platform: str) -> None:
    """Refuse where the kernel cannot run: GPUs, or a jax without the splash module."""
    if splash is None:
        raise ConfigError(f"model.attention=splash: this jax ({jax.__version__}) has no "
                          f"jax.experimental.pallas.ops.tpu.splash_attention ({_IMPORT_ERROR})")
    if platform not in ("tpu", "cpu"):
        raise ConfigError(f"model.attention=splash is a TPU (Pallas Mosaic) kernel and cannot run on {platform}; "
                          "use model.attention=cudnn or chunked there")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def splash_attention(q_BLHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, mask: MaskSpec, scale: float,
                     blocks: Blocks | None = None) -> jax.Array:
    """Attention under `mask` with the splash kernel -> [B, L, H, E] in q's dtype.

    q [B, L, H, E], k/v [B, S, K, E]; sharded over batch and heads when a mesh is installed."""
    blocks = blocks or Blocks()
    static_offset = mask.q_offset if isinstance(mask.q_offset, int) else None
    if static_offset is None and not mask.causal and mask.window > 0:
        raise ValueError("splash attention: a non-causal window with a traced query offset is not supported")
    interpret = target_platform() == "cpu"
    q_BHLE = (q_BLHE.astype(jnp.float32) * scale).astype(q_BLHE.dtype).transpose(0, 2, 1, 3)
    k_BKSE, v_BKSE = k_BSKE.transpose(0, 2, 1, 3), v_BSKE.transpose(0, 2, 1, 3)
    q_seg, kv_seg = mask.q_segment_ids.astype(jnp.int32), mask.kv_segment_ids.astype(jnp.int32)
    offset = jnp.asarray(0 if static_offset is not None else mask.q_offset, jnp.int32)
    local = functools.partial(_local_attention, causal=mask.causal, window=mask.window, static_offset=static_offset,
                              blocks=blocks, interpret=interpret,
                              groups=q_BLHE.shape[2] // k_BSKE.shape[2])
    plan = _shard_plan(q_BHLE.shape, k_BKSE.shape)
    if plan is None:
        out_BHLE = local(q_BHLE, k_BKSE, v_BKSE, q_seg, kv_seg, offset, head_start=0)
    else:
        mesh, q_spec, kv_spec, seg_spec, head_axes, kv_split = plan
        H_local = q_BHLE.shape[1] // math.prod(mesh.shape[a] for a in head_axes) if head_axes else q_BHLE.shape[1]

        def sharded(q: jax.Array, k: jax.Array, v: jax.Array, qs: jax.Array, ks: jax.Array, off: jax.Array
                    ) -> jax.Array:
            # First global query head of this device (0 when heads are not split, or split like the kv heads).
            start = 0 if kv_split or not head_axes else jax.lax.axis_index(head_axes) * H_local
            return local(q, k, v, qs, ks, off, head_start=start)

        out_BHLE = jax.shard_map(sharded, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec,
                                                               PartitionSpec()),
                                 out_specs=q_spec, check_vma=False)(q_BHLE, k_BKSE, v_BKSE, q_seg, kv_seg, offset)
    return out_BHLE.transpose(0, 2, 1, 3).astype(q_BLHE.dtype)


def _shard_plan(q_shape: tuple[int, ...], kv_shape: tuple[int, ...]) -> tuple[Any, ...] | None:
    """(mesh, q spec, kv spec, segment spec, head axes, kv heads split like q heads) under an installed
    mesh with more than one device; None otherwise. Dimensions that do not divide stay whole."""
    ctx = current_sharding()
    if ctx is None or ctx[0].devices.size == 1:
        return None
    mesh, rules = ctx
    B, H = q_shape[0], q_shape[1]
    K = kv_shape[1]

    def axes(name: str, size: int) -> tuple[str, ...]:
        spec = logical_to_spec((name,), rules)[0]
        names = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
        return names if size % math.prod(mesh.shape[a] for a in names) == 0 else ()

    batch = axes("act_batch", B)
    heads = tuple(a for a in axes("act_heads", H) if a not in batch)
    kv_heads = tuple(a for a in axes("act_kv_heads", K) if a not in batch)
    kv_split = kv_heads == heads
    if not kv_split:
        kv_heads = ()  # every device holds all kv heads and picks the ones its query heads read
    G = H // K
    if heads and not kv_split:
        H_local = H // math.prod(mesh.shape[a] for a in heads)
        if H_local % G and G % H_local:
            raise ValueError(f"splash attention: {H_local} query heads per device do not fit groups of {G}")
    spec = lambda *names: PartitionSpec(*[n or None for n in names])  # noqa: E731
    return (mesh, spec(batch, heads, None, None), spec(batch, kv_heads, None, None), spec(batch, None), heads,
            kv_split)


def _local_attention(q_BHLE: jax.Array, k_BKSE: jax.Array, v_BKSE: jax.Array, q_seg: jax.Array, kv_seg: jax.Array,
                     offset: jax.Array, *, causal: bool, window: int, static_offset: int | None, blocks: Blocks,
                     interpret: bool, groups: int, head_start: jax.Array | int) -> jax.Array:
    """The kernel on this device's rows and heads: q [B, h, L, E] (scaled), k/v [B, k, S, E] -> [B, h, L, E].

    `groups` = G (query heads per key/value head, global); `head_start`: global index of the first local
    query head when k/v hold all key/value heads but q only some query heads (they read k/v heads
    (head_start + i) // G)."""
    B, H, L, E = q_BHLE.shape
    S = k_BKSE.shape[2]
    # A KV cache (traced offset) is inference: a forward-only kernel, whose query tile may be as short as
    # 8 rows (decode). Training needs the backward kernels, whose query tiles are multiples of 128.
    inference = static_offset is None
    bq = min(_round_up(blocks.q, LANES), _round_up(L, SUBLANES if inference else LANES))
    Lp = _round_up(L, bq)
    rotate = inference and (causal or window > 0)
    S_needed = S + (Lp - L if rotate else 0)
    bkv = min(_round_up(blocks.kv, LANES), _round_up(S_needed, LANES))
    Sp = _round_up(S_needed, bkv)

    q = pad_axis(q_BHLE, 2, Lp)
    k, v = pad_axis(k_BKSE, 2, Sp), pad_axis(v_BKSE, 2, Sp)
    q_seg = pad_axis(q_seg, 1, Lp, PAD_Q_SEGMENT)
    kv_seg = pad_axis(kv_seg, 1, Sp, PAD_KV_SEGMENT)
    mask_offset = static_offset or 0
    if rotate:
        mask_offset = Sp - Lp
        kv_seg = jnp.where(jnp.arange(Sp)[None] >= offset + Lp, PAD_KV_SEGMENT, kv_seg)
        shift = mask_offset - offset
        k, v = jnp.roll(k, shift, axis=2), jnp.roll(v, shift, axis=2)
        kv_seg = jnp.roll(kv_seg, shift, axis=1)
    k, v = _kv_heads_for(k, v, H, groups, head_start)

    kernel = splash.make_splash_mha(
        _static_mask(H, Lp, Sp, causal, window, mask_offset),
        block_sizes=_block_sizes(bq, bkv, backward=not inference),
        head_shards=1, q_seq_shards=1, interpret=interpret)
    segments = splash.SegmentIds(q=q_seg, kv=kv_seg)
    # in_axes is a prefix tree of the arguments: 0 where SegmentIds has its arrays
    in_axes = (0, 0, 0, splash.SegmentIds(0, 0))  # type: ignore[arg-type]
    out: jax.Array = jax.vmap(kernel, in_axes=in_axes)(q, k, v, segments)
    return out[:, :, :L]


def _block_sizes(bq: int, bkv: int, backward: bool) -> Any:
    if not backward:
        return splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv)
    return splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                             block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)


def _kv_heads_for(k: jax.Array, v: jax.Array, n_q_heads: int, groups: int, head_start: jax.Array | int
                  ) -> tuple[jax.Array, jax.Array]:
    """The key/value heads read by `n_q_heads` local query heads from global head `head_start`, in groups of
    `groups` query heads per key/value head: k/v [B, K or fewer, S, E] -> [B, max(1, n_q_heads / groups), S, E]."""
    local = max(1, n_q_heads // groups)
    if local == k.shape[1]:
        return k, v
    start = head_start // groups
    return (jax.lax.dynamic_slice_in_dim(k, start, local, axis=1),
            jax.lax.dynamic_slice_in_dim(v, start, local, axis=1))


def _static_mask(H: int, L: int, S: int, causal: bool, window: int, offset: int) -> Any:
    """The kernel's static mask for H heads of an [L, S] score matrix."""
    base: splash.Mask
    if window > 0:
        base = splash.LocalMask((L, S), (window - 1, 0 if causal else None), offset)
    elif causal:
        base = splash.CausalMask((L, S), offset)
    else:
        base = splash.FullMask((L, S))
    return splash.MultiHeadMask([base] * H)


def _context_form(plan: ContextPlan, heads: int, causal: bool, window: int, blocks: Blocks
                  ) -> tuple[Any, Any, GatheredLocal]:
    """`all_gather` with a causal or windowed mask (`llmjax.kernels.context.GatheredForm`): one kernel for the
    whole sequence, whose queries are every device's balanced-order slots (device d: chunks d and 2C-1-d,
    padded to the query tile) against all keys in natural order; the kernel computes its mask from each
    row's slot (`q_sequence`), and its mask info is split over the context axes (`q_seq_shards`, the
    kernel's `manual_sharding_spec`), so each device runs its own rows' slice of one static mask."""
    C, c, L = plan.size, plan.chunk, plan.length
    bq = min(_round_up(blocks.q, LANES), _round_up(2 * c, LANES))
    Lq = _round_up(2 * c, bq)  # query rows per device
    bkv = min(_round_up(blocks.kv, LANES), _round_up(L, LANES))
    Sp = _round_up(L, bkv)
    kernel = _context_kernel(heads, C, c, Lq, Sp, causal, window, bq, bkv, target_platform() == "cpu")
    spec = kernel.manual_sharding_spec(NamedSharding(plan.mesh, PartitionSpec(None, plan.axes)))

    def local(kernel: Any, q_BLHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, q_seg: jax.Array,
              kv_seg: jax.Array, scale: float) -> jax.Array:
        q = (q_BLHE.astype(jnp.float32) * scale).astype(q_BLHE.dtype).transpose(0, 2, 1, 3)
        q = pad_axis(q, 2, Lq)
        k, v = (pad_axis(x.transpose(0, 2, 1, 3), 2, Sp) for x in (k_BSKE, v_BSKE))
        segments = splash.SegmentIds(q=pad_axis(q_seg.astype(jnp.int32), 1, Lq, PAD_Q_SEGMENT),
                                     kv=pad_axis(kv_seg.astype(jnp.int32), 1, Sp, PAD_KV_SEGMENT))
        in_axes = (0, 0, 0, splash.SegmentIds(0, 0))  # type: ignore[arg-type]
        out: jax.Array = jax.vmap(kernel, in_axes=in_axes)(q, k, v, segments)
        return out[:, :, :2 * c].transpose(0, 2, 1, 3)

    return kernel, spec, local


@functools.lru_cache(maxsize=16)
def _context_kernel(heads: int, C: int, c: int, Lq: int, Sp: int, causal: bool, window: int, bq: int, bkv: int,
                    interpret: bool) -> Any:
    """The splash kernel of `_context_form` (cached: building its mask info walks every tile in numpy)."""
    slots = np.full((C, Lq), C * 2 * c - 1, np.int32)  # padded rows: the last slot (they see keys; no segment)
    ar = np.arange(c, dtype=np.int32)
    for d in range(C):
        slots[d, :2 * c] = np.concatenate([ar + d * c, ar + (2 * C - 1 - d) * c])
    base = _static_mask(1, C * Lq, Sp, causal, window, 0).masks[0]
    base.q_sequence = slots.reshape(-1)  # the row's slot, from which the kernel computes its mask
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(splash.MultiHeadMask([base] * heads),
                                      block_sizes=_block_sizes(bq, bkv, backward=True),
                                      head_shards=1, q_seq_shards=C, interpret=interpret)


def splash_attention_lse(q_BLHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, mask: MaskSpec, scale: float,
                         blocks: Blocks | None = None) -> tuple[jax.Array, jax.Array]:
    """Splash's `BlockImpl` for the ring: (out [B, L, H, E] float32, lse [B, L, H] float32), both differentiable
    (`llmjax.kernels.splash_ring`, imported on first use: it builds on this module)."""
    from llmjax.kernels.splash_ring import splash_block

    return splash_block(q_BLHE, k_BSKE, v_BSKE, mask, scale, blocks)


register("splash", splash_attention, check, block=splash_attention_lse)
register_gathered(splash_attention, _context_form)
