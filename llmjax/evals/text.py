"""Strings in, scores and text out: what lm-eval's `LM` interface asks of a model, without lm-eval.

`TextModel.loglikelihood((context, continuation) pairs)`, `loglikelihood_rolling(texts)` and
`generate_until((context, gen_kwargs) pairs)` tokenize with the run's tokenizer and call a
`LoglikScorer` (and, for generation, the KV-cache `Engine`). The in-loop multiple-choice tasks
(`evals.tasks`) and the lm-eval adapter (`evals.harness`) both go through it, so they score
the same strings identically.

Tokenization of a pair follows lm-eval's convention: trailing whitespace of the context moves
to the continuation, the pair is encoded as one string and the continuation is what follows
the context's own tokens. Every context starts with `start`, the tokens a training document starts
with (BOS for tokenizers that add it, `llmjax.data.tokenizers.tokenizer.document_start`; else nothing); an
empty context is `start`, or the EOS token without one (how documents are separated in training).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from llmjax.evals.loglik import LoglikScorer, Request, rolling_requests

DEFAULT_MAX_GEN_TOKENS = 256
GENERATION_BATCH = 16


class TextModel:
    """String-level scoring and generation for one model.

    `tokenizer`: `encode(list[str]) -> list[list[int]]`, `decode(ids) -> str`, `eos_id`.
    `engine`: an `llmjax.infer.engine.Engine` for `generate_until` (None: scoring only).
    `start`: the ids every context starts with (see the module docstring).
    """

    def __init__(self, scorer: LoglikScorer, tokenizer: Any, engine: Any = None, start: Sequence[int] = ()):
        self.scorer, self.tokenizer, self.engine = scorer, tokenizer, engine
        self.max_len = scorer.max_len
        self.eos_id = int(tokenizer.eos_id)
        self.start = tuple(int(i) for i in start)
        self.empty_context = self.start or (self.eos_id,)

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Request]:
        """(context, continuation) strings -> token-id requests (see the module docstring)."""
        contexts, wholes, empty = [], [], []
        for context, continuation in pairs:
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            empty.append(context == "")
            contexts.append(context)
            wholes.append(context + continuation)
        ctx_ids = self.tokenizer.encode(contexts)
        whole_ids = self.tokenizer.encode(wholes)
        out = []
        for is_empty, c, w in zip(empty, ctx_ids, whole_ids, strict=True):
            if is_empty:
                out.append(Request(self.empty_context, tuple(w)))
            else:
                out.append(Request(self.start + tuple(c), tuple(w[len(c):])))
        return out

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """-> (log P(continuation | context), greedy decoding yields the continuation) per pair."""
        return self.scorer.score(self.encode_pairs(pairs))

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """-> log P(text | BOS, else EOS) per text, in windows of `max_len` tokens (each token predicted once)."""
        requests, owner = [], []
        for i, ids in enumerate(self.tokenizer.encode(list(texts))):
            for r in rolling_requests(ids, self.empty_context[0], self.max_len):
                requests.append(r)
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (logprob, _) in zip(owner, self.scorer.score(requests), strict=True):
            totals[i] += logprob
        return totals

    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
        """Continue each context until one of `gen_kwargs["until"]` (cut before it), EOS or
        `max_gen_toks` tokens. Greedy unless `do_sample` with a `temperature` > 0."""
        from llmjax.infer.sampling import SamplingParams

        if self.engine is None:
            raise RuntimeError("this TextModel was built without a generation engine")
        groups: dict[SamplingParams, list[int]] = {}
        for i, (_, kwargs) in enumerate(requests):
            groups.setdefault(self._sampling(dict(kwargs or {})), []).append(i)
        out = [""] * len(requests)
        contexts = self.tokenizer.encode([c for c, _ in requests])
        for sp, indices in groups.items():
            keep = max(1, self.max_len - sp.max_new_tokens)
            for lo in range(0, len(indices), GENERATION_BATCH):
                chunk = indices[lo:lo + GENERATION_BATCH]
                prompts = [([*self.start, *contexts[i]] or [self.eos_id])[-keep:] for i in chunk]
                for i, g in zip(chunk, self.engine.generate(prompts, sp, self.eos_id, self.tokenizer), strict=True):
                    out[i] = g.text
        return out

    def _sampling(self, kwargs: dict[str, Any]) -> Any:
        from llmjax.infer.sampling import SamplingParams

        until = kwargs.pop("until", None) or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKENS))
        max_new = max(1, min(max_new, self.max_len - 1))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        top_k = int(kwargs.pop("top_k", 0) or 0)
        top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
        seed = int(kwargs.pop("seed", 0) or 0)
        if kwargs:
            print(f"llmjax: note: generation ignores {', '.join(sorted(kwargs))}", file=sys.stderr)
        if not do_sample or temperature <= 0:
            temperature, top_k, top_p = 0.0, 0, 1.0
        return SamplingParams(max_new_tokens=max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, stop=tuple(s for s in until if s)).validate()
