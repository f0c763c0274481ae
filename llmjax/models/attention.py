"""Attention: a mask *description*, a registry of implementations, and the attention layer.

The model never builds a dense mask. It describes which keys each query may see with a
`MaskSpec` (causal or not, query/key segment ids, the offset of the first query in the key
sequence, an optional local window) and hands it to the implementation named by
`model.attention`, which turns it into what it needs: the reference `xla` path builds a
boolean [B, 1, L, S] mask (`MaskSpec.dense`); a blockwise kernel evaluates the same rule per
tile; a fused kernel translates it into its own mask objects.

Adding an implementation: a module that defines `fn(q_BLHE, k_BSKE, v_BSKE, mask, scale, blocks)
-> [B, L, H, E]` (an `AttentionImpl`) and calls `register("name", fn)` when imported, plus one line in
`llmjax.kernels.ATTENTION_MODULES`. `blocks` (`Blocks`: query and key block sizes,
`model.attention_block_q/_kv`) is for tiled kernels; others ignore it. `register(..., check=...)`
may refuse a platform that cannot run it: `check(platform)` raises ConfigError with a message
instead of letting something else run silently. The platform is the one being compiled for
(`target_platform`): the installed mesh's devices, else the `compiling_for` context (`llmjax
compile`), else the default backend.

Shapes: B batch, L queries, S keys, H query heads, K key/value heads (H = K G), E head dim.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
from collections.abc import Callable, Iterator
from typing import Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from llmjax.config import ConfigError, ModelConfig
from llmjax.kernels import ATTENTION_MODULES, attention_names, canonical_attention, causal_tiles, matmul
from llmjax.models import mup
from llmjax.models.layers import Linear, dense_kwargs, make_norm
from llmjax.models.rope import rotary
from llmjax.parallel.rules import constrain, current_sharding

NEG_INF = -1e30


@struct.dataclass
class MaskSpec:
    """Which keys each query may attend to.

    Query i (slot i + q_offset of the key sequence) may see key j iff
      q_segment_ids[b, i] == kv_segment_ids[b, j]                 (same document; 0 = padding)
      and, if `causal`, j <= i + q_offset
      and, if `window` > 0, i + q_offset - j < window             (local attention: the last `window` keys)
    Packed documents give each token its document's segment id, so attention never crosses a
    document; a KV cache passes its slots' segment ids (0 for empty slots) and its fill level.
    `balanced`: the tokens are in context parallelism's balanced order (`llmjax.parallel.context`), so
    a token's slot is not its index; self-attention then runs through `llmjax.kernels.context`.
    `offsets`: where `q_offset` is traced, the values it can take, if known (context parallelism's ring:
    the chunk-pair differences), so that a kernel with static masks (splash) can build one per value.
    """

    q_segment_ids: jax.Array  # [B, L] int32
    kv_segment_ids: jax.Array  # [B, S] int32
    q_offset: jax.Array | int = 0  # [] int32: slot of query 0 among the keys (a KV cache's fill level)
    causal: bool = struct.field(pytree_node=False, default=True)
    window: int = struct.field(pytree_node=False, default=0)  # 0: no window
    balanced: bool = struct.field(pytree_node=False, default=False)  # context parallelism's order
    offsets: tuple[int, ...] = struct.field(pytree_node=False, default=())  # a traced q_offset's values

    @classmethod
    def self_attention(cls, segment_ids_BL: jax.Array, causal: bool = True, window: int = 0) -> MaskSpec:
        """Queries and keys are the same tokens."""
        return cls(segment_ids_BL, segment_ids_BL, 0, causal, window)

    def dense(self) -> jax.Array:
        """The rule as a boolean mask [B, 1, L, S] (True: attend); natural order only."""
        assert not self.balanced, "a balanced-order mask is evaluated by llmjax.kernels.context"
        L, S = self.q_segment_ids.shape[1], self.kv_segment_ids.shape[1]
        allowed = self.q_segment_ids[:, :, None] == self.kv_segment_ids[:, None, :]
        q_slot = jnp.arange(L) + self.q_offset
        if self.causal:
            allowed = jnp.logical_and(allowed, (q_slot[:, None] >= jnp.arange(S)[None, :])[None])
        if self.window > 0:
            allowed = jnp.logical_and(allowed, (q_slot[:, None] - jnp.arange(S)[None, :] < self.window)[None])
        return allowed[:, None]


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes of blockwise kernels: queries per block and keys per block (`model.attention_block_q`,
    `model.attention_block_kv`). Sequences need not divide them (kernels pad)."""

    q: int = 512
    kv: int = 512


class AttentionImpl(Protocol):
    """An attention implementation: (q [B, L, H, E], k, v [B, S, K, E], mask, scale, blocks) -> [B, L, H, E] in
    q's dtype. Arguments are passed by position (implementations name them as they like)."""

    def __call__(self, q_BLHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, mask: MaskSpec, scale: float,
                 blocks: Blocks, /) -> jax.Array: ...


class BlockImpl(Protocol):
    """An implementation's block form for context parallelism's ring: the same arguments as `AttentionImpl`
    -> (out [B, L, H, E] float32, log-sum-exp [B, L, H] float32; NEG_INF where a query sees no key), so that
    blocks of keys can be merged (`merge_blocks`). Differentiable in both outputs."""

    def __call__(self, q_BLHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, mask: MaskSpec, scale: float,
                 blocks: Blocks, /) -> tuple[jax.Array, jax.Array]: ...


AttentionFn = AttentionImpl  # the name this registry had before the Protocol
# check(platform) raises ConfigError where an implementation cannot run ("cpu", "tpu", "gpu").
PlatformCheck = Callable[[str], None]
_IMPLS: dict[str, tuple[AttentionImpl, PlatformCheck | None]] = {}
_BLOCK_IMPLS: dict[AttentionImpl, BlockImpl] = {}
_COMPILING_FOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("llmjax_target_platform", default=None)


def register(name: str, fn: AttentionImpl, check: PlatformCheck | None = None,
             block: BlockImpl | None = None) -> None:
    """Make `fn` the implementation `model.attention=name`; `check(platform)` raises ConfigError where
    it cannot run ("cpu", "tpu", "gpu"); `block` is its form that also returns the log-sum-exp (`BlockImpl`)."""
    _IMPLS[name] = (fn, check)
    if block is not None:
        _BLOCK_IMPLS[fn] = block


def block_form(fn: AttentionImpl) -> BlockImpl:
    """`fn`'s registered `BlockImpl` (ConfigError naming model.attention where it has none)."""
    if fn not in _BLOCK_IMPLS:
        raise ConfigError(f"model.attention: {getattr(fn, '__name__', fn)} does not return the log-sum-exp that "
                          "model.context_parallel=ring merges blocks by (use xla, chunked or splash, or all_gather)")
    return _BLOCK_IMPLS[fn]


def merge_blocks(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Two (out [B, L, H, E], lse [B, L, H]) of the same queries over disjoint keys -> theirs over both keys."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    lse = jnp.logaddexp(lse_a, lse_b)
    out = out_a * jnp.exp(lse_a - lse)[..., None] + out_b * jnp.exp(lse_b - lse)[..., None]
    return out, lse


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """Trace for `platform` ("tpu", "gpu", "cpu") although no mesh is installed yet, e.g. while
    `llmjax compile` initialises abstract parameters for a target topology on a CPU host."""
    token = _COMPILING_FOR.set(normalize_platform(platform))
    try:
        yield
    finally:
        _COMPILING_FOR.reset(token)


def normalize_platform(platform: str) -> str:
    """jax platform names -> "cpu" | "tpu" | "gpu" ("cuda" and "rocm" are GPUs)."""
    platform = platform.lower()
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def target_platform() -> str:
    """The platform being traced for: the installed mesh's devices, else `compiling_for`, else the
    default backend."""
    ctx = current_sharding()
    if ctx is not None:
        return normalize_platform(ctx[0].devices.flat[0].platform)
    override = _COMPILING_FOR.get()
    return override if override is not None else normalize_platform(jax.default_backend())


def get(name: str, platform: str | None = None) -> AttentionImpl:
    """The implementation `model.attention=name` (aliases accepted), imported on first use.

    Raises ConfigError for an unknown name or one that cannot run on `platform` (default:
    `target_platform()`; its `check`)."""
    canonical = canonical_attention(name)
    if canonical not in ATTENTION_MODULES:
        raise ConfigError(f"model.attention: {name!r} is not one of {', '.join(attention_names())}")
    if canonical not in _IMPLS:
        importlib.import_module(ATTENTION_MODULES[canonical])
    fn, check = _IMPLS[canonical]
    if check is not None:
        check(platform or target_platform())
    return fn


def attend(q_BLHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, mask: MaskSpec, impl: str = "xla",
           scale: float | None = None, blocks: Blocks | None = None, softcap: float = 0.0) -> jax.Array:
    """Grouped-query attention of L queries over S keys -> [B, L, H, E] in q's dtype.

    H query heads share K key/value heads in groups of G = H / K (MHA: K = H, MQA: K = 1).
    `scale` multiplies the scores (default E^-1/2); `blocks` are the tile sizes of blockwise
    implementations (default `Blocks()`); `softcap` > 0 maps the scaled scores s to
    softcap tanh(s / softcap) before the mask (the reference `xla` implementation only).
    Sharding: batch over the data axes, heads over `tensor`, as the inputs come (the
    implementations keep it)."""
    scale = q_BLHE.shape[-1] ** -0.5 if scale is None else scale
    if softcap > 0:
        if canonical_attention(impl) != "xla":
            raise ConfigError(f"model.attn_softcap: model.attention={impl} has no score soft-capping (use xla)")
        return xla_attention(q_BLHE, k_BSKE, v_BSKE, mask, scale, softcap=softcap)
    return get(impl)(q_BLHE, k_BSKE, v_BSKE, mask, scale, blocks or Blocks())


def xla_attention(q_BLHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, mask: MaskSpec, scale: float,
                  blocks: Blocks | None = None, softcap: float = 0.0) -> jax.Array:
    """The reference: float32 scores and softmax against the dense mask, in heads-major batched matmuls
    over (B, K) (on XLA:CPU ~2x faster than the equivalent 5-D einsum, forward and backward).
    `softcap` > 0: scores s -> softcap tanh(s / softcap) before the mask. Causal self-attention whose
    length is a multiple of 128 skips the quarter of the scores above the diagonal (`skips_upper_tiles`),
    with the same result (bit for bit at the default model's shape; `llmjax.kernels.causal_tiles`)."""
    B, L, H, E = q_BLHE.shape
    S, K = k_BSKE.shape[1], k_BSKE.shape[2]
    G = H // K
    q_BKGLE = q_BLHE.reshape(B, L, K, G, E).transpose(0, 2, 3, 1, 4)
    k_BKSE = k_BSKE.transpose(0, 2, 1, 3)
    v_BKSE = v_BSKE.transpose(0, 2, 1, 3)
    if skips_upper_tiles(mask, L, S, softcap):  # the same values without the masked tile
        out_BKGLE = causal_tiles.causal_tiled(q_BKGLE, k_BKSE, v_BKSE, mask.dense()[:, 0], scale, NEG_INF, L // 2)
        return out_BKGLE.transpose(0, 3, 1, 2, 4).reshape(B, L, H, E).astype(q_BLHE.dtype)
    q_BKXE = q_BKGLE.reshape(B, K, G * L, E)  # X = G*L
    batch = ((0, 1), (0, 1))
    scores_BKXS = matmul.dot_general(q_BKXE, k_BKSE, (((3,), (3,)), batch))
    probs_BKXS = causal_tiles.probabilities(scores_BKXS, mask.dense()[:, 0], scale, NEG_INF, G, v_BSKE.dtype, softcap)
    out_BKXE = matmul.dot_general(probs_BKXS, v_BKSE, (((3,), (2,)), batch))
    out_BLKGE = out_BKXE.reshape(B, K, G, L, E).transpose(0, 3, 1, 2, 4)
    return out_BLKGE.reshape(B, L, H, E).astype(q_BLHE.dtype)


def skips_upper_tiles(mask: MaskSpec, L: int, S: int, softcap: float = 0.0) -> bool:
    """Whether `xla_attention` runs as `llmjax.kernels.causal_tiles`: causal self-attention in natural order
    (first query at slot 0, not context parallelism's order), no soft-capping, L a multiple of 128."""
    return (mask.causal and not mask.balanced and isinstance(mask.q_offset, int) and mask.q_offset == 0
            and softcap == 0 and causal_tiles.applies(L, S))


def xla_attention_lse(q_BLHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, mask: MaskSpec, scale: float,
                      blocks: Blocks | None = None) -> tuple[jax.Array, jax.Array]:
    """`xla_attention`'s `BlockImpl`: (out [B, L, H, E] float32, lse [B, L, H] float32); a query that may see no
    key gets out 0 and lse NEG_INF (so that `merge_blocks` gives it no weight)."""
    B, L, H, E = q_BLHE.shape
    K = k_BSKE.shape[2]
    G = H // K
    q_BKGLE = q_BLHE.reshape(B, L, K, G, E).transpose(0, 2, 3, 1, 4)
    s = matmul.einsum("bkgle,bske->bkgls", q_BKGLE, k_BSKE) * scale
    allowed = mask.dense()[:, :, None]  # [B, 1, 1, L, S]
    s = jnp.where(allowed, s, NEG_INF)
    m = jax.lax.stop_gradient(s.max(axis=-1))  # the result does not depend on it
    p = jnp.where(allowed, jnp.exp(s - m[..., None]), 0.0)
    total = p.sum(axis=-1)
    seen = total > 0
    total = jnp.where(seen, total, 1.0)
    out = matmul.einsum("bkgls,bske->bkgle", (p / total[..., None]).astype(v_BSKE.dtype), v_BSKE)
    lse = jnp.where(seen, m + jnp.log(total), NEG_INF)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, L, H, E), lse.transpose(0, 3, 1, 2).reshape(B, L, H)


def jax_nn_attention(q_BLHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, mask: MaskSpec,
                     scale: float, blocks: Blocks | None = None) -> jax.Array:
    """`jax.nn.dot_product_attention` with its default backend choice (XLA; for cuDNN use `cudnn`)."""
    return jax.nn.dot_product_attention(q_BLHE, k_BSKE, v_BSKE, mask=mask.dense(), scale=scale).astype(q_BLHE.dtype)


register("xla", xla_attention, block=xla_attention_lse)
# jax.nn's default backend is XLA's: under the ring its blocks are xla's (it returns no log-sum-exp)
register("dot_product_attention", jax_nn_attention, block=xla_attention_lse)


def split_attention(q_BLHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, mask: MaskSpec, cfg: ModelConfig,
                    scale: float | None, blocks: Blocks) -> jax.Array:
    """Self-attention of a sequence split over the context axes in balanced order (`mask.balanced`) by
    `model.context_parallel` (`llmjax.kernels.context`) -> [B, L, H, E]; sharding as `attend`'s."""
    from llmjax.kernels.context import context_attention  # it imports this module
    from llmjax.parallel.context import plan

    layout = plan(q_BLHE.shape[1])
    assert layout is not None, "a balanced mask needs the context layout it was made under"
    scale = q_BLHE.shape[-1] ** -0.5 if scale is None else scale
    return context_attention(layout, cfg.context_parallel, q_BLHE, k_BSKE, v_BSKE, mask, get(cfg.attention), scale,
                             blocks)


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads, optional RoPE, optional KV cache.

    Self-attention (`cross=False`): queries, keys and values from x, RoPE on q and k at `positions`.
    Cross-attention (`cross=True`): keys and values from `kv_x` (e.g. an encoder's output), no RoPE.
    """

    cfg: ModelConfig
    cross: bool = False

    @nn.compact
    def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array, mask: MaskSpec,
                 cache: dict[str, jax.Array] | None = None, kv_x_BSD: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        """x [B, L, D] -> (out [B, L, D], new cache or None).

        Self-attention with `cache` = {"k", "v"} (each [B, S, K, E]): this chunk's keys/values are
        written at slots [mask.q_offset, mask.q_offset + L) and the queries attend over all S slots under
        `mask` (whose kv_segment_ids are the cache's, this chunk's already written).
        Cross-attention: keys/values from `kv_x` when it is given (and stored as the new cache when a cache
        is passed: prefill), else the cache's (decode steps)."""
        cfg = self.cfg
        E, H, K = cfg.resolved_head_dim, cfg.n_heads, cfg.n_kv_heads
        common = dense_kwargs(cfg)
        qkv = {**common, "use_bias": cfg.use_bias or cfg.qkv_bias}
        q = Linear((H, E), ("embed", "heads", "head_dim"), init_std=cfg.init_std, name="q", **qkv)(x_BLD)
        q = constrain(q, ("act_batch", "act_length", "act_heads", None))
        new_cache = None
        if self.cross and kv_x_BSD is None:
            assert cache is not None, "cross-attention without kv_x reads keys and values from the cache"
            k, v = cache["k"].astype(q.dtype), cache["v"].astype(q.dtype)
            new_cache = cache
        else:
            src = kv_x_BSD if self.cross and kv_x_BSD is not None else x_BLD  # cross: kv_x is given here
            k = Linear((K, E), ("embed", "kv_heads", "head_dim"), init_std=cfg.init_std, name="k", **qkv)(src)
            v = Linear((K, E), ("embed", "kv_heads", "head_dim"), init_std=cfg.init_std, name="v", **qkv)(src)
            k = constrain(k, ("act_batch", "act_length", "act_kv_heads", None))
            v = constrain(v, ("act_batch", "act_length", "act_kv_heads", None))
            if self.cross and cache is not None:
                new_cache = {"k": k.astype(cache["k"].dtype), "v": v.astype(cache["v"].dtype)}
        if cfg.qk_norm and not self.cross:  # per head, over E, before RoPE (Qwen3)
            q = make_norm(cfg, "q_norm", "rmsnorm")(q)
            k = make_norm(cfg, "k_norm", "rmsnorm")(k)
        if cfg.position == "rope" and not self.cross:
            q = rotary(q, positions_BL, cfg)
            k = rotary(k, positions_BL, cfg)
        if not self.cross and cache is not None:
            cache_axes = ("act_batch", None, "act_kv_heads", None)
            start = (0, mask.q_offset, 0, 0)
            k = constrain(jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start), cache_axes)
            v = constrain(jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start), cache_axes)
            new_cache = {"k": k, "v": v}
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        scale = mup.attention_scale(cfg)
        if scale is None and cfg.attention_scale_dim > 0:
            scale = cfg.attention_scale_dim ** -0.5
        blocks = Blocks(cfg.attention_block_q, cfg.attention_block_kv)
        if mask.balanced and cache is None and not self.cross:
            out = split_attention(q, k, v, mask, cfg, scale, blocks)
        else:
            out = attend(q, k, v, mask, cfg.attention, scale, blocks, cfg.attn_softcap)
        out = constrain(out, ("act_batch", "act_length", "act_heads", None))
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        out = Linear((cfg.d_model,), ("heads", "head_dim", "embed"), n_in=2, init_std=out_std, name="o", **common)(out)
        return out, new_cache

