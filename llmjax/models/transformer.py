"""The decoder: embeddings, a scanned stack of pre-norm blocks, final norm, LM head.

Parameter tree (layout-independent; `layers` is the scanned leading dimension):
  embed/embedding                [V, D]            ("vocab", "embed")
  pos_embed/embedding            [max_len, D]      (None, "embed")        position="learned" only
  layers/attn_norm/scale         [N, D]            ("layers", "norm")
  layers/attn/{q,k,v,o}/kernel   [N, D, H|K, E] / [N, H, E, D]
  layers/mlp_norm/scale          [N, D]
  layers/mlp/{wi_0,wi_1,wo}/kernel [N, D, F] / [N, F, D]
  layers/moe/...                 MoE layers (model.moe.num_experts > 0) instead of layers/mlp: see models/moe.py
  final_norm/scale               [D]
  lm_head/kernel                 [D, V]            ("embed", "vocab")     untied only

With model.moe.every = k > 1 the scan runs over n_layers / k groups of k blocks (`BlockGroup`):
  layers/block_{j}/...  j < k-1 dense blocks, j = k-1 the MoE block, each with the [N / k] leading dim.
MoE models sow their per-layer router statistics (stacked over MoE layers) as
intermediates/moe (see `llmjax.train.step.forward`).

KV cache (inference; `init_cache`): a dict of
  k, v          [N, B, S, K, E]   ("layers", "act_batch", None, "act_kv_heads", None)
  segment_ids   [B, S] int32      segment of each filled slot; 0 = empty or padding (never attended)
  index         [] int32          slots filled so far; the next chunk is written from here
Passing `cache=` to `Transformer.__call__` writes the chunk's keys/values at `index` and
returns `(logits, new_cache)`; without it the model is exactly the training model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig, MoEConfig
from llmjax.models.attention import Attention, MaskSpec
from llmjax.models.layers import MLP, Embed, Linear, dtype, make_norm
from llmjax.models.moe import MoE, merge_microbatch_aux
from llmjax.parallel.pipeline import Schedule
from llmjax.parallel.pipeline import run as run_pipeline
from llmjax.parallel.rules import constrain

REMAT_POLICIES: dict[str, Any] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "minimal": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)). Scan-compatible."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array, segment_ids_BL: jax.Array, positions_BL: jax.Array,
                 kv_cache: tuple[jax.Array, jax.Array] | None = None, kv_segment_ids_BS: jax.Array | None = None,
                 cache_index: jax.Array | None = None):
        """-> (x, None), or with `kv_cache` (this layer's (k, v)) -> (x, new (k, v)).

        MoE layers (`cfg.moe.enabled`) without a cache return (x, aux) (see `llmjax.models.moe.MoE`)."""
        cfg = self.cfg
        h = make_norm(cfg, "attn_norm")(x_BLD)
        if kv_cache is None:
            attn, new_cache = Attention(cfg, name="attn")(h, positions_BL, MaskSpec.self_attention(segment_ids_BL))
        else:
            mask = MaskSpec(segment_ids_BL, kv_segment_ids_BS, cache_index)
            attn, c = Attention(cfg, name="attn")(h, positions_BL, mask, {"k": kv_cache[0], "v": kv_cache[1]})
            new_cache = (c["k"], c["v"])
        x_BLD = x_BLD + attn
        h = make_norm(cfg, "mlp_norm")(x_BLD)
        if cfg.moe.enabled:
            ff, moe_aux = MoE(cfg, name="moe")(h)
        else:
            ff, moe_aux = MLP(cfg, name="mlp")(h), None
        x_BLD = x_BLD + ff
        # The second output is stacked over layers by the scan: the new cache, else the MoE aux dict (or None).
        x_BLD = constrain(x_BLD, ("act_batch", "act_length", "act_embed"))
        return x_BLD, new_cache if kv_cache is not None else moe_aux


class BlockGroup(nn.Module):
    """`cfg.moe.every` consecutive blocks, the last one MoE and the others dense (`moe.every > 1`).

    The scan runs over n_layers / every identical groups; parameters are `block_{j}/...` with a
    leading dimension of one entry per group. With `kv_cache` (this group's (k, v), each
    [every, B, S, K, E]) returns (x, new (k, v)); else (x, the MoE block's aux)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array, segment_ids_BL: jax.Array, positions_BL: jax.Array,
                 kv_cache: tuple[jax.Array, jax.Array] | None = None, kv_segment_ids_BS: jax.Array | None = None,
                 cache_index: jax.Array | None = None):
        cfg = self.cfg
        every = cfg.moe.every
        dense = dataclasses.replace(cfg, moe=MoEConfig())
        ks, vs, aux = [], [], None
        for j in range(every):
            block = Block(cfg if j == every - 1 else dense, name=f"block_{j}")
            if kv_cache is None:
                x_BLD, aux = block(x_BLD, segment_ids_BL, positions_BL)
            else:
                x_BLD, (k, v) = block(x_BLD, segment_ids_BL, positions_BL, (kv_cache[0][j], kv_cache[1][j]),
                                      kv_segment_ids_BS, cache_index)
                ks.append(k)
                vs.append(v)
        return x_BLD, aux if kv_cache is None else (jnp.stack(ks), jnp.stack(vs))


def grouped(cfg: ModelConfig) -> bool:
    """Whether the stack scans over `BlockGroup`s (MoE every k-th layer, k > 1) rather than `Block`s."""
    return cfg.moe.enabled and cfg.moe.every > 1


def scan_unit(cfg: ModelConfig) -> tuple[type[nn.Module], int]:
    """(the scanned module, how many of them): (Block, n_layers), or (BlockGroup, n_layers / every)."""
    return (BlockGroup, cfg.n_layers // cfg.moe.every) if grouped(cfg) else (Block, cfg.n_layers)


def stacked_blocks(cfg: ModelConfig, block: type[nn.Module] | None = None, cached: bool = False) -> type[nn.Module]:
    """`block` (default: `scan_unit(cfg)`) wrapped in the configured remat policy and scanned over the layers.

    `cached=True` (inference, no remat): the block also takes its layer's slice of the KV
    cache (scanned over the leading `layers` axis) and the broadcast cache segment ids and
    index, and the scan stacks the updated per-layer caches.
    """
    unit, length = scan_unit(cfg)
    block = block or unit
    if cfg.remat != "none" and not cached:
        block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    in_axes = (nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast) if cached else (nn.broadcast, nn.broadcast)
    return nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "router": True},
        in_axes=in_axes,
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


def unrolled_blocks(cfg: ModelConfig, stacked_params: Any, x_BLD: jax.Array, segment_ids_BL: jax.Array,
                    positions_BL: jax.Array, kv_cache: tuple[jax.Array, jax.Array] | None = None,
                    kv_segment_ids_BS: jax.Array | None = None, cache_index: jax.Array | None = None,
                    return_aux: bool = False, router_rng: jax.Array | None = None) -> Any:
    """The same stack as `stacked_blocks`, from the same stacked parameters, as a Python loop.

    XLA then sees straight-line code: no loop-carried buffers to zero-fill for the
    backward pass (about 7% faster on CPU for small models), at the cost of compile time
    that grows with depth. The parameter tree, hence every checkpoint, is unchanged.
    With `kv_cache` ((k, v), each [N, B, S, K, E], or [N / every, every, ...] when `grouped`)
    returns (x, new (k, v)); else x, or with `return_aux` (x, the MoE aux stacked over MoE
    layers, or None for a dense model). `router_rng`: the MoE router-jitter key (scanned unit i
    uses fold_in(router_rng, i)).
    """
    layer = lambda i: jax.tree.map(lambda p: p[i], stacked_params)  # noqa: E731
    Unit, n_units = scan_unit(cfg)
    if kv_cache is not None:
        ks, vs = [], []
        for i in range(n_units):
            x_BLD, (k, v) = Unit(cfg).apply({"params": layer(i)}, x_BLD, segment_ids_BL, positions_BL,
                                             (kv_cache[0][i], kv_cache[1][i]), kv_segment_ids_BS, cache_index)
            ks.append(k)
            vs.append(v)
        return x_BLD, (jnp.stack(ks), jnp.stack(vs))
    x_BLD, aux = apply_units(cfg, stacked_params, x_BLD, segment_ids_BL, positions_BL, router_rng, scan=False)
    return (x_BLD, aux) if return_aux else x_BLD


def apply_units(cfg: ModelConfig, stacked_params: Any, x_BLD: jax.Array, segment_ids_BL: jax.Array,
                positions_BL: jax.Array, router_rng: jax.Array | None = None, first_unit: jax.Array | int = 0,
                scan: bool | None = None, remat: bool = True) -> tuple[jax.Array, Any]:
    """Apply the scanned units (`scan_unit(cfg)`) whose stacked parameters (leaves [n, ...]) are given,
    in order, functionally, each under the configured remat policy. No KV cache.

    x [B, L, D] ("act_batch", "act_length", "act_embed") -> (x, the MoE aux stacked over the n units, or
    None for a dense model). `router_rng`: the MoE router-jitter key; unit i of the whole stack uses
    fold_in(router_rng, i), i = `first_unit` + its index here. `scan`: a `lax.scan` over the units
    (default `cfg.scan_layers`), else a Python loop. `remat=False`: no per-unit remat (the caller
    rematerialises a larger region)."""
    Unit, _ = scan_unit(cfg)
    n_units = jax.tree.leaves(stacked_params)[0].shape[0]
    scan = cfg.scan_layers if scan is None else scan

    def block(params: Any, x: jax.Array, i: jax.Array | int) -> tuple[jax.Array, Any]:
        rngs = None if router_rng is None else {"router": jax.random.fold_in(router_rng, i)}
        return Unit(cfg).apply({"params": params}, x, segment_ids_BL, positions_BL, rngs=rngs)

    if remat and cfg.remat != "none":
        block = jax.checkpoint(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not scan)
    if scan:
        def body(x: jax.Array, xs: tuple[Any, jax.Array]) -> tuple[jax.Array, Any]:
            return block(xs[0], x, xs[1])

        x_BLD, aux = jax.lax.scan(body, x_BLD, (stacked_params, first_unit + jnp.arange(n_units, dtype=jnp.int32)))
    else:
        auxes = []
        for i in range(n_units):
            x_BLD, a = block(jax.tree.map(lambda p, i=i: p[i], stacked_params), x_BLD, first_unit + i)
            auxes.append(a)
        aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes) if cfg.moe.enabled else None
    return x_BLD, (aux if cfg.moe.enabled else None)


def pipelined_blocks(cfg: ModelConfig, schedule: Schedule, stacked_params: Any, x_BLD: jax.Array,
                     segment_ids_BL: jax.Array, positions_BL: jax.Array, router_rng: jax.Array | None = None
                     ) -> tuple[jax.Array, Any]:
    """The layer stack run by the pipeline `schedule` (`llmjax.parallel.pipeline.run`), from the same
    stacked parameters (their `layers` dimension split over `pipeline`). No KV cache.

    x [B, L, D] ("act_batch", "act_length", "act_embed"), B divisible by the microbatches -> (x, the
    MoE aux stacked over MoE layers as for the unpipelined stack, or None for a dense model). MoE
    router statistics are merged over the microbatches (`moe.merge_microbatch_aux`) and equal the
    unpipelined ones (routing is per token, capacity groups are sequences). `cfg.remat` applies to
    each stage's units per schedule iteration (one remat region per stage and iteration, not one per
    layer). Router jitter: unit i on microbatch m uses fold_in(fold_in(router_rng, m), i)."""

    def stage(params_U: Any, x: jax.Array, side: tuple[jax.Array, ...], first_unit: jax.Array,
              microbatch: jax.Array) -> tuple[jax.Array, Any]:
        rng = None if router_rng is None else jax.random.fold_in(router_rng, microbatch)
        return apply_units(cfg, params_U, x, side[0], side[1], rng, first_unit, remat=False)

    x_BLD, aux = run_pipeline(schedule, stage, stacked_params, x_BLD, (segment_ids_BL, positions_BL),
                              ("act_batch", "act_length", "act_embed"), (("act_batch", "act_length"),) * 2,
                              remat_policy=REMAT_POLICIES.get(cfg.remat))
    return x_BLD, (merge_microbatch_aux(aux) if cfg.moe.enabled else None)


CACHE_AXES = ("layers", "act_batch", None, "act_kv_heads", None)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype_name: str | None = None) -> dict[str, jax.Array]:
    """An empty KV cache for `batch` sequences of up to `length` tokens (see the module docstring).

    Keys/values are stored in `dtype_name` (default: the compute dtype)."""
    shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.resolved_head_dim)
    dt = dtype(dtype_name or cfg.compute_dtype)
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt), "segment_ids": jnp.zeros((batch, length), jnp.int32),
            "index": jnp.zeros((), jnp.int32)}


def cache_logical_axes() -> dict[str, tuple[str | None, ...]]:
    """Logical axis names of each cache entry (batch over the data axes, kv heads over `tensor`)."""
    return {"k": CACHE_AXES, "v": CACHE_AXES, "segment_ids": ("act_batch", None), "index": ()}


class Transformer(nn.Module):
    """Decoder-only language model.

    __call__(tokens [B, L] int32, segment_ids [B, L] int32 = ones, positions [B, L] int32 =
    arange) -> logits [B, L, V] float32, sharded ("act_batch", "act_length", "act_vocab").
    Tokens of different segments (packed documents) never attend to each other.

    `pipeline`: run the layer stack with this pipeline schedule (`pipelined_blocks`; the
    parameters are the same). Only the forward without a cache is pipelined: with `cache=`
    (inference) the stack runs unpipelined over the same parameters.
    """

    cfg: ModelConfig
    pipeline: Schedule | None = None

    @nn.compact
    def __call__(self, tokens_BL: jax.Array, segment_ids_BL: jax.Array | None = None,
                 positions_BL: jax.Array | None = None, cache: dict[str, jax.Array] | None = None) -> Any:
        """-> logits; with `cache` (see `init_cache`) -> (logits, new cache), the chunk written at cache["index"].

        With a cache, `positions_BL` should be given (each sequence's own positions, from 0),
        and `segment_ids_BL` 0 for padding tokens (they are then never attended)."""
        cfg = self.cfg
        B, L = tokens_BL.shape
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones((B, L), jnp.int32)
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        compute, params = dtype(cfg.compute_dtype), dtype(cfg.param_dtype)
        embed = Embed(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std, compute_dtype=compute,
                      param_dtype=params, name="embed")
        x = embed(tokens_BL)
        if cfg.position == "learned":
            pos = Embed(cfg.max_seq_len, cfg.d_model, axes=(None, "embed"), init_std=cfg.init_std,
                        compute_dtype=compute, param_dtype=params, name="pos_embed")
            x = x + pos(positions_BL)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        new_cache = None
        if cache is not None:
            index = cache["index"]
            kv_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids_BL.astype(jnp.int32), (0, index))
            kv_seg = constrain(kv_seg, ("act_batch", None))
            kv = (constrain(cache["k"], CACHE_AXES), constrain(cache["v"], CACHE_AXES))
            if grouped(cfg):  # [N, ...] -> [N / every, every, ...]: one entry per scanned group
                kv = tuple(a.reshape(cfg.n_layers // cfg.moe.every, cfg.moe.every, *a.shape[1:]) for a in kv)
            if cfg.scan_layers or self.is_initializing():
                x, (k, v) = stacked_blocks(cfg, cached=True)(cfg, name="layers")(
                    x, segment_ids_BL, positions_BL, kv, kv_seg, index)
            else:
                x, (k, v) = unrolled_blocks(cfg, self.variables["params"]["layers"], x, segment_ids_BL,
                                            positions_BL, kv, kv_seg, index)
            k, v = (a.reshape(cfg.n_layers, *a.shape[2:]) if grouped(cfg) else a for a in (k, v))
            new_cache = {"k": constrain(k, CACHE_AXES), "v": constrain(v, CACHE_AXES), "segment_ids": kv_seg,
                         "index": index + L}
        elif self.pipeline is not None and not self.is_initializing():
            jitter = cfg.moe.enabled and cfg.moe.router_jitter > 0 and self.has_rng("router")
            x, moe_aux = pipelined_blocks(cfg, self.pipeline, self.variables["params"]["layers"], x, segment_ids_BL,
                                          positions_BL, router_rng=self.make_rng("router") if jitter else None)
        elif cfg.scan_layers or self.is_initializing():
            x, moe_aux = stacked_blocks(cfg)(cfg, name="layers")(x, segment_ids_BL, positions_BL)
        else:
            jitter = cfg.moe.enabled and cfg.moe.router_jitter > 0 and self.has_rng("router")
            x, moe_aux = unrolled_blocks(cfg, self.variables["params"]["layers"], x, segment_ids_BL, positions_BL,
                                         return_aux=True, router_rng=self.make_rng("router") if jitter else None)
        if cache is None and cfg.moe.enabled:
            # Per-layer router statistics, stacked over layers; read with `apply(..., mutable=["intermediates"])`.
            self.sow("intermediates", "moe", moe_aux)
        x = make_norm(cfg, "final_norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = Linear((cfg.vocab_size,), ("embed", "vocab"), init_std=cfg.init_std, compute_dtype=compute,
                            param_dtype=params, output_dtype=jnp.float32, name="lm_head")(x)
        logits = constrain(logits, ("act_batch", "act_length", "act_vocab"))
        return logits if cache is None else (logits, new_cache)
