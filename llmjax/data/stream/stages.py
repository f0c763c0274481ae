"""The pieces of one data stream: tokenize records, cut documents, pack rows, apply the objective.

Shapes: a record is (its index, a list of documents); `TokenizeDocuments` turns it into one dict
`{"tokens": int32 [n], "lengths": int32 [docs], "record": int64 []}` (BOS if asked, the
document, EOS); `DocumentPieces` yields each document (or each piece of at most `max_len`
tokens) as `{"tokens": int32 [k], "doc": int64 [k]}` (the document's id, `doc_id`, repeated);
`pack_rows` packs them into rows `{"tokens", "segment_ids", "positions"}` of int32 [raw_length]
(plus "doc" int64 [raw_length]) with grain's concat-then-split or best-fit packers;
`ObjectiveStage` turns row i of a data share into example i with the objective's rng.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import grain
import numpy as np

from llmjax.data.stream.row_objectives import Objective
from llmjax.errors import DataError

_EMPTY = np.zeros(0, np.int32)
_MAX_EMPTY_RECORDS = 100_000  # consecutive records without a document before a stream is declared empty


def derive_seed(*parts: Any) -> int:
    """A 32-bit seed from any parts (config seed, source name, share, purpose)."""
    text = "|".join(str(p) for p in ("llmjax-data", *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


DOCS_PER_RECORD = 1 << 20  # doc_id = record * DOCS_PER_RECORD + document index within the record


def doc_id(record: int, k: int) -> int:
    """The id of document k of record `record` (the mixing measures count distinct ids)."""
    return record * DOCS_PER_RECORD + min(k, DOCS_PER_RECORD - 1)


class IndexedRecords:
    """records[i] -> (i, records[i]): the record index travels with its documents (for `doc_id`)."""

    def __init__(self, records: Any):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return int(i), self.records[int(i)]


class TokenizeDocuments:
    """(index, record: list of str or of token arrays) -> {"tokens": int32 [n], "lengths": int32 [docs],
    "record": int64 []}.

    Every non-empty document becomes [BOS]? + tokens + [EOS]. Runs in grain worker processes,
    so it is picklable (the tokenizer reloads from its file).
    """

    def __init__(self, tokenizer: Any, add_bos: bool, kind: str):
        self.tokenizer, self.add_bos, self.kind = tokenizer, add_bos, kind
        self.bos = tokenizer.bos_id if add_bos else None
        self.eos = tokenizer.eos_id

    def __call__(self, item: tuple[int, list[Any]]) -> dict[str, np.ndarray]:
        record, docs = item
        if self.kind == "text":
            docs = [d for d in docs if d]
            ids: list[Any] = self.tokenizer.encode(docs) if docs else []
        else:
            ids = [d for d in docs if len(d)]
        extra = (self.bos is not None) + 1
        lengths = np.array([len(x) + extra for x in ids], np.int32)
        if not len(lengths):
            return {"tokens": _EMPTY, "lengths": np.zeros(0, np.int32), "record": np.asarray(record, np.int64)}
        head = [self.bos] if self.bos is not None else []
        parts = (itertools.chain(head, x, (self.eos,)) for x in ids)
        flat = np.fromiter(itertools.chain.from_iterable(parts), dtype=np.int32, count=int(lengths.sum()))
        return {"tokens": flat, "lengths": lengths, "record": np.asarray(record, np.int64)}


class DocumentPieces(grain.IterDataset):
    """Tokenized records -> one element per document (or per piece of at most `max_len` tokens)."""

    def __init__(self, parent: grain.IterDataset, max_len: int | None, what: str):
        super().__init__(parent)
        self._max_len, self._what = max_len, what

    def __iter__(self) -> _PiecesIterator:
        return _PiecesIterator(self._parent.__iter__(), self._max_len, self._what)

    def __str__(self) -> str:
        return f"DocumentPieces(max_len={self._max_len})"


class _PiecesIterator(grain.DatasetIterator):
    """State: the parent's state before the current record and how many of its pieces were emitted."""

    def __init__(self, parent: grain.DatasetIterator, max_len: int | None, what: str):
        super().__init__(parent)
        self._max_len, self._what = max_len, what
        self._before = parent.get_state()
        self._pieces: list[dict[str, np.ndarray]] = []
        self._emitted = 0

    def _split(self, element: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        docs = np.split(element["tokens"], np.cumsum(element["lengths"])[:-1]) if len(element["lengths"]) else []
        record = int(element["record"])
        step = self._max_len or max((len(d) for d in docs), default=1)
        return [{"tokens": d[i:i + step], "doc": np.full(len(d[i:i + step]), doc_id(record, k), np.int64)}
                for k, d in enumerate(docs) for i in range(0, len(d), step)]

    def _load_next(self) -> None:
        for _ in range(_MAX_EMPTY_RECORDS):
            self._before = self._parent.get_state()
            self._pieces, self._emitted = self._split(next(self._parent)), 0
            if self._pieces:
                return
        raise DataError(f"{self._what}: {_MAX_EMPTY_RECORDS} records in a row hold no document (empty or not UTF-8)")

    def __next__(self) -> dict[str, np.ndarray]:
        if self._emitted >= len(self._pieces):
            self._load_next()
        piece = self._pieces[self._emitted]
        self._emitted += 1
        return piece

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._before, "emitted": self._emitted}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._before, self._pieces, self._emitted = state["parent"], [], 0
        if state["emitted"]:
            self._pieces = self._split(next(self._parent))
            self._emitted = int(state["emitted"])


def _rename(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"tokens": row["tokens"].astype(np.int32), "segment_ids": row["tokens_segment_ids"].astype(np.int32),
            "positions": row["tokens_positions"].astype(np.int32), "doc": row["doc"].astype(np.int64)}


def pack_rows(pieces: grain.IterDataset, raw_length: int, packing: str, bins: int, seed: int,
              shuffle: bool) -> grain.IterDataset:
    """Pieces {"tokens": int32 [k], "doc": int64 [k]} -> rows of `raw_length` tokens with segment ids
    (0 = padding), per-piece positions and the document id of every token.

    concat: documents are concatenated and cut into rows (no padding; a document may continue in
    the next row, its positions restarting at 0). best_fit: documents (already cut to at most
    raw_length) go to the open row they fill best among `bins`; rows are padded, never split.
    """
    if packing == "concat":
        ds = grain.experimental.ConcatThenSplitIterDataset(pieces, length_struct={"tokens": raw_length,
                                                                                  "doc": raw_length})
    else:
        ds = grain.experimental.BestFitPackIterDataset(pieces, length_struct={"tokens": raw_length, "doc": raw_length},
                                                       num_packing_bins=bins, seed=seed, shuffle_bins=shuffle)
    return ds.map(_rename)


class TagSource:
    """Adds the source index to a packed row (popped again before the batch is returned)."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray | np.generic]:
        return {**row, "_source": np.int32(self.index)}


class ObjectiveStage:
    """(i, row) of data share r -> the objective's example for global example index g, plus bookkeeping.

    Row i of share r fills row i % b of global batch i // b at global position
    g = (i // b) * B + r * b + i % b (b = B / shares). The objective's rng is seeded from (seed, g).
    Adds `_source` (the row's source), `_tokens` (its non-padding tokens) and `_doc` (int64 [raw_length]: the
    document id of each token, -1 on padding), which `BatchIterator` removes.
    """

    def __init__(self, objective: Objective, seed: int, share: int, share_rows: int, global_batch: int):
        self.objective, self.seed = objective, seed
        self.share, self.share_rows, self.global_batch = share, share_rows, global_batch

    def global_index(self, i: int) -> int:
        step, j = divmod(int(i), self.share_rows)
        return step * self.global_batch + self.share * self.share_rows + j

    def __call__(self, i: int, row: dict[str, Any]) -> dict[str, np.ndarray | np.generic]:
        """`row`: a packed row's arrays, plus the `_source` scalar when `TagSource` ran."""
        rng = np.random.default_rng([self.seed, self.global_index(i)])
        core = {k: row[k] for k in ("tokens", "segment_ids", "positions")}
        out: dict[str, np.ndarray | np.generic] = dict(self.objective(core, rng))
        out["_source"] = np.int32(row.get("_source", 0))
        out["_tokens"] = np.int32(np.count_nonzero(row["segment_ids"]))
        out["_doc"] = np.where(row["segment_ids"] > 0, row["doc"], -1)
        return out
