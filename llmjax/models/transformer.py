"""The language-model transformer: embeddings, a stack of pre-norm blocks, final norm, LM head.

The decoder family runs it causally; the encoder family (BERT-style) bidirectionally
(`causal=False`). Parameter tree (layout-independent; `layers` is the stacked leading dimension):
  embed/embedding                [V, D]            ("vocab", "embed")
  pos_embed/embedding            [max_len, D]      ("position", "embed")   position="learned" only
  layers/attn_norm/scale         [N, D]            ("layers", "norm")
  layers/attn/{q,k,v,o}/kernel   [N, D, H|K, E] / [N, H, E, D]
  layers/mlp_norm/scale          [N, D]
  layers/mlp/{wi_0,wi_1,wo}/kernel [N, D, F] / [N, F, D]
  layers/moe/...                 MoE layers (model.moe.num_experts > 0) instead of layers/mlp: see models/moe.py
  final_norm/scale               [D]
  lm_head/kernel                 [D, V]            ("embed", "vocab")     untied only

With model.moe.every = k > 1 the stack runs over n_layers / k groups of k blocks (`BlockGroup`):
  layers/block_{j}/...  j < k-1 dense blocks, j = k-1 the MoE block, each with the [N / k] leading dim.
Feed-forward statistics (MoE router statistics, stacked over MoE layers) are sown as
intermediates/ffn_aux = {kind: aux} (see `llmjax.models.families.base.forward`).

KV cache (inference; `init_cache`): a dict of
  layers        {"k", "v"}: [N, B, S, K, E]   ("layers", "act_batch", None, "act_kv_heads", None)
  segment_ids   [B, S] int32      segment of each filled slot; 0 = empty or padding
  index         [] int32          slots filled so far; the next chunk is written from here
Passing `cache=` to `Transformer.__call__` writes the chunk's keys/values at `index` and
returns `(logits, new_cache)`; without it the model is exactly the training model.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.models.attention import MaskSpec
from llmjax.models.blocks import StackInputs, layer_stack, stack_unit
from llmjax.models.layers import Embed, Linear, dtype, make_norm
from llmjax.parallel import context
from llmjax.parallel.pipeline import Schedule
from llmjax.parallel.rules import constrain

CACHE_AXES = ("layers", "act_batch", None, "act_kv_heads", None)
LOGITS = ("act_batch", "act_length", "act_vocab")


def make_embeddings(cfg: ModelConfig) -> tuple[Embed, Embed | None]:
    """Inside a compact method: the token table `embed` and, with learned positions, `pos_embed`."""
    compute, params = dtype(cfg.compute_dtype), dtype(cfg.param_dtype)
    embed = Embed(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std, compute_dtype=compute, param_dtype=params,
                  name="embed")
    pos = None
    if cfg.position == "learned":
        pos = Embed(cfg.max_seq_len, cfg.d_model, axes=("position", "embed"), init_std=cfg.init_std,
                    compute_dtype=compute, param_dtype=params, name="pos_embed")
    return embed, pos


def embed_tokens(embed: Embed, pos_embed: Embed | None, tokens_BL: jax.Array, positions_BL: jax.Array,
                 scale: bool = False) -> jax.Array:
    """Token embeddings (x sqrt(D) with `scale`, `model.scale_embeddings`) (+ learned positions) [B, L, D],
    sharded ("act_batch", "act_length", "act_embed")."""
    x = embed(tokens_BL)
    if scale:  # the multiplier rounded to the activations' dtype, as Gemma does
        x = x * jnp.asarray(embed.features ** 0.5, x.dtype)
    if pos_embed is not None:
        x = x + pos_embed(positions_BL)
    return constrain(x, ("act_batch", "act_length", "act_embed"))


def output_logits(cfg: ModelConfig, x_BLD: jax.Array, embed: Embed, norm_name: str = "final_norm") -> jax.Array:
    """Inside a compact method: final norm then the tied (`embed`) or untied (`lm_head`) projection ->
    logits [B, L, V] float32, sharded ("act_batch", "act_length", "act_vocab")."""
    x = make_norm(cfg, norm_name)(x_BLD)
    return project_to_vocab(cfg, x, embed)


def project_to_vocab(cfg: ModelConfig, x: jax.Array, embed: Embed) -> jax.Array:
    """Inside a compact method: final-norm hidden states [B, L, D] -> logits [B, L, V] float32
    (soft-capped to c tanh(z / c) with `model.logit_softcap` = c > 0)."""
    if cfg.tie_embeddings:
        logits = embed.attend(x)
    else:
        logits = Linear((cfg.vocab_size,), ("embed", "vocab"), init_std=cfg.init_std,
                        compute_dtype=dtype(cfg.compute_dtype), param_dtype=dtype(cfg.param_dtype),
                        output_dtype=jnp.float32, name="lm_head")(x)
    if cfg.logit_softcap > 0:
        logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
    return constrain(logits, LOGITS)


def output_matrix(cfg: ModelConfig, params: Any) -> tuple[jax.Array, int]:
    """(the output projection's weights, their vocabulary axis): the untied lm_head kernel [D, V] (axis 1)
    or, with tied embeddings, the embedding table [V, D] (axis 0); logits = final hidden states x it."""
    if cfg.tie_embeddings:
        return params["embed"]["embedding"], 0
    return params["lm_head"]["kernel"], 1


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype_name: str | None = None,
               n_layers: int | None = None) -> dict[str, Any]:
    """An empty KV cache for `batch` sequences of up to `length` tokens (see the module docstring).

    Keys/values are stored in `dtype_name` (default: the compute dtype)."""
    shape = (n_layers or cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.resolved_head_dim)
    dt = dtype(dtype_name or cfg.compute_dtype)
    return {"layers": {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)},
            "segment_ids": jnp.zeros((batch, length), jnp.int32), "index": jnp.zeros((), jnp.int32)}


def cache_logical_axes(cache: dict[str, Any]) -> dict[str, Any]:
    """Logical axis names of each cache entry (batch over the data axes, kv heads over `tensor`)."""
    out = {k: ("act_batch", None) for k in cache if k.endswith("segment_ids")}
    return {**out, "layers": {k: CACHE_AXES for k in cache["layers"]}, "index": ()}


def units_view(layers: dict[str, jax.Array], n_units: int) -> dict[str, jax.Array]:
    """Per-layer cache entries [N, ...] -> [n_units, N / n_units, ...] when units are groups of blocks."""
    n = jax.tree.leaves(layers)[0].shape[0]
    return layers if n == n_units else jax.tree.map(lambda a: a.reshape(n_units, n // n_units, *a.shape[1:]), layers)


def layers_view(units: dict[str, jax.Array], n_layers: int) -> dict[str, jax.Array]:
    """The inverse of `units_view`: [n_units, k, ...] -> [N, ...]."""
    return jax.tree.map(lambda a: a.reshape(n_layers, *a.shape[2:]) if a.shape[0] != n_layers else a, units)


def cached_mask(cache: dict[str, Any], segment_ids_BL: jax.Array, causal: bool, window: int = 0
                ) -> tuple[MaskSpec, jax.Array]:
    """(the mask of a chunk written at the cache's fill level, the cache's updated segment ids [B, S])."""
    index = cache["index"]
    kv_seg = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids_BL.astype(jnp.int32), (0, index))
    kv_seg = constrain(kv_seg, ("act_batch", None))
    return MaskSpec(segment_ids_BL, kv_seg, index, causal, window), kv_seg


class Transformer(nn.Module):
    """Language model: tokens [B, L] -> logits [B, L, V].

    __call__(tokens [B, L] int32, segment_ids [B, L] int32 = ones, positions [B, L] int32 = arange)
    -> logits [B, L, V] float32, sharded ("act_batch", "act_length", "act_vocab"). Tokens of different
    segments (packed documents) never attend to each other; `causal=False` lets every token see its
    whole segment (an encoder).

    `pipeline`: run the layer stack with this pipeline schedule (same parameters). Only the forward
    without a cache is pipelined: with `cache=` (inference) the stack runs unpipelined.
    """

    cfg: ModelConfig
    pipeline: Schedule | None = None
    causal: bool = True

    @nn.compact
    def __call__(self, tokens_BL: jax.Array, segment_ids_BL: jax.Array | None = None,
                 positions_BL: jax.Array | None = None, cache: dict[str, Any] | None = None,
                 return_hidden: bool = False) -> Any:
        """-> logits; with `cache` (see `init_cache`) -> (logits, new cache), the chunk written at cache["index"].

        With a cache, `positions_BL` should be given (each sequence's own positions, from 0), and
        `segment_ids_BL` 0 for padding tokens (they are then never attended). `return_hidden=True` (no
        cache): the final-norm hidden states [B, L, D] instead of the logits, for a chunked loss
        (`output_matrix` gives the projection's weights)."""
        cfg = self.cfg
        B, L = tokens_BL.shape
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones((B, L), jnp.int32)
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        split = context.plan(L) if cache is None and self.pipeline is None else None
        if split is not None:  # context parallelism: the stack runs in balanced order (true positions moved along)
            tokens_BL, segment_ids_BL, positions_BL = (split.balance(a) for a in
                                                       (tokens_BL, segment_ids_BL, positions_BL))
        embed, pos_embed = make_embeddings(cfg)
        x = embed_tokens(embed, pos_embed, tokens_BL, positions_BL, cfg.scale_embeddings)
        unit, n_units = stack_unit(cfg)
        if cache is None:
            mask = MaskSpec(segment_ids_BL, segment_ids_BL, 0, self.causal, 0, balanced=split is not None)
            layer_cache = None
        else:
            mask, kv_seg = cached_mask(cache, segment_ids_BL, self.causal)
            layer_cache = units_view(jax.tree.map(lambda a: constrain(a, CACHE_AXES), cache["layers"]), n_units)
        causal = self.causal

        def make_inputs(seg: jax.Array, pos: jax.Array) -> StackInputs:
            return StackInputs(pos, MaskSpec.self_attention(seg, causal))

        x, new_layers, aux = layer_stack(self, "layers", unit, n_units, x, StackInputs(positions_BL, mask),
                                         layer_cache, pipeline=self.pipeline, side=(segment_ids_BL, positions_BL),
                                         make_inputs=make_inputs)
        if cache is None and aux:
            self.sow("intermediates", "ffn_aux", aux)
        if split is not None:
            x = constrain(split.unbalance(x), ("act_batch", "act_length", "act_embed"))
        x = make_norm(cfg, "final_norm")(x)
        if return_hidden and cache is None and not self.is_initializing():
            return constrain(x, ("act_batch", "act_length", "act_embed"))
        logits = project_to_vocab(cfg, x, embed)
        if cache is None:
            return logits
        assert new_layers is not None  # layer_stack returns the new cache when given one
        new_layers = jax.tree.map(lambda a: constrain(a, CACHE_AXES), layers_view(new_layers, cfg.n_layers))
        return logits, {"layers": new_layers, "segment_ids": kv_seg, "index": cache["index"] + L}
