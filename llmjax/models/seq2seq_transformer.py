"""The encoder-decoder transformer (T5-style): a bidirectional encoder, a causal decoder with cross-attention.

Parameter tree (layout-independent; `layers` is each stack's leading dimension):
  embed/embedding                   [V, D]      shared by encoder, decoder and (tied) the output
  pos_embed/embedding               [max_len, D] position="learned" only (shared)
  encoder/...                       [N_enc, ...] blocks as in `llmjax.models.transformer` (bidirectional)
  encoder_norm/scale                [D]
  decoder/...                       [N, ...]     blocks with cross_norm and cross_attn/{q,k,v,o}
  final_norm/scale, lm_head/kernel  as in the decoder LM
Positions: RoPE in self-attention (encoder and decoder), none in cross-attention (or learned
absolute positions added to the embeddings). T5's relative-position bias is not implemented.

KV cache (decoding): the decoder's self-attention cache as in the decoder LM plus, per decoder
layer, the cross-attention keys/values of the encoder output (computed once, at prefill):
  layers         {"k", "v": [N, B, S, K, E], "cross_k", "cross_v": [N, B, S_enc, K, E]}
  segment_ids    [B, S]      cross_segment_ids [B, S_enc]     index []
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.config.family_spec import EncoderDecoderConfig
from llmjax.models.attention import MaskSpec
from llmjax.models.blocks import StackInputs, layer_stack, stack_unit
from llmjax.models.layers import make_norm
from llmjax.models.transformer import (
    CACHE_AXES,
    cached_mask,
    embed_tokens,
    layers_view,
    make_embeddings,
    output_logits,
    units_view,
)
from llmjax.parallel.rules import constrain


def _merge_aux(a: dict, b: dict) -> dict:
    """Feed-forward aux of two stacks, concatenated along the layer dimension (encoder first)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = jax.tree.map(lambda x, y: jnp.concatenate([x, y]), out[k], v) if k in out else v
    return out


class EncoderDecoder(nn.Module):
    """__call__(encoder tokens/segment ids/positions [B, S], decoder tokens/segment ids/positions [B, L])
    -> logits [B, L, V] float32 ("act_batch", "act_length", "act_vocab"): the decoder's next-token
    logits, every decoder token attending causally to its own segment and, through cross-attention,
    to the encoder tokens of the same segment id.

    With `cache`: prefill when the encoder inputs are given (the encoder runs, every decoder layer's
    cross-attention keys/values are written to the cache, and the decoder chunk is processed), else a
    decode step over the cached encoder keys/values -> (logits, new cache)."""

    cfg: EncoderDecoderConfig

    @nn.compact
    def __call__(self, enc_tokens_BS: jax.Array | None, enc_segment_ids_BS: jax.Array | None,
                 enc_positions_BS: jax.Array | None, dec_tokens_BL: jax.Array, dec_segment_ids_BL: jax.Array,
                 dec_positions_BL: jax.Array, cache: dict[str, Any] | None = None) -> Any:
        cfg = self.cfg
        aux: dict = {}
        enc_x = None
        embed, pos_embed = make_embeddings(cfg)
        if enc_tokens_BS is not None:
            assert enc_segment_ids_BS is not None and enc_positions_BS is not None, \
                "encoder tokens come with their segment ids and positions"
            x = embed_tokens(embed, pos_embed, enc_tokens_BS, enc_positions_BS, cfg.scale_embeddings)
            unit, n = stack_unit(cfg, n_layers=cfg.encoder_layers)
            inputs = StackInputs(enc_positions_BS, MaskSpec.self_attention(enc_segment_ids_BS, causal=False))
            x, _, aux = layer_stack(self, "encoder", unit, n, x, inputs)
            enc_x = make_norm(cfg, "encoder_norm")(x)
        y = embed_tokens(embed, pos_embed, dec_tokens_BL, dec_positions_BL, cfg.scale_embeddings)
        unit, n = stack_unit(cfg, cross=True)
        if cache is None:
            mask, layer_cache = MaskSpec.self_attention(dec_segment_ids_BL, causal=True), None
            cross_seg = enc_segment_ids_BS
        else:
            mask, kv_seg = cached_mask(cache, dec_segment_ids_BL, causal=True)
            layer_cache = units_view(jax.tree.map(lambda a: constrain(a, CACHE_AXES), cache["layers"]), n)
            cross_seg = cache["cross_segment_ids"] if enc_segment_ids_BS is None else enc_segment_ids_BS
        assert cross_seg is not None, "without a cache the encoder inputs are required"
        cross_mask = MaskSpec(dec_segment_ids_BL, cross_seg, 0, causal=False)
        inputs = StackInputs(dec_positions_BL, mask, enc_x, cross_mask)
        y, new_layers, dec_aux = layer_stack(self, "decoder", unit, n, y, inputs, layer_cache)
        aux = _merge_aux(aux, dec_aux)
        if cache is None and aux:
            self.sow("intermediates", "ffn_aux", aux)
        logits = output_logits(cfg, y, embed)
        if cache is None:
            return logits
        assert new_layers is not None  # layer_stack returns the new cache when given one
        new_layers = jax.tree.map(lambda a: constrain(a, CACHE_AXES), layers_view(new_layers, cfg.n_layers))
        return logits, {"layers": new_layers, "segment_ids": kv_seg, "cross_segment_ids": cross_seg,
                        "index": cache["index"] + dec_tokens_BL.shape[1]}
