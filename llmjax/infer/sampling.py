"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus).

All functions are pure and jit-friendly. `temperature`, `top_k` and `top_p` are Python
values (static under jit): each combination compiles once. The same key is used for every
row of a batch (each row draws as if it were alone), so a prompt's continuation does not
depend on which other prompts share its batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llmjax.config import ConfigError

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 = greedy; top_k 0 = off; top_p 1 = off; beams > 1 = beam search."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    beams: int = 1
    seed: int = 0
    stop: tuple[str, ...] = ()

    def validate(self) -> SamplingParams:
        """Raise ConfigError (exit status 2 in the CLI) for values that make no sense."""
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise ConfigError(f"--temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.beams < 1:
            raise ConfigError(f"--beams must be >= 1, got {self.beams}")
        if self.beams > 1 and (self.temperature > 0 or self.top_k or self.top_p < 1):
            raise ConfigError("--beams > 1 is a deterministic search; it cannot be combined with --temperature, "
                              "--top-k or --top-p")
        if any(not s for s in self.stop):
            raise ConfigError("--stop: stop strings must not be empty")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def candidates(logits_BV: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0
               ) -> tuple[jax.Array, jax.Array]:
    """The tokens still eligible after top-k and top-p, most likely first, with their scaled logits.

    -> (scaled logits [B, C], token ids [B, C]); ineligible entries have logit -inf.
    C = top_k (or V when only top-p is set, or V when neither is set; then unsorted).
    Top-k keeps exactly the k highest logits (ties broken by lower token id); top-p keeps the
    smallest prefix of the sorted tokens whose probability reaches `top_p` (at least one).
    """
    B, V = logits_BV.shape
    scaled = logits_BV.astype(jnp.float32) / jnp.float32(temperature)
    if not top_k and top_p >= 1.0:
        return scaled, jnp.broadcast_to(jnp.arange(V, dtype=jnp.int32), (B, V))
    vals, ids = jax.lax.top_k(scaled, min(top_k, V) if top_k else V)
    if top_p < 1.0:
        probs = jax.nn.softmax(vals, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of strictly more likely tokens
        vals = jnp.where(before < top_p, vals, NEG_INF)
    return vals, ids.astype(jnp.int32)


def sample(logits_BV: jax.Array, key: jax.Array, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
    """Next token of each row [B] int32: argmax when temperature == 0, else a draw from the filtered softmax."""
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    vals, ids = candidates(logits_BV, temperature, top_k, top_p)
    choice = jax.vmap(lambda v: jax.random.categorical(key, v))(vals)  # same key per row: batch-independent
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
