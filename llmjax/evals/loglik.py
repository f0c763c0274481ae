"""Log-likelihoods of continuations under a model: the computation behind downstream evaluation.

A request is a pair of token-id sequences (context, continuation); its score is the summed
log-probability of the continuation's tokens given everything before them, and whether greedy
decoding would have produced exactly the continuation. Requests are packed one per row
(context + continuation, right-padded; padding has segment id 0 and weight 0), grouped by
length into buckets (powers of two up to `model.max_seq_len`, so only a few shapes compile) and
scored in fixed-size batches sharded over the batch axes of the mesh, like `llmjax eval`.

`rolling_requests` cuts a long text into the windows lm-eval's `loglikelihood_rolling` defines:
every token is predicted exactly once, each window with as much preceding text as fits.

The model is called in one place, `_token_scores`, through its family (`family.logits`); scoring
continuations needs a family trained on next-token prediction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmjax.config import ConfigError
from llmjax.models.families import ModelFamily, batch_from_dict
from llmjax.parallel.rules import Rules, logical_to_spec, use_sharding

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Request:
    """Score `continuation` (token ids) after `context` (token ids; at least one, e.g. EOS)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


def rolling_requests(ids: Sequence[int], prefix_id: int, max_len: int) -> list[Request]:
    """Windows that predict every token of `ids` once, the first from `prefix_id` alone.

    Window k predicts ids[k*max_len : (k+1)*max_len] and sees up to `max_len` tokens of input,
    so the last window is given a full context even when it predicts only a few tokens."""
    full = [prefix_id, *ids]  # full[j] comes right before ids[j]
    out = []
    for start in range(0, len(ids), max_len):
        end = min(start + max_len, len(ids))
        first = max(0, end - max_len)
        out.append(Request(tuple(full[first:start + 1]), tuple(ids[start:end])))
    return out


def bucket_length(n: int, max_len: int) -> int:
    """The padded row length for a request of n input tokens: a power of two >= MIN_BUCKET, <= max_len."""
    length = MIN_BUCKET
    while length < n:
        length *= 2
    return min(length, max_len)


def _token_scores(family: ModelFamily, model: nn.Module, params: Any, arrays: dict[str, jax.Array]
                  ) -> tuple[jax.Array, jax.Array]:
    """-> (log-probability of each target [B, L], target is the argmax [B, L]), float32 / bool."""
    logits_BLV, _ = family.logits(model, params, batch_from_dict(family.batch_type, arrays))
    logits_BLV = logits_BLV.astype(jnp.float32)
    logz_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    onehot_BLV = jax.nn.one_hot(arrays["targets"], logits_BLV.shape[-1], dtype=logits_BLV.dtype)
    target_logit_BL = jnp.sum(logits_BLV * onehot_BLV, axis=-1)  # keeps the vocabulary sharded
    is_argmax_BL = target_logit_BL >= jnp.max(logits_BLV, axis=-1)
    return target_logit_BL - logz_BL, is_argmax_BL


class LoglikScorer:
    """Scores `Request`s with one model and its parameters on a mesh.

    `family` (a next-token family) and its `model` (`family.module()`, unpipelined) give the logits
    [B, L, V] of a batch of rows (`inputs`, `targets`, `segment_ids`, `positions`, `weights`);
    `params` sharded as in training (or for inference), `rules` the logical-axis rules of that layout. Rows are
    sharded over the mesh axes of `act_batch`; `batch_size` (rounded up to a multiple of their
    size) rows are scored per call. Every process must call `score` with the same requests.
    """

    def __init__(self, family: ModelFamily, model: nn.Module, params: Any, mesh: Mesh, rules: Rules, max_len: int,
                 batch_size: int = 16):
        if not family.cfg.causal_lm:
            raise ConfigError(f"model.family={family.name}: log-likelihood scoring needs a next-token (causal) model")
        self.family, self.model, self.params, self.mesh, self.rules = family, model, params, mesh, rules
        self.max_len = max_len
        spec = logical_to_spec(("act_batch", "act_length"), rules)
        shards = int(np.prod([mesh.shape[a] for a in (spec[0] or ())] or [1]))
        self.batch_size = -(-max(batch_size, 1) // shards) * shards
        self._sharding = NamedSharding(mesh, spec)
        self._jitted = jax.jit(self._sums, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def _sums(self, params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        with use_sharding(self.mesh, self.rules):
            logp_BL, is_argmax_BL = _token_scores(self.family, self.model, params, batch)
        w_BL = batch["weights"]
        return jnp.sum(logp_BL * w_BL, axis=1), jnp.all(is_argmax_BL | (w_BL == 0), axis=1)

    def _row(self, r: Request, length: int) -> dict[str, np.ndarray]:
        whole = list(r.context) + list(r.continuation)
        whole = whole[-(self.max_len + 1):]  # too long: drop the oldest context (and tokens, if need be)
        n_scored = min(len(r.continuation), len(whole) - 1)
        n = len(whole) - 1
        row = {k: np.zeros(length, np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
        row["inputs"][:n] = whole[:-1]
        row["targets"][:n] = whole[1:]
        row["segment_ids"][:n] = 1
        row["positions"][:n] = np.arange(n)
        row["weights"] = np.zeros(length, np.float32)
        row["weights"][n - n_scored:n] = 1.0
        return row

    def _put(self, x: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(x.shape, self._sharding, lambda index: x[index])

    def score(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        """-> (summed log-probability of the continuation, greedy decoding gives it) per request, in order.

        An empty continuation scores (0.0, True). A request longer than `max_len` + 1 tokens keeps
        its last `max_len` + 1 (the oldest context goes first)."""
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        by_bucket: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            if not r.context:
                raise ValueError(f"request {i}: the context must hold at least one token (e.g. EOS)")
            if r.continuation:
                n = min(len(r.context) + len(r.continuation), self.max_len + 1) - 1
                by_bucket.setdefault(bucket_length(n, self.max_len), []).append(i)
        for length, indices in sorted(by_bucket.items()):
            for lo in range(0, len(indices), self.batch_size):
                chunk = indices[lo:lo + self.batch_size]
                rows = [self._row(requests[i], length) for i in chunk]
                rows += [rows[0]] * (self.batch_size - len(rows))  # pad the last batch with copies
                batch = {k: self._put(np.stack([row[k] for row in rows])) for k in rows[0]}
                sums, greedy = jax.device_get(self._jitted(self.params, batch))
                for j, i in enumerate(chunk):
                    results[i] = (float(sums[j]), bool(greedy[j]))
        return results
