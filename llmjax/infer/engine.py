"""KV-cache generation: prefill a batch of prompts, then decode one token per jitted step.

Prompts of different lengths are left-padded to the longest, so every row's next token is
written at the same cache slot. Pad slots carry segment id 0 and real tokens 1: the
segment-restricted causal mask of training (`attention.MaskSpec`) then keeps every
query off the padding, and positions count from 0 in each prompt, so a padded row computes
exactly what it would alone. The cache is a preallocated [layers, batch, slots, kv heads,
head dim] buffer sharded like training activations (batch over `data`/`fsdp`, kv heads
over `tensor`), updated in place (donated) by each step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from llmjax.config import ConfigError, ModelConfig
from llmjax.infer.sampling import SamplingParams, sample
from llmjax.models.transformer import Transformer, cache_logical_axes, init_cache
from llmjax.parallel.rules import Rules, logical_to_spec, use_sharding

PROMPT_BUCKET, CACHE_BUCKET = 16, 64


@dataclasses.dataclass
class Generation:
    """One prompt's continuation: new token ids (EOS excluded), text (when a tokenizer was given),
    why it stopped ("eos", "stop", "length"), and for beam search the summed log-probability."""

    tokens: list[int]
    text: str | None = None
    finish: str = "length"
    score: float | None = None
    logits: np.ndarray | None = None  # [T, V] per generated token (return_logits=True)


class Engine:
    """Prefill + cached decoding for one model and its (sharded) parameters.

    `mesh`/`rules` (optional) are the layout: the cache and the batch are sharded over the
    mesh by the same logical rules as in training; without them everything runs unsharded.
    """

    def __init__(self, cfg: ModelConfig, params: Any, mesh: Mesh | None = None, rules: Rules | None = None,
                 param_transform: Callable[[Any], Any] | None = None):
        self.cfg = cfg
        self.model = Transformer(cfg)
        self.params = params
        self.mesh, self.rules = mesh, rules
        # e.g. int8 dequantization, applied inside each jitted function
        self.param_transform = param_transform or (lambda p: p)
        self.batch_multiple = 1
        if mesh is not None:
            for axis in logical_to_spec(("act_batch",), rules)[0] or ():
                self.batch_multiple *= mesh.shape[axis]
        self._jits: dict[str, Callable] = {}

    # ------------------------------------------------------------------ jitted pieces

    def _ctx(self, fn: Callable) -> Callable:
        if self.mesh is None:
            return fn

        def wrapped(*args, **kwargs):
            with use_sharding(self.mesh, self.rules):
                return fn(*args, **kwargs)

        return wrapped

    def _sharding(self, names: tuple) -> NamedSharding | None:
        return None if self.mesh is None else NamedSharding(self.mesh, logical_to_spec(names, self.rules))

    def _jit(self, name: str, fn: Callable, **kw) -> Callable:
        if name not in self._jits:
            self._jits[name] = jax.jit(self._ctx(fn), **kw)
        return self._jits[name]

    def new_cache(self, batch: int, length: int) -> dict[str, jax.Array]:
        shardings = None
        if self.mesh is not None:
            shardings = {k: self._sharding(v) for k, v in cache_logical_axes().items()}
        make = jax.jit(partial(init_cache, self.cfg, batch, length), out_shardings=shardings)
        return make()

    def forward(self, params: Any, cache: dict, tokens_BL: jax.Array, segment_ids_BL: jax.Array,
                positions_BL: jax.Array) -> tuple[jax.Array, dict]:
        """Jitted: run a chunk through the model with the cache -> (logits of its last token [B, V], cache)."""

        def fn(params, cache, tokens, segs, pos):
            logits, cache = self.model.apply({"params": self.param_transform(params)}, tokens, segs, pos,
                                             cache=cache)
            return logits[:, -1], cache

        return self._jit("forward", fn, donate_argnums=(1,))(params, cache, tokens_BL, segment_ids_BL, positions_BL)

    def _sample(self, logits_BV: jax.Array, step: int, sp: SamplingParams) -> jax.Array:
        fn = self._jit(f"sample/{sp.temperature}/{sp.top_k}/{sp.top_p}",
                       lambda lg, key: sample(lg, key, sp.temperature, sp.top_k, sp.top_p))
        return fn(logits_BV, jax.random.fold_in(jax.random.PRNGKey(sp.seed), step))

    # ------------------------------------------------------------------ prefill

    def prefill(self, prompts: Sequence[Sequence[int]], slots: int) -> tuple[jax.Array, dict, np.ndarray]:
        """Left-pad `prompts` into one batch, allocate a cache of `slots` and fill it.

        -> (next-token logits [B, V], cache, prompt lengths [B]); B is padded up to a multiple
        of the data-parallel size with copies of the first prompt."""
        rows = list(prompts) + [prompts[0]] * (-len(prompts) % self.batch_multiple)
        lengths = np.array([len(p) for p in rows], np.int32)
        P = self.padded_prompt_len(int(lengths.max()))
        tokens = np.zeros((len(rows), P), np.int32)
        segs = np.zeros((len(rows), P), np.int32)
        pos = np.zeros((len(rows), P), np.int32)
        for b, p in enumerate(rows):
            tokens[b, P - len(p):] = p
            segs[b, P - len(p):] = 1
            pos[b, P - len(p):] = np.arange(len(p))
        cache = self.new_cache(len(rows), slots)
        logits, cache = self.forward(self.params, cache, *map(self._put_batch, (tokens, segs, pos)))
        return logits, cache, lengths

    @staticmethod
    def padded_prompt_len(n: int) -> int:
        """Prompts are left-padded to a multiple of PROMPT_BUCKET slots (fewer distinct shapes to compile)."""
        return -(-n // PROMPT_BUCKET) * PROMPT_BUCKET

    def cache_slots(self, prompt_len: int, new_tokens: int) -> int:
        """Cache length for a batch: rounded up to CACHE_BUCKET slots (fewer compilations)."""
        return -(-(self.padded_prompt_len(prompt_len) + new_tokens) // CACHE_BUCKET) * CACHE_BUCKET

    def _put_batch(self, x: np.ndarray) -> jax.Array:
        sharding = self._sharding(("act_batch",) + (None,) * (x.ndim - 1))
        return jnp.asarray(x) if sharding is None else jax.device_put(x, sharding)

    # ------------------------------------------------------------------ generation

    def check_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        if not prompts:
            raise ConfigError("no prompt given")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ConfigError(f"prompt {i + 1} is empty (it encodes to no tokens)")
            if len(p) >= self.cfg.max_seq_len:
                raise ConfigError(f"prompt {i + 1} is {len(p)} tokens long; the model's context is "
                                  f"{self.cfg.max_seq_len} tokens (model.max_seq_len), which leaves no room to "
                                  "generate: shorten the prompt")

    def generate(self, prompts: Sequence[Sequence[int]], sp: SamplingParams, eos_id: int | None = None,
                 tokenizer: Any = None, on_text: Callable[[int, str], None] | None = None,
                 return_logits: bool = False) -> list[Generation]:
        """Continue each prompt (token ids); beam search when `sp.beams > 1` (one prompt at a time).

        Stops a row at `eos_id`, at a stop string (needs `tokenizer`; the text is cut before it),
        after `sp.max_new_tokens`, or when the context (model.max_seq_len) is full.
        `on_text(row, piece)` receives each row's text as it is produced (streaming).
        """
        sp.validate()
        self.check_prompts(prompts)
        if sp.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        if sp.beams > 1:
            return [self.beam_search(list(p), sp, eos_id, tokenizer, on_text, return_logits, row=i)
                    for i, p in enumerate(prompts)]
        n = len(prompts)
        P = max(len(p) for p in prompts)
        T = min(sp.max_new_tokens, self.cfg.max_seq_len - P)
        logits, cache, lengths = self.prefill(prompts, self.cache_slots(P, T))
        out: list[list[int]] = [[] for _ in range(n)]
        texts = ["" for _ in range(n)]
        finish = ["length"] * n
        kept_logits: list[np.ndarray] = []
        for t in range(T):
            if return_logits:
                kept_logits.append(np.asarray(jax.device_get(logits))[:n])
            tok = self._sample(logits, t, sp)
            host = np.asarray(jax.device_get(tok))
            for b in range(n):
                if finish[b] != "length":
                    continue
                if eos_id is not None and host[b] == eos_id:
                    finish[b] = "eos"
                    continue
                out[b].append(int(host[b]))
                if tokenizer is not None:
                    self._emit(b, out[b], texts, tokenizer, sp.stop, finish, on_text)
            if all(f != "length" for f in finish) or t == T - 1:
                break
            pos = (lengths + t)[:, None]
            logits, cache = self.forward(self.params, cache, *map(self._put_batch, (
                host[:, None].astype(np.int32), np.ones_like(pos), pos.astype(np.int32))))
        results = []
        for b in range(n):
            g = Generation(out[b], texts[b] if tokenizer is not None else None, finish[b])
            if return_logits:
                g.logits = np.stack([lg[b] for lg in kept_logits[: len(out[b]) + (finish[b] == "eos")]])
            results.append(g)
        return results

    @staticmethod
    def _emit(b: int, ids: list[int], texts: list[str], tokenizer: Any, stop: Sequence[str], finish: list[str],
              on_text: Callable[[int, str], None] | None) -> None:
        """Update row b's text; cut it at a stop string; stream the new, complete characters."""
        text = tokenizer.decode(ids)
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            text, finish[b] = text[: min(hits)], "stop"
        elif text.endswith("\ufffd"):  # an incomplete UTF-8 sequence (byte fallback): wait for the rest
            return
        if on_text is not None and len(text) > len(texts[b]) and text.startswith(texts[b]):
            on_text(b, text[len(texts[b]):])
        texts[b] = text

    # ------------------------------------------------------------------ beam search

    def _beam_select(self, logits_RV: jax.Array, scores_R: jax.Array, finished_R: jax.Array, cache: dict,
                     beams: int, eos_id: int) -> tuple:
        def fn(logits, scores, finished, cache):
            R, V = logits.shape
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            # a finished beam only continues with EOS, at no cost: its score stays fixed
            eos_only = jnp.where(jnp.arange(V) == eos_id, 0.0, -jnp.inf)
            logp = jnp.where(finished[:, None], eos_only[None], logp)
            vals, flat = jax.lax.top_k((scores[:, None] + logp).reshape(-1), beams)
            origin, tok = flat // V, (flat % V).astype(jnp.int32)
            pad = R - beams  # rows beyond `beams` (data-parallel padding) stay dead
            origin = jnp.concatenate([origin, jnp.zeros(pad, origin.dtype)])
            tok = jnp.concatenate([tok, jnp.zeros(pad, tok.dtype)])
            vals = jnp.concatenate([vals, jnp.full(pad, -jnp.inf)])
            new_finished = finished[origin] | (tok == eos_id)
            cache = dict(cache, k=jnp.take(cache["k"], origin, axis=1), v=jnp.take(cache["v"], origin, axis=1),
                         segment_ids=jnp.take(cache["segment_ids"], origin, axis=0))
            return tok, origin, vals, new_finished, cache

        f = self._jit(f"beam/{beams}/{eos_id}", fn, donate_argnums=(3,))
        return f(logits_RV, scores_R, finished_R, cache)

    def beam_search(self, prompt: list[int], sp: SamplingParams, eos_id: int | None, tokenizer: Any,
                     on_text: Callable[[int, str], None] | None, return_logits: bool, row: int) -> Generation:
        """Keep the `sp.beams` most likely continuations (summed log-probabilities, no length
        normalisation); a beam ends at EOS. Returns the best one when all have ended or at the limit."""
        W = sp.beams
        R = W + (-W % self.batch_multiple)
        P = len(prompt)
        T = min(sp.max_new_tokens, self.cfg.max_seq_len - P)
        logits, cache, _ = self.prefill([prompt] * R, self.cache_slots(P, T))
        eos = -1 if eos_id is None else eos_id
        scores = jnp.asarray(np.array([0.0] + [-np.inf] * (R - 1), np.float32))  # all beams start as beam 0
        finished = jnp.zeros(R, bool)
        hist: list[list[int]] = [[] for _ in range(R)]
        for t in range(T):
            tok, origin, scores, finished, cache = self._beam_select(logits, scores, finished, cache, W, eos)
            tok_h, origin_h, fin_h = (np.asarray(x) for x in jax.device_get((tok, origin, finished)))
            hist = [hist[o] + ([] if (hist[o] and hist[o][-1] == eos) else [int(k)])
                    for o, k in zip(origin_h, tok_h, strict=True)]
            if fin_h[:W].all() or t == T - 1:
                break
            pos = np.full((R, 1), P + t, np.int32)
            logits, cache = self.forward(self.params, cache, *map(self._put_batch, (
                tok_h[:, None].astype(np.int32), np.ones_like(pos), pos)))
        scores_h = np.asarray(jax.device_get(scores))
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


def generate_simple(cfg: ModelConfig, params: Any, prompt_ids: list[int], max_new_tokens: int,
                    temperature: float = 0.0, seed: int = 0, eos_id: int | None = None) -> list[int]:
    """One prompt, unsharded: the new token ids (a convenience for scripts and tests)."""
    sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    return Engine(cfg, params).generate([prompt_ids], sp, eos_id)[0].tokens
