"""A simple, cache-free decode loop for the end-of-training sample.

Each new token re-runs the model over a fixed-size buffer (so one compiled program
serves every step); causal attention makes the unfilled tail irrelevant. Quadratic in
length, fine for a short sample; the KV-cache engine lives elsewhere.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@partial(jax.jit, static_argnames=("model", "total_len", "greedy"))
def _decode(model: nn.Module, params: Any, buffer_1T: jax.Array, prompt_len: jax.Array, total_len: int,
            temperature: jax.Array, rng: jax.Array, greedy: bool) -> jax.Array:
    def body(i, carry):
        buf, key = carry
        logits_1TV = model.apply({"params": params}, buf)
        logits_V = jax.lax.dynamic_index_in_dim(logits_1TV[0], i - 1, axis=0, keepdims=False)
        key, sub = jax.random.split(key)
        if greedy:
            nxt = jnp.argmax(logits_V)
        else:
            nxt = jax.random.categorical(sub, logits_V / temperature)
        return buf.at[0, i].set(nxt.astype(buf.dtype)), key

    buf, _ = jax.lax.fori_loop(prompt_len, total_len, body, (buffer_1T, rng))
    return buf


def generate(model: nn.Module, params: Any, prompt_ids: list[int], max_new_tokens: int, max_len: int,
             temperature: float = 0.0, seed: int = 0, eos_id: int | None = None) -> list[int]:
    """Continue `prompt_ids` by up to `max_new_tokens` tokens (greedy when temperature == 0).

    Generation stops at `max_len` total tokens or at `eos_id`. Returns the new tokens only.
    """
    if not prompt_ids:
        raise ValueError("generate: the prompt encodes to no tokens")
    prompt_ids = prompt_ids[-(max_len - 1):]
    total = min(max_len, len(prompt_ids) + max_new_tokens)
    if total <= len(prompt_ids):
        return []
    buf = jnp.zeros((1, total), jnp.int32).at[0, : len(prompt_ids)].set(jnp.asarray(prompt_ids, jnp.int32))
    out = _decode(model, params, buf, jnp.int32(len(prompt_ids)), total, jnp.float32(max(temperature, 1e-6)),
                  jax.random.PRNGKey(seed), temperature == 0.0)
    out = np.asarray(out.addressable_data(0))  # replicated: any local copy (works multi-process)
    new = [int(t) for t in out[0, len(prompt_ids):]]
    if eos_id is not None and eos_id in new:
        new = new[: new.index(eos_id)]
    return new
