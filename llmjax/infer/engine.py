"""Generation for any model family with a KV cache: prefill a batch of prompts, then decode.

The family does the model-specific part (`prefill`, `step`, `new_cache`, `cache_axes`;
`llmjax.models.families`); the engine pads, shards, samples and stops. Prompts of different
lengths are left-padded to the longest, so every row's next token is written at the same cache
slot; pad slots carry segment id 0 and real tokens 1, and positions count from 0 in each prompt,
so a padded row computes exactly what it would alone.

Decoding runs on the device as one jitted `lax.while_loop` (sampling included; no host round
trip per token) until every row has produced EOS or `max_new_tokens`. Streaming (`on_text`),
per-token logits (`return_logits`) and beam search run a host loop of jitted steps instead.
Stop strings are applied to the text afterwards: the output ends before the first stop string,
as the host loop's would. The cache is sharded like training activations (batch over the data
axes, kv heads over `tensor`) and donated to each step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmjax.config import ConfigError, ModelConfig
from llmjax.infer.sampling import SamplingParams, sample
from llmjax.models.families import DecodingFamily, ModelFamily, build_family
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


def stop_set(eos_id: int | Sequence[int] | None) -> tuple[int, ...]:
    """The ids that end a row: none, one EOS id, or several (a model's end-of-turn tokens)."""
    if eos_id is None:
        return ()
    if isinstance(eos_id, (int, np.integer)):
        return (int(eos_id),)
    return tuple(sorted({int(i) for i in eos_id}))


def _map_with_axes(fn: Callable[[jax.Array, tuple], Any], tree: Any, axes: Any) -> Any:
    """fn(leaf, its logical axes) over a cache (nested dicts) and its axes tree (tuples at the leaves)."""
    if isinstance(tree, dict):
        return {k: _map_with_axes(fn, v, axes[k]) for k, v in tree.items()}
    return fn(tree, axes)


class Engine:
    """Prefill + cached decoding for one model and its (sharded) parameters.

    `mesh`/`rules` (optional) are the layout: the cache and the batch are sharded over the mesh by the
    same logical rules as in training; without them everything runs unsharded. `family`: the model
    family of `cfg`, already built (the trainer's or the loaded workdir's); unset, one is built."""

    def __init__(self, cfg: ModelConfig, params: Any, mesh: Mesh | None = None, rules: Rules | None = None,
                 param_transform: Callable[[Any], Any] | None = None, family: ModelFamily | None = None):
        self.cfg = cfg
        built = family if family is not None else build_family(cfg)
        if not isinstance(built, DecodingFamily):
            raise ConfigError(f"model.family={cfg.family} has no decoder to generate with")
        self.family: DecodingFamily[Any, Any] = built
        self.model = self.family.module()
        self.params = params
        self.mesh, self.rules = mesh, rules
        # e.g. int8 dequantization, applied inside each jitted function
        self.param_transform = param_transform or (lambda p: p)
        self.batch_multiple = 1
        if mesh is not None:
            for axis in logical_to_spec(("act_batch",), self._rules())[0] or ():
                self.batch_multiple *= mesh.shape[axis]
        self._jits: dict[str, Callable] = {}

    # ------------------------------------------------------------------ jitted pieces (public: beam search)

    def _rules(self) -> Rules:
        """The sharding rules of an engine with a mesh (a mesh is always given with its rules)."""
        assert self.rules is not None, "Engine: a mesh needs its sharding rules"
        return self.rules

    def _ctx(self, fn: Callable) -> Callable:
        mesh = self.mesh
        if mesh is None:
            return fn

        def wrapped(*args, **kwargs):
            with use_sharding(mesh, self._rules()):
                return fn(*args, **kwargs)

        return wrapped

    def _sharding(self, names: tuple) -> NamedSharding | None:
        return None if self.mesh is None else NamedSharding(self.mesh, logical_to_spec(names, self._rules()))

    def replicated(self) -> NamedSharding | None:
        """The sharding of a value every device holds whole (None without a mesh)."""
        return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

    def jitted(self, name: str, fn: Callable, **kw) -> Callable:
        """`jax.jit(fn, **kw)` under the engine's sharding rules, compiled once per `name` (cached)."""
        if name not in self._jits:
            self._jits[name] = jax.jit(self._ctx(fn), **kw)
        return self._jits[name]

    def memory_needed(self, rows: int, prompt_len: int, slots: int) -> tuple[int, int]:
        """(KV-cache bytes, a lower bound on all the bytes generating needs) for `rows` rows (prompts or beams,
        padded to the batch multiple), prompts of `prompt_len` tokens and `slots` cache slots: the cache (twice:
        it is donated to each step but beam search reorders a copy) plus the prefill's float32 activations and
        logits [rows, P, V] and the decode logits [rows, V]. From shapes alone (`jax.eval_shape`): nothing is
        allocated."""
        rows += -rows % self.batch_multiple
        P = self.padded_prompt_len(prompt_len)
        shapes = jax.eval_shape(partial(self.family.new_cache, rows, slots, P))
        cache = sum(math.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(shapes))
        m = self.cfg
        prefill = rows * P * (m.vocab_size + 4 * m.d_model + m.d_ff) * 4
        return cache, 2 * cache + prefill + 3 * rows * m.vocab_size * 4

    def check_memory(self, rows: int, prompt_len: int, slots: int, what: str) -> None:
        """ConfigError naming `what` (the flags that set `rows`) when `memory_needed` exceeds the memory bound:
        $LLMJAX_MEMORY_LIMIT if set, else the memory of the engine's devices (the host's RAM for CPU devices)."""
        import os

        from llmjax.guards import MEMORY_ENV, gib, memory_bound
        from llmjax.train.preflight import devices_memory

        devices = list(self.mesh.devices.flat) if self.mesh is not None else jax.devices()[:1]
        bound = memory_bound() if os.environ.get(MEMORY_ENV) else devices_memory(devices) or memory_bound()
        if bound is None:
            return
        cache, need = self.memory_needed(rows, prompt_len, slots)
        if need > bound[0]:
            raise ConfigError(f"{what}: generating needs about {gib(need)} (a KV cache of {gib(cache)} for {rows:,} "
                              f"row(s) of {slots:,} slots, plus activations and logits), more than {bound[1]} "
                              f"({gib(bound[0])}; {MEMORY_ENV} sets another bound)")

    def check_generation(self, prompts: Sequence[Sequence[int]], sp: SamplingParams) -> None:
        """`check_memory` for generating from `prompts` (all at once; with beam search `sp.beams` rows of one)."""
        P = max(len(p) for p in prompts)
        slots = self.cache_slots(P, min(sp.max_new_tokens, self.family.decode_budget(P)))
        if sp.beams > 1:
            self.check_memory(sp.beams, P, slots, f"--beams {sp.beams} (--max-new-tokens {sp.max_new_tokens})")
        else:
            self.check_memory(len(prompts), P, slots,
                              f"{len(prompts):,} prompt(s) with --max-new-tokens {sp.max_new_tokens}")

    def new_cache(self, batch: int, length: int, prompt_len: int = 0) -> dict[str, Any]:
        make = partial(self.family.new_cache, batch, length, prompt_len)
        shardings = None
        if self.mesh is not None:
            axes = self.family.cache_axes(jax.eval_shape(make))
            shardings = _map_with_axes(lambda _, a: self._sharding(a), jax.eval_shape(make), axes)
        return jax.jit(make, out_shardings=shardings)()

    def _prefill(self, params: Any, cache: dict, tokens: jax.Array, segs: jax.Array, pos: jax.Array
                 ) -> tuple[jax.Array, dict]:
        def fn(params, cache, tokens, segs, pos):
            return self.family.prefill(self.model, self.param_transform(params), tokens, segs, pos, cache)

        return self.jitted("prefill", fn, donate_argnums=(1,))(params, cache, tokens, segs, pos)

    def step(self, params: Any, cache: dict, token_B: jax.Array) -> tuple[jax.Array, dict]:
        """Jitted: one token per row -> (next-token logits [B, V], cache)."""
        def fn(params, cache, tok):
            return self.family.step(self.model, self.param_transform(params), cache, tok)

        return self.jitted("step", fn, donate_argnums=(1,))(params, cache, token_B)

    def _sample(self, logits_BV: jax.Array, step: int, sp: SamplingParams) -> jax.Array:
        fn = self.jitted(f"sample/{sp.temperature}/{sp.top_k}/{sp.top_p}",
                         lambda lg, key: sample(lg, key, sp.temperature, sp.top_k, sp.top_p),
                         out_shardings=self.replicated())
        return fn(logits_BV, jax.random.fold_in(jax.random.PRNGKey(sp.seed), step))

    def to_host(self, x: jax.Array) -> np.ndarray:
        """A replicated (or single-device) array on the host; works in every process of a multi-process run."""
        return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)

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
        cache = self.new_cache(len(rows), slots, P)
        logits, cache = self._prefill(self.params, cache, *map(self.put_batch, (tokens, segs, pos)))
        return logits, cache, lengths

    @staticmethod
    def padded_prompt_len(n: int) -> int:
        """Prompts are left-padded to a multiple of PROMPT_BUCKET slots (fewer distinct shapes to compile)."""
        return -(-n // PROMPT_BUCKET) * PROMPT_BUCKET

    def cache_slots(self, prompt_len: int, new_tokens: int) -> int:
        """Cache length for a batch (the family's need), rounded up to CACHE_BUCKET slots (fewer compilations)."""
        need = self.family.cache_length(self.padded_prompt_len(prompt_len), new_tokens)
        return -(-need // CACHE_BUCKET) * CACHE_BUCKET

    def put_batch(self, x: np.ndarray) -> jax.Array:
        """Host rows [B, ...] (the same in every process) -> a device array with B over the batch axes."""
        sharding = self._sharding(("act_batch",) + (None,) * (x.ndim - 1))
        if sharding is None:
            return jnp.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])  # every process holds x

    # ------------------------------------------------------------------ generation

    def check_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
        if not prompts:
            raise ConfigError("no prompt given")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ConfigError(f"prompt {i + 1} is empty (it encodes to no tokens)")
            if self.family.decode_budget(len(p)) < 1:
                raise ConfigError(f"prompt {i + 1} is {len(p)} tokens long; the model's context is "
                                  f"{self.cfg.max_seq_len} tokens (model.max_seq_len), which leaves no room to "
                                  "generate: shorten the prompt")

    def generate(self, prompts: Sequence[Sequence[int]], sp: SamplingParams,
                 eos_id: int | Sequence[int] | None = None, tokenizer: Any = None,
                 on_text: Callable[[int, str], None] | None = None, return_logits: bool = False,
                 device_loop: bool | None = None) -> list[Generation]:
        """Continue each prompt (token ids); beam search when `sp.beams > 1` (one prompt at a time).

        Stops a row at `eos_id` (one id, or several: e.g. a chat model's end-of-turn ids), at a stop string
        (needs `tokenizer`; the text is cut before it), after `sp.max_new_tokens`, or when the context
        (model.max_seq_len) is full.
        `on_text(row, piece)` receives each row's text as it is produced (streaming). `device_loop`:
        decode on the device in one `while_loop` (default: unless streaming or returning logits).
        """
        sp.validate()
        self.check_prompts(prompts)
        if sp.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        stops = stop_set(eos_id)
        if sp.beams > 1:
            from llmjax.infer.beam_search import beam_search

            if len(stops) > 1:
                raise ConfigError(f"beam search stops at one EOS id, not at each of {list(stops)} (use --beams 1)")
            eos_id = stops[0] if stops else None
            self.check_generation(prompts, sp)
            return [beam_search(self, list(p), sp, eos_id, tokenizer, on_text, row=i)
                    for i, p in enumerate(prompts)]
        if device_loop is None:
            device_loop = on_text is None and not return_logits
        n = len(prompts)
        P = max(len(p) for p in prompts)
        T = min(sp.max_new_tokens, self.family.decode_budget(P))
        self.check_generation(prompts, sp)
        logits, cache, _ = self.prefill(prompts, self.cache_slots(P, T))
        if device_loop:
            tokens = self._decode_on_device(logits, cache, T, sp, stops)
            out = [[int(t) for t in row] for row in tokens[:n]]
            finish = ["length"] * n
            for b, row in enumerate(out):
                hits = [i for i, t in enumerate(row) if t in stops]
                if hits:
                    out[b], finish[b] = row[:hits[0]], "eos"
            return [self._finish_text(Generation(out[b], None, finish[b]), tokenizer, sp.stop) for b in range(n)]
        return self._decode_on_host(logits, cache, n, T, sp, stops, tokenizer, on_text, return_logits)

    def _decode_on_device(self, logits: jax.Array, cache: dict, T: int, sp: SamplingParams,
                          stops: tuple[int, ...]) -> np.ndarray:
        """Sample T tokens per row in one jitted while_loop; stops early when every row has produced a stop id.
        -> tokens [B, T] (entries after a row's stop id are unspecified)."""
        eos = np.asarray(stops or (-1,), np.int32)

        def loop(params, logits, cache):
            B = logits.shape[0]
            key = jax.random.PRNGKey(sp.seed)

            def cond(c):
                t, _, _, _, done = c
                return jnp.logical_and(t < T, jnp.logical_not(jnp.all(done)))

            def body(c):
                t, logits, cache, out, done = c
                tok = sample(logits, jax.random.fold_in(key, t), sp.temperature, sp.top_k, sp.top_p)
                out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, t))
                done = jnp.logical_or(done, jnp.isin(tok, eos))
                logits, cache = self.family.step(self.model, self.param_transform(params), cache, tok)
                return t + 1, logits, cache, out, done

            init = (jnp.zeros((), jnp.int32), logits, cache, jnp.zeros((B, T), jnp.int32), jnp.zeros((B,), bool))
            return jax.lax.while_loop(cond, body, init)[3]

        name = f"loop/{T}/{stops}/{sp.temperature}/{sp.top_k}/{sp.top_p}/{sp.seed}"
        fn = self.jitted(name, loop, out_shardings=self.replicated())
        return self.to_host(fn(self.params, logits, cache))

    def _decode_on_host(self, logits: jax.Array, cache: dict, n: int, T: int, sp: SamplingParams,
                        stops: tuple[int, ...], tokenizer: Any, on_text: Callable[[int, str], None] | None,
                        return_logits: bool) -> list[Generation]:
        out: list[list[int]] = [[] for _ in range(n)]
        texts = ["" for _ in range(n)]
        finish = ["length"] * n
        kept_logits: list[np.ndarray] = []
        for t in range(T):
            if return_logits:
                kept_logits.append(np.asarray(jax.device_get(logits))[:n])
            host = self.to_host(self._sample(logits, t, sp))
            for b in range(n):
                if finish[b] != "length":
                    continue
                if int(host[b]) in stops:
                    finish[b] = "eos"
                    continue
                out[b].append(int(host[b]))
                if tokenizer is not None:
                    self._emit(b, out[b], texts, tokenizer, sp.stop, finish, on_text)
            if all(f != "length" for f in finish) or t == T - 1:
                break
            logits, cache = self.step(self.params, cache, self.put_batch(host.astype(np.int32)))
        results = []
        for b in range(n):
            g = Generation(out[b], texts[b] if tokenizer is not None else None, finish[b])
            if return_logits:
                g.logits = np.stack([lg[b] for lg in kept_logits[: len(out[b]) + (finish[b] == "eos")]])
            results.append(g)
        return results

    @staticmethod
    def _finish_text(g: Generation, tokenizer: Any, stop: Sequence[str]) -> Generation:
        """Decode the tokens; cut at the first stop string (tokens and text), as streaming would have."""
        if tokenizer is None:
            return g
        text = tokenizer.decode(g.tokens)
        if any(s in text for s in stop):
            for k in range(1, len(g.tokens) + 1):  # the shortest prefix whose text holds a stop string
                piece = tokenizer.decode(g.tokens[:k])
                hits = [piece.find(s) for s in stop if s in piece]
                if hits:
                    return Generation(g.tokens[:k], piece[: min(hits)], "stop")
        g.text = text
        return g

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
