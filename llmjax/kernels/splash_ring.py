"""Splash attention's block form for context parallelism's ring (`BlockImpl`): (out, log-sum-exp), both
differentiable, computed by jax's own splash kernels.

The ring calls it for a query chunk against a key chunk of c tokens each, with a traced query offset
(q_chunk - k_chunk) * c, whose possible values the ring lists in `MaskSpec.offsets`. Splash masks are
static, so each offset is classified once, in Python: empty (causal: the key chunk is in the future;
window: all its keys too old), full (every key visible up to segment ids), or partial (the diagonal
chunk, a window's edge). Partial offsets get one kernel each (`CausalMask`/`LocalMask` with that
offset), the full ones share a `FullMask` kernel, and `lax.switch` on the traced offset picks the
kernel; an empty pair returns out 0 and lse NEG_INF, which `merge_blocks` weighs 0. Causal attention
has two kernels (diagonal, full), bidirectional one, a window one per chunk difference it reaches.
Packed documents are the kernel's `SegmentIds` (dynamic).

Differentiation: jax's splash returns its log-sum-exp only with `save_residuals=True`, whose forward jax
refuses to differentiate. So a `jax.custom_vjp` wraps the pair: the forward runs that kernel (natural-log
lse = max + log(sum of exp), per query row), and the backward calls splash's own backward kernels
(`_splash_attention_bwd_dkv`, `_splash_attention_bwd_dq`, as `_splash_attention_bwd` does, with the
kernel's dq/dkv mask info) with di = rowsum(out * d_out) - d_lse: the score gradient of (out, lse) is
p (dp - rowsum(out * d_out) + d_lse), since d lse / d s = p. Rows that see no key of the pair (lse at
the kernel's mask value, or no tile run: NaN) are set to out 0, lse NEG_INF, and get no gradient.

Those two backward functions are private to jax's module: they are looked up (with their keyword
arguments) at import, and where they are missing (another jax) the ring with splash is refused
(`check_ring`: ConfigError naming both keys) and `all_gather` still runs splash. Interpret mode on CPU.
cudnn has no such form: `jax.nn.dot_product_attention` returns no log-sum-exp.
"""

from __future__ import annotations

import functools
import inspect
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp

from llmjax.config import ConfigError
from llmjax.kernels import splash as sp
from llmjax.kernels.chunked import pad_axis
from llmjax.models.attention import NEG_INF, Blocks, MaskSpec, target_platform

_BWD_ARGS = {"q", "k", "v", "segment_ids", "sinks", "logsumexp", "do", "di", "bq", "bkv", "is_mqa", "mask_info",
             "mask_value", "attn_logits_soft_cap", "q_layout", "k_layout", "v_layout", "mask_function", "interpret"}
_NEEDED = {"_splash_attention_bwd_dq": _BWD_ARGS,
           "_splash_attention_bwd_dkv": _BWD_ARGS | {"bkv_compute", "use_fused_bwd_kernel"}}


def _find_backward() -> tuple[ModuleType | None, str]:
    """(jax's splash kernel module, "") where its backward kernels take what this module passes, else (None, why)."""
    try:
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_module
    except ImportError as e:  # pragma: no cover - depends on the installed jax
        return None, str(e)
    for name, args in _NEEDED.items():
        fn = getattr(kernel_module, name, None)
        if fn is None:
            return None, f"its splash_attention_kernel has no {name}"
        try:
            missing = args - set(inspect.signature(fn).parameters)
        except (TypeError, ValueError):  # pragma: no cover
            return None, f"the signature of {name} cannot be read"
        if missing:
            return None, f"its {name} takes no {', '.join(sorted(missing))}"
    make = getattr(kernel_module, "_make_splash_attention", None)  # its arguments become the kernel's kwargs
    try:
        made = set(inspect.signature(make).parameters) if make is not None else set()
    except (TypeError, ValueError):  # pragma: no cover
        made = set()
    if not {"block_sizes", "save_residuals", "mask_value", "attn_logits_soft_cap", "interpret"} <= made:
        return None, "its make_splash_mha takes other arguments"
    kernel_class = getattr(kernel_module, "SplashAttentionKernel", None)
    init = inspect.signature(kernel_class.__init__).parameters if kernel_class is not None else {}
    if not {"fwd_mask_info", "dq_mask_info", "dkv_mask_info"} <= set(init):
        return None, "its SplashAttentionKernel keeps no dq/dkv mask info"
    return kernel_module, ""


_KERNELS, _WHY_NOT = _find_backward()


def check_ring() -> None:
    """ConfigError where this jax lacks what the ring's splash blocks need."""
    if _KERNELS is None:
        raise ConfigError(f"model.context_parallel=ring with model.attention=splash: the ring merges blocks by their "
                          f"log-sum-exp, whose gradient needs jax's private splash backward kernels, and this jax "
                          f"({jax.__version__}) does not have them as expected ({_WHY_NOT}); use "
                          "model.context_parallel=all_gather with splash, or model.attention=chunked with the ring")


def splash_block(q_BLHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, mask: MaskSpec, scale: float,
                 blocks: Blocks | None = None) -> tuple[jax.Array, jax.Array]:
    """Splash's `BlockImpl`: (out [B, L, H, E] float32, lse [B, L, H] float32; out 0 and lse NEG_INF where a
    query sees no key). q [B, L, H, E], k/v [B, S, K, E]; no mesh inside (the ring's shard_map).

    `mask.q_offset` a Python int, or traced with its possible values in `mask.offsets`."""
    check_ring()
    blocks = blocks or Blocks()
    B, L, H, E = q_BLHE.shape
    S = k_BSKE.shape[1]
    bq = min(sp._round_up(blocks.q, sp.LANES), sp._round_up(L, sp.LANES))
    bkv = min(sp._round_up(blocks.kv, sp.LANES), sp._round_up(S, sp.LANES))
    Lp, Sp = sp._round_up(L, bq), sp._round_up(S, bkv)
    q = pad_axis((q_BLHE.astype(jnp.float32) * scale).astype(q_BLHE.dtype).transpose(0, 2, 1, 3), 2, Lp)
    k, v = (pad_axis(x.transpose(0, 2, 1, 3), 2, Sp) for x in (k_BSKE, v_BSKE))
    q_seg = pad_axis(mask.q_segment_ids.astype(jnp.int32), 1, Lp, sp.PAD_Q_SEGMENT)
    kv_seg = pad_axis(mask.kv_segment_ids.astype(jnp.int32), 1, Sp, sp.PAD_KV_SEGMENT)

    static = isinstance(mask.q_offset, int)
    offsets = (mask.q_offset,) if isinstance(mask.q_offset, int) else mask.offsets
    if not offsets:
        raise ValueError("splash's block form: a traced query offset needs its possible values (MaskSpec.offsets)")
    kinds = [_kind(o, L, S, mask.causal, mask.window) for o in offsets]
    kernels = sorted({kind for kind in kinds if kind is not None}, key=lambda o: (o is not _FULL, o))
    interpret = target_platform() == "cpu"
    branches = [functools.partial(_empty, E)] + [
        functools.partial(_pair, (H, Lp, Sp, mask.causal, mask.window, kind, bq, bkv, interpret)) for kind in kernels]
    table = [0 if kind is None else 1 + kernels.index(kind) for kind in kinds]
    args = (q, k, v, q_seg, kv_seg)
    if static:
        out, lse = branches[table[0]](*args)
    else:
        where = jnp.argmax(jnp.asarray(offsets, jnp.int32) == mask.q_offset)
        out, lse = jax.lax.switch(jnp.asarray(table, jnp.int32)[where], branches, *args)
    return (out[:, :, :L].transpose(0, 2, 1, 3).astype(jnp.float32),
            lse[:, :, :L].transpose(0, 2, 1).astype(jnp.float32))


_FULL = -(2 ** 62)  # the kind of a chunk pair whose every key is visible (up to segment ids)


def _kind(offset: int, L: int, S: int, causal: bool, window: int) -> int | None:
    """Query offset `offset` of L queries over S keys: None (no key visible), `_FULL`, or `offset` (partial).
    Query i sees key j when (causal) i + offset - j >= 0 and (window) i + offset - j < window."""
    lo, hi = offset - (S - 1), offset + (L - 1)  # the range of i + offset - j
    if (causal and hi < 0) or (window > 0 and lo >= window):
        return None
    if (not causal or lo >= 0) and (window == 0 or hi < window):
        return _FULL
    return offset


def _empty(E: int, q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array, kv_seg: jax.Array
           ) -> tuple[jax.Array, jax.Array]:
    B, H, Lp, _ = q.shape
    return jnp.zeros((B, H, Lp, E), q.dtype), jnp.full((B, H, Lp), NEG_INF, jnp.float32)


@functools.lru_cache(maxsize=64)
def _kernel(H: int, Lp: int, Sp: int, causal: bool, window: int, kind: int, bq: int, bkv: int, interpret: bool
            ) -> Any:
    """The splash kernel (forward with its log-sum-exp; dq/dkv mask info) of one kind of chunk pair."""
    if kind == _FULL:
        mask = sp.splash.MultiHeadMask([sp.splash.FullMask((Lp, Sp))] * H)
    else:
        mask = sp._static_mask(H, Lp, Sp, causal, window, kind)
    with jax.ensure_compile_time_eval():
        return sp.splash.make_splash_mha(mask, block_sizes=sp._block_sizes(bq, bkv, backward=True), head_shards=1,
                                         q_seq_shards=1, save_residuals=True, interpret=interpret)


KernelKey = tuple[int, int, int, bool, int, int, int, int, bool]  # `_kernel`'s arguments


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pair(key: KernelKey, q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array, kv_seg: jax.Array
          ) -> tuple[jax.Array, jax.Array]:
    """q [B, H, Lp, E] (scaled), k/v [B, K, Sp, E], segment ids [B, Lp], [B, Sp] -> (out [B, H, Lp, E], lse
    [B, H, Lp])."""
    return _pair_fwd(key, q, k, v, q_seg, kv_seg)[0]


def _pair_fwd(key: KernelKey, q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array, kv_seg: jax.Array
              ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, ...]]:
    kernel = _kernel(*key)
    in_axes = (0, 0, 0, sp.splash.SegmentIds(0, 0))  # type: ignore[arg-type]
    out, (lse,) = jax.vmap(kernel, in_axes=in_axes)(q, k, v, sp.splash.SegmentIds(q=q_seg, kv=kv_seg))
    seen = lse > NEG_INF / 2  # False at the kernel's mask value (no key in a run tile) and NaN (no tile run)
    out = jnp.where(seen[..., None], out, 0).astype(q.dtype)
    lse = jnp.where(seen, lse, NEG_INF)
    return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _pair_bwd(key: KernelKey, res: tuple[jax.Array, ...], cts: tuple[jax.Array, jax.Array]
              ) -> tuple[jax.Array, jax.Array, jax.Array, None, None]:
    q, k, v, q_seg, kv_seg, out, lse = res
    d_out, d_lse = cts
    seen = lse > NEG_INF / 2
    di = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1) - d_lse.astype(jnp.float32)
    di = jnp.where(seen, di, 0.0)
    do = jnp.where(seen[..., None], d_out, 0).astype(q.dtype)
    grads = functools.partial(_grads, _kernel(*key))
    dq, dk, dv = jax.vmap(grads)(q, k, v, q_seg, kv_seg, jnp.where(seen, lse, 0.0), do, di)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_pair.defvjp(_pair_fwd, _pair_bwd)


def _grads(kernel: Any, q: jax.Array, k: jax.Array, v: jax.Array, q_seg: jax.Array, kv_seg: jax.Array,
           lse: jax.Array, do: jax.Array, di: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One sequence: splash's dkv (and, unless fused, dq) kernels, as `_splash_attention_bwd` calls them, with the
    kernel's backward mask info -> (dq [H, Lp, E], dk, dv [K, Sp, E])."""
    assert _KERNELS is not None
    bs, kw = kernel.kwargs["block_sizes"], kernel.kwargs
    common = dict(is_mqa=False, mask_value=kw["mask_value"], attn_logits_soft_cap=kw["attn_logits_soft_cap"],
                  q_layout=bs.q_layout, k_layout=bs.k_layout, v_layout=bs.v_layout,
                  mask_function=kw["mask_function"], interpret=kw["interpret"])
    # by keyword: the arguments `_find_backward` found by name
    tensors = dict(q=q, k=k, v=v, segment_ids=sp.splash.SegmentIds(q=q_seg, kv=kv_seg), sinks=None, logsumexp=lse,
                   do=do, di=di)
    dq, dk, dv = _KERNELS._splash_attention_bwd_dkv(
        **tensors, bq=bs.block_q_dkv, bkv=bs.block_kv_dkv, bkv_compute=bs.block_kv_dkv_compute,
        mask_info=_collapsed(kernel.dkv_mask_info), use_fused_bwd_kernel=bs.use_fused_bwd_kernel, **common)
    if dq is None:
        dq = _KERNELS._splash_attention_bwd_dq(**tensors, bq=bs.block_q_dq, bkv=bs.block_kv_dq,
                                               mask_info=_collapsed(kernel.dq_mask_info), **common)
    return dq, dk, dv


def _collapsed(info: Any) -> Any:
    """Mask info as `_splash_attention` hands it to the kernels (partial mask blocks as [n, bq, bkv])."""
    if info.partial_mask_blocks is None:
        return info
    blocks = info.partial_mask_blocks
    return info._replace(partial_mask_blocks=blocks.reshape(-1, *blocks.shape[-2:]))

