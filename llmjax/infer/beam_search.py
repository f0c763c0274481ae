"""Beam search over an `Engine`: keep the `beams` most likely continuations of one prompt.

Scores are summed log-probabilities (no length normalisation); a beam ends at EOS and then
only continues with EOS at no cost, so its score stays fixed. The cache rows are reordered
after every step by the beams' origins, along each cache entry's batch dimension (the
family's `cache_axes` name it `act_batch`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.infer.sampling import SamplingParams


def reorder_cache(cache: dict, axes: dict, origin_R: jax.Array) -> dict:
    """Take rows `origin_R` along every cache entry's `act_batch` dimension (entries without one stay)."""
    if isinstance(cache, dict):
        return {k: reorder_cache(v, axes[k], origin_R) for k, v in cache.items()}
    return jnp.take(cache, origin_R, axis=axes.index("act_batch")) if "act_batch" in axes else cache


def _select(engine: Any, logits_RV: jax.Array, scores_R: jax.Array, finished_R: jax.Array, cache: dict,
            beams: int, eos_id: int) -> tuple:
    axes = engine.family.cache_axes(cache)

    def fn(logits, scores, finished, cache):
        R, V = logits.shape
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        eos_only = jnp.where(jnp.arange(V) == eos_id, 0.0, -jnp.inf)
        logp = jnp.where(finished[:, None], eos_only[None], logp)
        vals, flat = jax.lax.top_k((scores[:, None] + logp).reshape(-1), beams)
        origin, tok = flat // V, (flat % V).astype(jnp.int32)
        pad = R - beams  # rows beyond `beams` (data-parallel padding) stay dead
        origin = jnp.concatenate([origin, jnp.zeros(pad, origin.dtype)])
        tok = jnp.concatenate([tok, jnp.zeros(pad, tok.dtype)])
        vals = jnp.concatenate([vals, jnp.full(pad, -jnp.inf)])
        return tok, origin, vals, finished[origin] | (tok == eos_id), reorder_cache(cache, axes, origin)

    f = engine.jitted(f"beam/{beams}/{eos_id}", fn, donate_argnums=(3,), out_shardings=(
        engine.replicated(), engine.replicated(), engine.replicated(), engine.replicated(), None))
    return f(logits_RV, scores_R, finished_R, cache)


def beam_search(engine: Any, prompt: list[int], sp: SamplingParams, eos_id: int | None, tokenizer: Any,
                on_text: Callable[[int, str], None] | None, row: int) -> Any:
    """The best of `sp.beams` beams for `prompt` when all have ended or at the length limit (a `Generation`)."""
    from llmjax.infer.engine import Generation

    W = sp.beams
    R = W + (-W % engine.batch_multiple)
    P = len(prompt)
    T = min(sp.max_new_tokens, engine.family.decode_budget(P))
    logits, cache, _ = engine.prefill([prompt] * R, engine.cache_slots(P, T))
    eos = -1 if eos_id is None else eos_id
    scores = jnp.asarray(np.array([0.0] + [-np.inf] * (R - 1), np.float32))  # all beams start as beam 0
    finished = jnp.zeros(R, bool)
    hist: list[list[int]] = [[] for _ in range(R)]
    for t in range(T):
        tok, origin, scores, finished, cache = _select(engine, logits, scores, finished, cache, W, eos)
        tok_h, origin_h, fin_h = (engine.to_host(x) for x in (tok, origin, finished))
        hist = [hist[o] + ([] if (hist[o] and hist[o][-1] == eos) else [int(k)])
                for o, k in zip(origin_h, tok_h, strict=True)]
        if fin_h[:W].all() or t == T - 1:
            break
        logits, cache = engine.step(engine.params, cache, engine.put_batch(tok_h.astype(np.int32)))
    scores_h = engine.to_host(scores)
    best = int(np.argmax(scores_h[:W]))
    ids, finish = hist[best], "length"
    if ids and ids[-1] == eos:
        ids, finish = ids[:-1], "eos"
    text = None
    if tokenizer is not None:
        text = tokenizer.decode(ids)
        hits = [text.find(s) for s in sp.stop if s in text]
        if hits:
            text, finish = text[: min(hits)], "stop"
        if on_text is not None:
            on_text(row, text)
    return Generation(ids, text, finish, float(scores_h[best]))
