"""The decoder family (GPT/LLaMA-style causal LM): next-token prediction, KV-cache decoding, HF interop."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.config import ModelConfig
from llmjax.models.families.base import Cache, DecodingFamily, LMBatch, LMFamily, Params
from llmjax.models.transformer import Transformer, cache_logical_axes, init_cache
from llmjax.parallel.pipeline import Schedule


class DecoderFamily(LMFamily[ModelConfig], DecodingFamily[ModelConfig, LMBatch]):
    """`Transformer` run causally on packed documents; loss on every next token.

    Decoding: a prompt batch is left-padded (padding has segment id 0 and is never attended) and
    prefilled into a KV cache; each step then writes one token per row at the cache's fill level.
    The cache carries `next_position` [B]: each row's next position (its prompt length, then +1)."""

    name = "decoder"

    def module(self, pipeline: Schedule | None = None) -> nn.Module:
        return Transformer(self.cfg, pipeline)

    # ------------------------------------------------------------------ decoding
    def decode_budget(self, prompt_len: int) -> int:
        """New tokens a prompt of this length leaves room for in the context (0: too long)."""
        return max(self.cfg.max_seq_len - prompt_len, 0)

    def cache_length(self, padded_prompt_len: int, new_tokens: int) -> int:
        """Cache slots for a prompt batch of this (padded) length and this many new tokens."""
        return padded_prompt_len + new_tokens

    def new_cache(self, batch: int, slots: int, prompt_len: int) -> Cache:
        """An empty cache for `batch` rows of `slots` tokens (prompt_len: unused by a decoder)."""
        return {**init_cache(self.cfg, batch, slots), "next_position": jnp.zeros((batch,), jnp.int32)}

    def cache_axes(self, cache: Cache) -> dict[str, Any]:
        """Logical axes of every cache entry (the batch dimension is named `act_batch`)."""
        inner = {k: v for k, v in cache.items() if k != "next_position"}
        return {**cache_logical_axes(inner), "next_position": ("act_batch",)}

    def prefill(self, model: nn.Module, params: Params, tokens_BP: jax.Array, segment_ids_BP: jax.Array,
                positions_BP: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Left-padded prompts [B, P] (padding: segment id 0) into an empty cache -> (next-token logits [B, V],
        cache)."""
        inner: Mapping[str, Any] = {k: v for k, v in cache.items() if k != "next_position"}
        logits, inner = model.apply({"params": params}, tokens_BP, segment_ids_BP, positions_BP, cache=inner)
        return logits[:, -1], {**inner, "next_position": jnp.max(positions_BP, axis=1) + 1}

    def step(self, model: nn.Module, params: Params, cache: Cache, token_B: jax.Array) -> tuple[jax.Array, Cache]:
        """One new token per row -> (next-token logits [B, V], cache)."""
        inner: Mapping[str, Any] = {k: v for k, v in cache.items() if k != "next_position"}
        pos = cache["next_position"][:, None]
        logits, inner = model.apply({"params": params}, token_B[:, None].astype(jnp.int32), jnp.ones_like(pos), pos,
                                    cache=inner)
        return logits[:, -1], {**inner, "next_position": cache["next_position"] + 1}
