"""Supervised fine-tuning data (`train.objective=sft`): chat JSONL through the chat template, packed, loss
on the assistant tokens only.

Every record (`llmjax.data.post.jsonl`: chat messages or prompt/completion) is rendered with the
model's chat template (`llmjax.data.tokenizers.chat_template`) and tokenized whole (no BOS/EOS added: the template
writes what the model expects, as `apply_chat_template` does); a token is an assistant token
when its characters lie in an assistant message's rendered text. Records are split into train
and validation by a hash of "file:line" (`data.validation_fraction`). Conversations are packed
whole into rows of seq_len + 1 tokens, best-fit among `data.packing_bins` open rows, in a new
order each epoch (`data.shuffle`, seeded by `seed` and the epoch); a conversation longer than a
row is an error. Each row becomes an `LMBatch` example (`NextToken`) whose weight at position t
is 1 exactly when target t + 1 is an assistant token of the same conversation.

The global batch at step k is rows k*B .. k*B + B - 1 of that stream, the same whatever the
number of processes (each process takes its block of B / P rows); the iterator's state is the
step. The dataset is held in host memory (post-training sets are small next to a pre-training
corpus); every process reads it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import numpy as np

from llmjax.config import Config, ConfigError
from llmjax.data.post.jsonl import Record, conversation, read_jsonl, where
from llmjax.data.post.step_iterator import StepIterator
from llmjax.data.stream.files import split_records
from llmjax.data.stream.row_objectives import NextToken
from llmjax.data.stream.stages import derive_seed
from llmjax.data.tokenizers.chat_template import ChatTemplate, token_mask
from llmjax.data.tokenizers.tokenizer import Tokenizer, check_vocab, load_tokenizer

STATE_FORMAT = "sft-1"


def post_training_tokenizer(cfg: Config, tokenizer: Tokenizer | None) -> Tokenizer:
    """The run's tokenizer (its workdir copy when given), else `data.tokenizer`; it must give character offsets."""
    if tokenizer is None:
        if not cfg.data.tokenizer:
            raise ConfigError(f"train.objective={cfg.train.objective}: set data.tokenizer to the model's tokenizer "
                              "(a tokenizer.json directory with its chat template)")
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    if not hasattr(tokenizer, "encode_with_offsets"):
        raise ConfigError(f"data.tokenizer: train.objective={cfg.train.objective} needs a Hugging Face tokenizer.json "
                          f"(character offsets for the assistant mask), got a {tokenizer.kind} tokenizer")
    check_vocab(tokenizer, cfg)
    return tokenizer


def encode_conversation(template: ChatTemplate, tokenizer: Any, messages: list[dict[str, Any]]
                        ) -> tuple[np.ndarray, np.ndarray]:
    """-> (token ids int32 [n], assistant mask bool [n]) of the rendered conversation."""
    text, spans = template.assistant_spans(messages)
    ids, offsets = tokenizer.encode_with_offsets(text)
    return np.asarray(ids, np.int32), np.asarray(token_mask(offsets, spans), bool)


def encode_records(records: list[Record], template: ChatTemplate, tokenizer: Any, max_tokens: int
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every record encoded; ConfigError naming the file and line of a bad record or one over `max_tokens`."""
    out = []
    for name, record in records:
        try:
            ids, mask = encode_conversation(template, tokenizer, conversation(record, name))
        except ValueError as e:
            msg = str(e)
            raise ConfigError(f"data.path: {msg if msg.startswith(where(name)) else f'{where(name)}: {msg}'}") from None
        if len(ids) > max_tokens:
            raise ConfigError(f"data.path: {where(name)}: the conversation is {len(ids)} tokens, longer than a row of "
                              f"{max_tokens} (data.seq_len + 1); raise data.seq_len (<= model.max_seq_len) or "
                              "shorten the conversation")
        if not mask.any():
            raise ConfigError(f"data.path: {where(name)}: no assistant token in the rendered conversation")
        out.append((ids, mask))
    return out


def best_fit(lengths: np.ndarray, order: np.ndarray, capacity: int, bins: int) -> list[list[int]]:
    """Pack items (in `order`) into rows of `capacity`: each goes to the open row it fills best; with `bins`
    rows open, the oldest is closed. -> rows as lists of item indices (every item once, never split)."""
    rows: list[list[int]] = []
    open_rows: list[tuple[int, list[int]]] = []  # (free space, items), oldest first
    for i in order.tolist():
        n = int(lengths[i])
        fits = [j for j, (free, _) in enumerate(open_rows) if free >= n]
        if fits:
            j = min(fits, key=lambda j: open_rows[j][0])
            free, items = open_rows[j]
            open_rows[j] = (free - n, items + [i])
            continue
        if len(open_rows) >= bins:
            rows.append(open_rows.pop(0)[1])
        open_rows.append((capacity - n, [i]))
    rows.extend(items for _, items in open_rows)
    return rows


def row_arrays(items: list[int], examples: list[tuple[np.ndarray, np.ndarray]], capacity: int
               ) -> dict[str, np.ndarray]:
    """A packed row: tokens, segment_ids (1, 2, ... per conversation, 0 padding), positions (int32 [capacity])
    and loss_mask (bool [capacity])."""
    tokens = np.zeros(capacity, np.int32)
    seg = np.zeros(capacity, np.int32)
    pos = np.zeros(capacity, np.int32)
    mask = np.zeros(capacity, bool)
    at = 0
    for s, i in enumerate(items, 1):
        ids, m = examples[i]
        n = len(ids)
        tokens[at:at + n], seg[at:at + n], pos[at:at + n], mask[at:at + n] = ids, s, np.arange(n), m
        at += n
    return {"tokens": tokens, "segment_ids": seg, "positions": pos, "loss_mask": mask}


def sft_example(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed row -> LMBatch fields: NextToken's, weights restricted to assistant targets."""
    ex = NextToken()(row)
    ex["weights"] = ex["weights"] * row["loss_mask"][1:].astype(np.float32)
    return ex


def stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class SFTIterator(StepIterator):
    """This process's rows of global batches k = step, step+1, ... (dicts of numpy [B / P, L] arrays)."""

    NAME, STATE_FORMAT = "sft", STATE_FORMAT

    def __init__(self, data: SFTData, step: int = 0):
        super().__init__(data, step)
        self._epochs: list[list[list[int]]] = []  # packed rows of each epoch so far
        self._starts: list[int] = [0]  # global row index where each epoch begins

    def _row(self, r: int) -> list[int]:
        while r >= self._starts[-1]:
            rows = self.data.pack_epoch(len(self._epochs))
            self._epochs.append(rows)
            self._starts.append(self._starts[-1] + len(rows))
        e = int(np.searchsorted(self._starts, r, side="right")) - 1
        return self._epochs[e][r - self._starts[e]]

    def rows(self, first: int) -> dict[str, np.ndarray]:
        d = self.data
        return stack([sft_example(row_arrays(self._row(first + j), d.train, d.capacity))
                      for j in range(d.local_batch)])


def batch_rows(cfg: Config, process_count: int) -> tuple[int, int]:
    """(rows of a global batch, rows each process reads); ConfigError unless the processes split it evenly."""
    if cfg.train.batch_size % process_count:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by the process count "
                          f"{process_count}")
    return cfg.train.batch_size, cfg.train.batch_size // process_count


class SFTData:
    """The `DataModule` of `train.objective=sft` (same interface: iterators, eval batches, tokenizer)."""

    def __init__(self, cfg: Config, block: int = 0, process_count: int = 1, tokenizer: Tokenizer | None = None):
        if cfg.data.sources or cfg.data.tfds_name or not cfg.data.path:
            raise ConfigError("train.objective=sft: set data.path to a JSON-lines file (or directory) of chat or "
                              "prompt/completion records (data.sources / data.tfds_name are not read)")
        self.cfg, self.block = cfg, block
        self.global_batch, self.local_batch = batch_rows(cfg, process_count)
        self.capacity = cfg.data.seq_len + 1
        self.tokenizer = post_training_tokenizer(cfg, tokenizer)
        self.template = ChatTemplate.for_tokenizer(self.tokenizer, cfg.data.chat_template)
        records = read_jsonl(cfg.data.path)
        train_idx, val_idx = split_records([n for n, _ in records], cfg.data.validation_fraction)
        encoded = encode_records(records, self.template, self.tokenizer, self.capacity)
        self.train = [encoded[i] for i in train_idx]
        self.validation = [encoded[i] for i in val_idx]
        self.sources = [self]  # one source (the loop logs mixture fractions only for several)
        self.name = "sft"
        self.local_shares = None
        self._lengths = np.array([len(ids) for ids, _ in self.train])
        self._check_sizes()
        h = hashlib.sha256(json.dumps([STATE_FORMAT, cfg.seed, self.capacity, cfg.data.shuffle,
                                       cfg.data.packing_bins, self.tokenizer.file_hash(), self.template.source,
                                       cfg.data.validation_fraction]).encode())
        for ids, mask in self.train:
            h.update(ids.tobytes() + mask.tobytes())
        self.fingerprint = h.hexdigest()[:16]

    def _check_sizes(self) -> None:
        rows = len(self.pack_epoch(0))
        if rows < self.global_batch:
            raise ConfigError(f"data.path: the {len(self.train)} training conversations pack into {rows} rows, fewer "
                              f"than one batch of train.batch_size={self.global_batch}; lower train.batch_size or "
                              "data.seq_len, or use more data")
        if self.cfg.eval.every_steps > 0 and not self.validation:
            raise ConfigError("data.validation_fraction: no validation conversation was held out; raise it, or "
                              "disable evaluation with eval.every_steps=0")

    def pack_epoch(self, epoch: int) -> list[list[int]]:
        """Epoch `epoch`'s rows (lists of training-conversation indices)."""
        n = len(self.train)
        order = (np.random.default_rng(derive_seed(self.cfg.seed, "sft", epoch)).permutation(n)
                 if self.cfg.data.shuffle else np.arange(n))
        return best_fit(self._lengths, order, self.capacity, self.cfg.data.packing_bins)

    def describe(self) -> str:
        t = self.tokenizer
        tr = sum(int(m.sum()) for _, m in self.train)
        tokens = sum(len(i) for i, _ in self.train)
        return (f"data: sft {self.cfg.data.path}: {len(self.train)} train / {len(self.validation)} validation "
                f"conversations, {tokens} train tokens ({tr} assistant); {len(self.pack_epoch(0))} rows of "
                f"{self.capacity} per epoch (best fit)\ndata: tokenizer {t.kind} {t.path} (vocab {t.vocab_size}); "
                f"chat template {self.template.origin}")

    def train_iterator(self, state: dict[str, Any] | None = None) -> SFTIterator:
        return SFTIterator(self, int(state["step"]) if state else 0)

    def restore_iterator(self, state: dict[str, Any] | None, step: int) -> tuple[SFTIterator, str | None]:
        """The iterator at `step` (a pure function of the step); a note when the data changed since."""
        note = None
        if state is not None and state.get("fingerprint") not in (None, self.fingerprint):
            note = "the data configuration changed since the checkpoint was written"
            return self.train_iterator(), note
        return self.train_iterator({"step": step}), note

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """The validation conversations packed in file order, in global batches (the last one padded with empty
        rows, weight 0); the first `eval.batches` of them (0: all); this process's rows."""
        lengths = np.array([len(ids) for ids, _ in self.validation])
        rows = best_fit(lengths, np.arange(len(lengths)), self.capacity, self.cfg.data.packing_bins)
        n_batches = -(-len(rows) // self.global_batch)
        if self.cfg.eval.batches > 0:
            n_batches = min(n_batches, self.cfg.eval.batches)
        for k in range(n_batches):
            first = k * self.global_batch + self.block * self.local_batch
            picked = [rows[r] if r < len(rows) else [] for r in range(first, first + self.local_batch)]
            yield stack([sft_example(row_arrays(items, self.validation, self.capacity)) for items in picked])
