"""The encoder-decoder family (T5-style): span corruption, cross-attention, KV-cache decoding."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from llmjax.config import ConfigError
from llmjax.config.family_spec import EncoderDecoderConfig
from llmjax.data.stream.row_objectives import SpanCorruption
from llmjax.models.families.base import Batch, Cache, DecodingFamily, FFNAux, FieldTypes, Params, TokenIds, forward
from llmjax.models.feedforward import ffn_kinds, layer_kinds
from llmjax.models.seq2seq_transformer import EncoderDecoder
from llmjax.models.transformer import cache_logical_axes, init_cache
from llmjax.parallel.pipeline import Schedule


@struct.dataclass
class Seq2SeqBatch:
    """Encoder fields [B, S], decoder fields and `weights` [B, L] (S = data.seq_len, L the target length)."""

    encoder_inputs: jax.Array
    encoder_segment_ids: jax.Array
    encoder_positions: jax.Array
    decoder_inputs: jax.Array
    decoder_targets: jax.Array
    decoder_segment_ids: jax.Array
    decoder_positions: jax.Array
    weights: jax.Array  # float32

    FIELDS: ClassVar[FieldTypes] = {
        "encoder_inputs": np.int32, "encoder_segment_ids": np.int32, "encoder_positions": np.int32,
        "decoder_inputs": np.int32, "decoder_targets": np.int32, "decoder_segment_ids": np.int32,
        "decoder_positions": np.int32, "weights": np.float32}

    @property
    def targets(self) -> jax.Array:
        return self.decoder_targets


class EncoderDecoderFamily(DecodingFamily[EncoderDecoderConfig, "Seq2SeqBatch"]):
    """`EncoderDecoder` trained on span corruption (`SpanCorruption`): the loss is the decoder's NLL of
    the targets (sentinels, spans, EOS). Decoding: the prompt goes through the encoder once; the decoder
    starts from the reserved start id. No pipeline parallelism (two stacks)."""

    name = "encoder_decoder"
    batch_type: ClassVar[type[Batch]] = Seq2SeqBatch

    def module(self, pipeline: Schedule | None = None) -> nn.Module:
        if pipeline is not None:
            raise ConfigError("mesh.pipeline: model.family=encoder_decoder does not support pipeline parallelism")
        return EncoderDecoder(self.cfg)

    def start_id(self) -> int:
        return self.cfg.vocab_size - 1

    def sentinel_ids(self) -> list[int]:
        return [self.cfg.vocab_size - 2 - i for i in range(self.cfg.sentinels)]

    def token_names(self) -> dict[int, str]:
        names = {s: f"<extra_id_{i}>" for i, s in enumerate(self.sentinel_ids())}
        return {**names, self.start_id(): "<start>"}

    def span_corruption(self, eos_id: int) -> SpanCorruption:
        m = self.cfg
        return SpanCorruption(m.noise_density, m.mean_span_length, self.sentinel_ids(), self.start_id(), eos_id)

    def objective(self, seq_len: int, tokenizer: TokenIds) -> SpanCorruption:
        return self.span_corruption(cast(int, tokenizer.eos_id))  # `check_vocab` refuses a tokenizer without EOS

    def target_length(self, seq_len: int) -> int:
        return self.span_corruption(0).target_length(seq_len)

    def init_args(self, seq_len: int) -> tuple[jax.Array, ...]:
        enc = jnp.zeros((1, min(seq_len, self.cfg.max_seq_len)), jnp.int32)
        dec = jnp.zeros((1, 8), jnp.int32)
        return enc, jnp.ones_like(enc), enc, dec, jnp.ones_like(dec), dec

    def example_shapes(self, seq_len: int) -> dict[str, tuple[tuple[int, ...], type[np.generic]]]:
        L = self.target_length(seq_len)
        return {k: ((seq_len if k.startswith("encoder") else L,), dt) for k, dt in Seq2SeqBatch.FIELDS.items()}

    def tokens_per_example(self, seq_len: int) -> int:
        return seq_len + self.target_length(seq_len)

    def logits(self, model: nn.Module, params: Params, batch: Seq2SeqBatch, rng: jax.Array | None = None
               ) -> tuple[jax.Array, FFNAux]:
        return forward(model, params, batch.encoder_inputs, batch.encoder_segment_ids, batch.encoder_positions,
                       batch.decoder_inputs, batch.decoder_segment_ids, batch.decoder_positions, rng=rng)

    # ------------------------------------------------------------------ cost
    def _per_layer(self) -> tuple[int, int]:
        m = self.cfg
        attn = m.d_model * m.resolved_head_dim * (2 * m.n_heads + 2 * m.n_kv_heads)
        return attn, m.d_model * m.resolved_head_dim * 2 * m.n_heads  # self-attention; cross q and o

    def matmul_params(self) -> int:
        """Encoder layers (attention + feed-forward), decoder layers (self- and cross-attention +
        feed-forward) and the LM head: the parameters of a decoder token and an encoder token together."""
        m, kinds = self.cfg, ffn_kinds()
        attn, _ = self._per_layer()
        enc_ffn = sum(kinds[k].matmul_params(m) for k in layer_kinds(m, m.encoder_layers))
        dec_ffn = sum(kinds[k].matmul_params(m) for k in layer_kinds(m))
        return m.encoder_layers * attn + enc_ffn + m.n_layers * 2 * attn + dec_ffn + m.vocab_size * m.d_model

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs of one example divided by its S + L tokens (S encoder, L decoder tokens): 6 per
        matmul parameter per token that uses it (encoder layers per encoder token; decoder layers, cross
        q/o and the head per decoder token; cross k/v per encoder token and decoder layer), plus the
        attention matmuls 12·h·H per (query, key) pair: S² per encoder layer, L² per decoder layer for
        self-attention and L·S for cross-attention (full matrices counted, as for the decoder)."""
        m, kinds = self.cfg, ffn_kinds()
        S, L = seq_len, self.target_length(seq_len)
        attn, cross_qo = self._per_layer()
        cross_kv = attn - cross_qo
        enc = m.encoder_layers * attn + sum(kinds[k].matmul_params(m) for k in layer_kinds(m, m.encoder_layers))
        dec = m.n_layers * (attn + cross_qo) + sum(kinds[k].matmul_params(m) for k in layer_kinds(m))
        head = m.vocab_size * m.d_model
        matmul = S * (enc + m.n_layers * cross_kv) + L * (dec + head)
        hh = 12 * m.n_heads * m.resolved_head_dim
        attention = hh * (m.encoder_layers * S * S + m.n_layers * (L * L + L * S))
        return float(6 * matmul + attention) / (S + L)

    # ------------------------------------------------------------------ decoding
    def decode_budget(self, prompt_len: int) -> int:
        """New tokens a prompt of this length leaves room for (the encoder takes up to max_seq_len)."""
        return self.cfg.max_seq_len - 1 if prompt_len <= self.cfg.max_seq_len else 0

    def cache_length(self, padded_prompt_len: int, new_tokens: int) -> int:
        return 1 + new_tokens

    def new_cache(self, batch: int, slots: int, prompt_len: int) -> Cache:
        m = self.cfg
        cache = init_cache(m, batch, slots)
        cross = init_cache(m, batch, prompt_len)["layers"]
        cache["layers"].update(cross_k=cross["k"], cross_v=cross["v"])
        return {**cache, "cross_segment_ids": jnp.zeros((batch, prompt_len), jnp.int32),
                "next_position": jnp.zeros((batch,), jnp.int32)}

    def cache_axes(self, cache: Cache) -> dict[str, Any]:
        inner = {k: v for k, v in cache.items() if k != "next_position"}
        return {**cache_logical_axes(inner), "next_position": ("act_batch",)}

    def prefill(self, model: nn.Module, params: Params, tokens_BP: jax.Array, segment_ids_BP: jax.Array,
                positions_BP: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Prompts [B, P] (left-padded, padding segment id 0) through the encoder; the start token through
        the decoder -> (logits of the first new token [B, V], cache)."""
        B = tokens_BP.shape[0]
        start = jnp.full((B, 1), self.start_id(), jnp.int32)
        inner: Mapping[str, Any] = {k: v for k, v in cache.items() if k != "next_position"}
        logits, inner = model.apply({"params": params}, tokens_BP, segment_ids_BP, positions_BP, start,
                                    jnp.ones_like(start), jnp.zeros_like(start), cache=inner)
        return logits[:, -1], {**inner, "next_position": jnp.ones((B,), jnp.int32)}

    def step(self, model: nn.Module, params: Params, cache: Cache, token_B: jax.Array) -> tuple[jax.Array, Cache]:
        inner: Mapping[str, Any] = {k: v for k, v in cache.items() if k != "next_position"}
        pos = cache["next_position"][:, None]
        logits, inner = model.apply({"params": params}, None, None, None, token_B[:, None].astype(jnp.int32),
                                    jnp.ones_like(pos), pos, cache=inner)
        return logits[:, -1], {**inner, "next_position": cache["next_position"] + 1}
