"""Preference data (`train.objective=dpo`): `{"prompt", "chosen", "rejected"}` JSONL as pairs of sequences.

`prompt` is a string (one user message) or a list of messages; `chosen` and `rejected` are strings
(one assistant message) or lists of messages that continue the prompt. Both continuations are
rendered after the prompt with the chat template (`llmjax.data.tokenizers.chat_template`), tokenized whole, and
weighted on the response's assistant tokens only (messages after the prompt), exactly like SFT's
mask. Each pair fills one row: the chosen and the rejected sequence, each padded to seq_len + 1
tokens (`PreferenceBatch`, fields `chosen_*` and `rejected_*` as in `LMBatch`, plus `weights`
[1]: 1 for a real pair, 0 for padding).

The reference model's log-probabilities (`ref_chosen`, `ref_rejected`: summed over the response
tokens) are computed once, before the first step, with the run's starting parameters (the LoRA
base, or the initial model: `prepare`), and cached in WORKDIR/dpo_reference.npz, so the policy
never needs a second copy of the model. Train/validation split, order, resume and processes work
as in `llmjax.data.post.sft_data` (a pair per row, a new permutation each epoch).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from llmjax.config import Config, ConfigError
from llmjax.data.post.jsonl import as_messages, read_jsonl, where
from llmjax.data.post.sft_data import batch_rows, post_training_tokenizer
from llmjax.data.post.step_iterator import StepIterator
from llmjax.data.stream.files import split_records
from llmjax.data.stream.stages import derive_seed
from llmjax.data.tokenizers.chat_template import ChatTemplate, token_mask
from llmjax.data.tokenizers.tokenizer import Tokenizer
from llmjax.storage import as_path

STATE_FORMAT = "dpo-1"
CACHE_FILE = "dpo_reference.npz"
SIDES = ("chosen", "rejected")


def encode_response(template: ChatTemplate, tokenizer: Any, prompt: list[dict], response: list[dict]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n], mask bool [n]: the response's assistant tokens) of prompt + response rendered."""
    messages = prompt + response
    text, spans = template.assistant_spans(messages)
    # only the spans of assistant messages after the prompt
    n_prompt_assistant = sum(m["role"] == "assistant" for m in prompt)
    ids, offsets = tokenizer.encode_with_offsets(text)
    return np.asarray(ids, np.int32), np.asarray(token_mask(offsets, spans[n_prompt_assistant:]), bool)


def sequence_fields(ids: np.ndarray, mask: np.ndarray, capacity: int, prefix: str) -> dict[str, np.ndarray]:
    """One sequence padded to `capacity` tokens -> {prefix_inputs, _targets, _segment_ids, _positions, _weights}
    ([capacity - 1] each; weight t = 1 iff target t is a response token)."""
    L = capacity - 1
    tokens = np.zeros(capacity, np.int32)
    tokens[:len(ids)] = ids
    m = np.zeros(capacity, bool)
    m[:len(ids)] = mask
    seg = (np.arange(capacity) < len(ids)).astype(np.int32)
    pos = np.where(seg > 0, np.arange(capacity), 0).astype(np.int32)
    return {f"{prefix}_inputs": tokens[:L], f"{prefix}_targets": tokens[1:], f"{prefix}_segment_ids": seg[:L],
            f"{prefix}_positions": pos[:L], f"{prefix}_weights": (m[1:] & (seg[1:] > 0)).astype(np.float32)}


class PreferenceIterator(StepIterator):
    """This process's pairs of global batches k = step, step+1, ...; the state is the step."""

    NAME, STATE_FORMAT = "dpo", STATE_FORMAT

    def rows(self, first: int) -> dict[str, np.ndarray]:
        d = self.data
        n = len(d.train)
        return d.rows("train", [int(d.epoch_order(r // n)[r % n]) for r in range(first, first + d.local_batch)])


class PreferenceData:
    """The data of `train.objective=dpo` (the trainer's data interface, as `SFTData`)."""

    def __init__(self, cfg: Config, block: int = 0, process_count: int = 1, tokenizer: Tokenizer | None = None):
        if cfg.data.sources or cfg.data.tfds_name or not cfg.data.path:
            raise ConfigError("train.objective=dpo: set data.path to a JSON-lines file (or directory) of "
                              '{"prompt", "chosen", "rejected"} records')
        self.cfg, self.block = cfg, block
        self.global_batch, self.local_batch = batch_rows(cfg, process_count)
        self.capacity = cfg.data.seq_len + 1
        self.tokenizer = post_training_tokenizer(cfg, tokenizer)
        self.template = ChatTemplate.for_tokenizer(self.tokenizer, cfg.data.chat_template)
        records = read_jsonl(cfg.data.path)
        train_idx, val_idx = split_records([n for n, _ in records], cfg.data.validation_fraction)
        encoded = [self._encode(name, rec) for name, rec in records]
        self.train = [encoded[i] for i in train_idx]
        self.validation = [encoded[i] for i in val_idx]
        if len(self.train) < self.global_batch:
            raise ConfigError(f"data.path: {len(self.train)} training pairs, fewer than train.batch_size="
                              f"{self.global_batch}")
        if cfg.eval.every_steps > 0 and not self.validation:
            raise ConfigError("data.validation_fraction: no validation pair was held out; raise it, or disable "
                              "evaluation with eval.every_steps=0")
        self.sources, self.name, self.local_shares = [self], "dpo", None
        self.reference: dict[str, np.ndarray] | None = None  # split -> [n, 2] (chosen, rejected) log-probs
        h = hashlib.sha256(json.dumps([STATE_FORMAT, cfg.seed, self.capacity, cfg.data.shuffle,
                                       self.tokenizer.file_hash(), self.template.source,
                                       cfg.data.validation_fraction]).encode())
        for pair in encoded:
            for ids, mask in pair:
                h.update(ids.tobytes() + mask.tobytes())
        self.fingerprint = h.hexdigest()[:16]

    def _encode(self, name: str, rec: dict[str, Any]) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        try:
            if not all(k in rec for k in ("prompt", *SIDES)):
                raise ValueError(f"{where(name)}: expected {{\"prompt\", \"chosen\", \"rejected\"}}, got keys "
                                 f"{sorted(rec)}")
            prompt = as_messages(rec["prompt"], "user", name, "prompt")
            out = tuple(encode_response(self.template, self.tokenizer, prompt,
                                        as_messages(rec[s], "assistant", name, s)) for s in SIDES)
        except ValueError as e:
            msg = str(e)
            raise ConfigError(f"data.path: {msg if msg.startswith(where(name)) else f'{where(name)}: {msg}'}") from None
        for side, (ids, mask) in zip(SIDES, out, strict=True):
            if len(ids) > self.capacity:
                raise ConfigError(f"data.path: {where(name)}: the {side} conversation is {len(ids)} tokens, longer "
                                  f"than a row of {self.capacity} (data.seq_len + 1); raise data.seq_len or shorten it")
            if not mask[1:].any():
                raise ConfigError(f"data.path: {where(name)}: the {side} response has no assistant token")
        return out

    def epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.train)
        if not self.cfg.data.shuffle:
            return np.arange(n)
        return np.random.default_rng(derive_seed(self.cfg.seed, "dpo", epoch)).permutation(n)

    def rows(self, split: str, idx: list[int | None]) -> dict[str, np.ndarray]:
        """PreferenceBatch fields of the pairs `idx` of `split` (None: an empty, zero-weight row)."""
        pairs = self.train if split == "train" else self.validation
        ref = None if self.reference is None else self.reference[split]
        out = []
        for i in idx:
            row: dict[str, np.ndarray] = {}
            for side, (ids, mask) in zip(SIDES, pairs[0] if i is None else pairs[i], strict=True):
                if i is None:
                    ids, mask = ids[:0], mask[:0]
                row.update(sequence_fields(ids, mask, self.capacity, side))
            row["weights"] = np.array([0.0 if i is None else 1.0], np.float32)
            logps = np.zeros(2, np.float32) if ref is None or i is None else ref[i]
            row["ref_chosen"], row["ref_rejected"] = logps[:1].astype(np.float32), logps[1:].astype(np.float32)
            out.append(row)
        return {k: np.stack([r[k] for r in out]) for k in out[0]}

    # ------------------------------------------------------------------ reference log-probabilities
    def prepare(self, workdir: Any, logprobs: Callable[[dict[str, np.ndarray]], np.ndarray] | None,
                log: Callable) -> None:
        """Load WORKDIR/dpo_reference.npz, or compute it with `logprobs` (this process's rows -> [B, 2] summed
        response log-probabilities of the reference model for the global batch) over every pair, and save it
        (process 0). `logprobs` is None on a resume (the state is no longer the starting model)."""
        import jax

        path = as_path(workdir) / CACHE_FILE
        if path.exists():
            with path.open("rb") as f:
                cached = dict(np.load(f))
            if str(cached.get("fingerprint")) == self.fingerprint:
                self.reference = {"train": cached["train"], "validation": cached["validation"]}
                log(f"dpo: reference log-probabilities from {path}")
                return
        if logprobs is None:
            raise ConfigError(f"train.objective=dpo: {path} is missing or belongs to other data, and the run is "
                              "resumed (its parameters are no longer the reference model); restore the file or start "
                              "another --workdir")
        ref = {}
        for split, pairs in (("train", self.train), ("validation", self.validation)):
            values = np.zeros((len(pairs), 2), np.float32)
            for start in range(0, len(pairs), self.global_batch):
                idx = [i if i < len(pairs) else None for i in range(start, start + self.global_batch)]
                mine = idx[self.block * self.local_batch:(self.block + 1) * self.local_batch]
                out = np.asarray(logprobs(self.rows(split, mine)))  # [B, 2], every process gets all rows
                for j, i in enumerate(idx):
                    if i is not None:
                        values[i] = out[j]
            ref[split] = values
        self.reference = ref
        if jax.process_index() == 0:
            with path.open("wb") as f:
                np.savez(f, train=ref["train"], validation=ref["validation"], fingerprint=self.fingerprint)
        log(f"dpo: reference log-probabilities of {len(self.train)} + {len(self.validation)} pairs computed with the "
            f"starting model and cached in {path}")

    # ------------------------------------------------------------------ the trainer's interface
    def describe(self) -> str:
        t = self.tokenizer
        return (f"data: dpo {self.cfg.data.path}: {len(self.train)} train / {len(self.validation)} validation pairs, "
                f"rows of {self.capacity} tokens per side\ndata: tokenizer {t.kind} {t.path} (vocab {t.vocab_size}); "
                f"chat template {self.template.origin}")

    def train_iterator(self, state: dict[str, Any] | None = None) -> PreferenceIterator:
        return PreferenceIterator(self, int(state["step"]) if state else 0)

    def restore_iterator(self, state: dict[str, Any] | None, step: int) -> tuple[PreferenceIterator, str | None]:
        if state is not None and state.get("fingerprint") not in (None, self.fingerprint):
            return self.train_iterator(), "the data configuration changed since the checkpoint was written"
        return self.train_iterator({"step": step}), None

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """The validation pairs in file order in global batches (the last padded with zero-weight rows)."""
        n = len(self.validation)
        n_batches = -(-n // self.global_batch)
        if self.cfg.eval.batches > 0:
            n_batches = min(n_batches, self.cfg.eval.batches)
        for k in range(n_batches):
            first = k * self.global_batch + self.block * self.local_batch
            yield self.rows("validation", [i if i < n else None for i in range(first, first + self.local_batch)])
