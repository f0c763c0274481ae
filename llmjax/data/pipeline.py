"""Tokenize, pack, shuffle, batch and shard documents; resumable iteration with grain.

Token stream: every document is encoded and followed by EOS; the concatenation is cached as one
int32 `.npy` per (corpus, tokenizer, split). Row i of length seq_len+1 is
`stream[i*seq_len : i*seq_len + seq_len + 1]` (stride seq_len, remainder dropped), so
`inputs = row[:-1]` and `targets = row[1:]`.

Order: global sample index g (step k holds g = k*B .. k*B+B-1) reads row perm_e[g mod N] with
epoch e = g // N and perm_e a permutation drawn from (seed, e) by grain's `shuffle` + `repeat`.
Process p of P reads only its contiguous slice of each global batch, so the global batch at step
k does not depend on P. Iterator state is grain's `{"next_index": k}` (in batches) plus the step.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np

from llmjax.config import Config, ConfigError
from llmjax.data.objectives import NextToken, number_documents
from llmjax.data.sources import Corpus, file_lock, load_corpus, resolve_cache_dir
from llmjax.data.tokenizer import Tokenizer, load_or_train_tokenizer

log = logging.getLogger(__name__)

_ENCODE_CHUNK = 256  # documents per batch-encode call
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


# ----------------------------------------------------------------------------- token cache


def encode_documents(tokenizer: Tokenizer, docs) -> np.ndarray:
    """Encode documents (a sequence of str) into one stream; each non-empty doc is followed by EOS.

    Returns int32 [num_tokens].
    """
    parts: list[np.ndarray] = []
    eos = tokenizer.eos_id
    for start in range(0, len(docs), _ENCODE_CHUNK):
        texts = [docs[i] for i in range(start, min(start + _ENCODE_CHUNK, len(docs)))]
        texts = [t for t in texts if t]
        if not texts:
            continue
        ids = tokenizer.encode(texts)
        for x in ids:
            x.append(eos)
        count = sum(len(x) for x in ids)
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=count)
        parts.append(flat)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def token_cache_path(cfg: Config, corpus: Corpus, tokenizer: Tokenizer, split: str) -> Path:
    """`<cache>/tokens/<corpus fingerprint>_<tokenizer hash>_<split>.npy`.

    The stream does not depend on seq_len (rows are a strided view of it), so it is shared by all seq_lens.
    """
    key = hashlib.sha256(f"{corpus.fingerprint}|{tokenizer.file_hash()}|{split}|v1".encode()).hexdigest()[:20]
    return resolve_cache_dir(cfg) / "tokens" / f"{corpus.fingerprint}_{key}_{split}.npy"


def load_or_build_tokens(cfg: Config, corpus: Corpus, tokenizer: Tokenizer, split: str) -> np.ndarray:
    """The cached token stream of `split` ("train"/"validation"), built once under a lock. int32 [T] memmap."""
    path = token_cache_path(cfg, corpus, tokenizer, split)
    with file_lock(path):
        if not path.exists():
            t0 = time.perf_counter()
            docs = corpus.train if split == "train" else corpus.validation
            stream = encode_documents(tokenizer, docs)
            _save_npy_atomic(path, stream)
            log.info("data: tokenized %s split: %d docs -> %d tokens in %.1fs (%s)", split, len(docs), len(stream),
                     time.perf_counter() - t0, path.name)
    return np.load(path, mmap_mode="r")


# ----------------------------------------------------------------------------- rows and features


class PackedRows:
    """Random-access rows of `length` tokens, every `stride` tokens, over a token stream (grain source).

    The next-token objective reads rows of seq_len + 1 tokens every seq_len tokens (each row's last
    token is the next row's first input); the other objectives read disjoint rows."""

    def __init__(self, stream: np.ndarray, length: int, stride: int | None = None):
        self._stream = stream
        self.length, self.stride = length, stride or length
        self._n = max(0, (len(stream) - length) // self.stride + 1) if len(stream) >= length else 0

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> np.ndarray:
        """Row i: int32 [length]."""
        i = int(i)
        if not 0 <= i < self._n:
            raise IndexError(f"row {i} out of range [0, {self._n})")
        start = i * self.stride
        return np.array(self._stream[start:start + self.length], dtype=np.int32)


def row_features(row: np.ndarray, eos_id: int) -> dict[str, np.ndarray]:
    """One packed row [L+1] -> the next-token example: inputs/targets/segment_ids/positions (int32 [L]) and
    weights (float32 [L]) (`objectives.NextToken` on `objectives.number_documents`)."""
    return NextToken()(number_documents(row, eos_id))


def example_fn(objective: Any, eos_id: int) -> Any:
    """grain random_map transform: a raw row and its rng -> the objective's example."""
    return lambda row, rng: objective(number_documents(row, eos_id), rng)


class ProcessSlice(grain.MapDataset):
    """Local sample t of process p -> global sample (t // b) * B + p * b + t % b of the parent (b = B / P)."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int,
                 num_batches: int | None = None):
        super().__init__(parent)
        self._global = global_batch
        self._local = global_batch // process_count
        self._offset = process_index * self._local
        self._length = sys.maxsize if num_batches is None else num_batches * self._local

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"ProcessSlice(global_batch={self._global}, local={self._local}, offset={self._offset})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, j = divmod(int(index), self._local)
        return self._parent[step * self._global + self._offset + j]


def shuffle_seed(seed: int) -> int:
    """A 32-bit grain shuffle seed derived from the config seed (grain uses seed + epoch per epoch)."""
    return int.from_bytes(hashlib.sha256(f"llmjax-shuffle|{seed}".encode()).digest()[:4], "big")


def train_dataset(rows: PackedRows, eos_id: int, seed: int, shuffle: bool, global_batch: int,
                  process_index: int, process_count: int, objective: Any = None) -> grain.MapDataset:
    """Infinite MapDataset of this process's batches: element k = dict of [B/P, ...] arrays of global batch k.

    `objective` (default next-token) turns each row into an example with an rng seeded by (seed, global
    example index), before the process slice, so examples do not depend on the process count."""
    ds = grain.MapDataset.source(rows)
    if shuffle:
        ds = ds.shuffle(seed=shuffle_seed(seed))
    ds = ds.repeat().random_map(example_fn(objective or NextToken(), eos_id), seed=shuffle_seed(seed) ^ 1)
    ds = ProcessSlice(ds, global_batch, process_index, process_count)
    return ds.batch(global_batch // process_count, drop_remainder=True)


def eval_dataset(rows: PackedRows, eos_id: int, global_batch: int, num_batches: int,
                 process_index: int, process_count: int, objective: Any = None) -> grain.MapDataset:
    """The first `num_batches` global batches of `rows` in order, this process's slice (the same examples at
    every evaluation: the objective's rng is seeded by the row index)."""
    ds = grain.MapDataset.source(rows).random_map(example_fn(objective or NextToken(), eos_id), seed=7)
    ds = ProcessSlice(ds, global_batch, process_index, process_count, num_batches)
    return ds.batch(global_batch // process_count, drop_remainder=True)


# ----------------------------------------------------------------------------- iterator


class BatchIterator:
    """Iterator over this process's part of global batches k = start_step, start_step + 1, ... (resumable)."""

    def __init__(self, dataset: grain.MapDataset, start_step: int = 0):
        self._it = dataset.to_iter_dataset(_READ_OPTIONS).__iter__()
        self.step = 0
        if start_step:
            self._seek(start_step)

    def _seek(self, step: int) -> None:
        state = self._it.get_state()
        if "next_index" in state:
            self._it.set_state({**state, "next_index": int(step)})
            self.step = int(step)
        else:  # unknown grain state layout: skip forward
            while self.step < step:
                next(self)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """Dict of numpy arrays [B/P, seq_len]: inputs, targets, segment_ids, positions (int32), weights (f32)."""
        batch = next(self._it)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        """JSON-serialisable state: {"step": next global step, "grain": grain iterator state}."""
        return {"step": self.step, "grain": self._it.get_state()}

    def set_state(self, state: dict) -> None:
        """Resume so the next batch is the one an uninterrupted run would produce next."""
        self._it.set_state(state["grain"])
        self.step = int(state["step"])


# ----------------------------------------------------------------------------- data module


def _rows_error(split: str, tokens: int, rows: int, cfg: Config, hint: str) -> ConfigError:
    return ConfigError(
        f"data: the {split} split has {tokens} tokens = {rows} rows of {cfg.data.seq_len} tokens (data.seq_len) "
        f"tokens, fewer than one global batch of train.batch_size={cfg.train.batch_size} rows; {hint}"
    )


class DataModule:
    """Sources + tokenizer + token caches for one process; hands out train/eval batches."""

    def __init__(self, cfg: Config, process_index: int = 0, process_count: int = 1, objective: Any = None):
        """`objective`: how an example is made from a packed row (default: the model family's,
        `ModelFamily.objective`)."""
        t0 = time.perf_counter()
        self.cfg = cfg
        self.process_index, self.process_count = process_index, process_count
        self.global_batch = cfg.train.batch_size
        self._check_shapes()
        self.local_batch = self.global_batch // process_count
        self.corpus = load_corpus(cfg)
        self.tokenizer = load_or_train_tokenizer(cfg, self.corpus)
        self._train_stream = load_or_build_tokens(cfg, self.corpus, self.tokenizer, "train")
        self._eval_stream = (load_or_build_tokens(cfg, self.corpus, self.tokenizer, "validation")
                             if len(self.corpus.validation) else np.zeros(0, np.int32))
        if objective is None:
            from llmjax.models.families import build_family

            objective = build_family(cfg.model).objective(cfg.data.seq_len, self.tokenizer)
        self.objective = objective
        length, stride = objective.raw_length(cfg.data.seq_len), objective.stride(cfg.data.seq_len)
        self.train_rows = PackedRows(self._train_stream, length, stride)
        self.eval_rows = PackedRows(self._eval_stream, length, stride)
        self.num_train_rows = len(self.train_rows)
        self.num_eval_rows = len(self.eval_rows)
        self.num_train_tokens = len(self._train_stream)
        self.num_eval_tokens = len(self._eval_stream)
        self._check_sizes()
        self.build_seconds = time.perf_counter() - t0
        log.info("data: ready in %.1fs: %s", self.build_seconds, self.describe())

    def _check_shapes(self) -> None:
        cfg, p, n = self.cfg, self.process_index, self.process_count
        if cfg.data.seq_len <= 0:
            raise ConfigError(f"data.seq_len must be positive, got {cfg.data.seq_len}")
        if self.global_batch <= 0:
            raise ConfigError(f"train.batch_size must be positive, got {self.global_batch}")
        if n <= 0 or not 0 <= p < n:
            raise ConfigError(f"data: invalid process_index={p} / process_count={n}")
        if self.global_batch % n:
            raise ConfigError(f"train.batch_size={self.global_batch} is not divisible by the process count {n}")
        if cfg.data.tokenizer and not Path(cfg.data.tokenizer).expanduser().is_file():
            # checked here too, so that a typo fails before the corpus is prepared
            raise ConfigError(f"data.tokenizer: file not found: {Path(cfg.data.tokenizer).expanduser()}")

    def _check_sizes(self) -> None:
        cfg = self.cfg
        if self.num_train_rows < self.global_batch:
            raise _rows_error("train", self.num_train_tokens, self.num_train_rows, cfg,
                              "lower data.seq_len or train.batch_size, or use a larger corpus (data.path)")
        if cfg.eval.every_steps > 0 and self.num_eval_rows < self.global_batch:
            raise _rows_error("validation", self.num_eval_tokens, self.num_eval_rows, cfg,
                              "raise data.validation_fraction, lower data.seq_len or train.batch_size, "
                              "or disable evaluation with eval.every_steps=0")

    @property
    def num_eval_batches(self) -> int:
        """Global eval batches per evaluation: eval.batches (capped by the split), or all full batches if 0."""
        available = self.num_eval_rows // self.global_batch
        return min(self.cfg.eval.batches, available) if self.cfg.eval.batches > 0 else available

    def train_iterator(self, start_step: int = 0) -> BatchIterator:
        """This process's part of global batches start_step, start_step+1, ...: dicts of [B/P, seq_len] arrays."""
        ds = train_dataset(self.train_rows, self.tokenizer.eos_id, self.cfg.seed, self.cfg.data.shuffle,
                           self.global_batch, self.process_index, self.process_count, self.objective)
        return BatchIterator(ds, start_step)

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        """First `num_eval_batches` global validation batches in fixed order; this process's [B/P, seq_len] slice."""
        if self.num_eval_batches == 0:
            return iter(())
        ds = eval_dataset(self.eval_rows, self.tokenizer.eos_id, self.global_batch, self.num_eval_batches,
                          self.process_index, self.process_count, self.objective)
        return iter(ds.to_iter_dataset(_READ_OPTIONS))

    def describe(self) -> str:
        """Two log lines: source and sizes."""
        c = self.corpus
        skipped = f", skipped {c.skipped} undecodable files (e.g. {c.skipped_example})" if c.skipped else ""
        return (
            f"data: {c.description}; docs train {len(c.train)} / validation {len(c.validation)}{skipped}\n"
            f"data: tokens train {self.num_train_tokens} / validation {self.num_eval_tokens}; rows of "
            f"{self.train_rows.length} tokens train {self.num_train_rows} / validation {self.num_eval_rows}; "
            f"tokenizer {Path(self.tokenizer.path).name} (vocab {self.tokenizer.vocab_size})"
        )
