"""The grain pipeline of one data share: read, tokenize (worker processes), pack, mix, shuffle rows, batch.

For each source, share r of R reads records r, r+R, r+2R, ... of the source's record order. A
record is a document (of a local file cut at natural boundaries, a TFDS example, a prepared
document; a few short JSON lines), and with `data.shuffle` the order is a new index-based
permutation of all the source's documents each epoch (grain's `index_shuffle`, nothing
materialised; the file order otherwise), so the R shares read disjoint documents, every document
once per epoch, and consecutive documents of a share come from anywhere in the corpus. Records
are tokenized by `data.workers` grain processes (`mp_prefetch`, placed before any stateful step,
so the output does not depend on the number of workers); in this process documents are packed
into rows, the sources' rows mixed by weight (`IterDataset.mix`), shuffled in windows of
`data.shuffle_window` rows (so the rows of one long document land in different batches), turned
into examples by the objective and batched into [batch_size / R, ...] arrays. Memory is bounded
by these buffers, whatever the corpus size.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from llmjax.data.stream.records import Records
from llmjax.data.stream.row_objectives import Objective
from llmjax.data.stream.sources import Source
from llmjax.data.stream.stages import (
    DocumentPieces,
    IndexedRecords,
    ObjectiveStage,
    TagSource,
    TokenizeDocuments,
    derive_seed,
    pack_rows,
)

_READ_AHEAD = 16  # tokenized records buffered per reader thread / worker


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """Everything that defines the rows of one data share."""

    seed: int
    raw_length: int
    packing: str
    packing_bins: int
    shuffle: bool
    shuffle_window: int
    workers: int
    prefetch: int
    add_bos: bool
    shares: int
    global_batch: int

    @property
    def share_rows(self) -> int:
        return self.global_batch // self.shares


def _mark_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; llmjax does not use absl's command line."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def record_stream(records: Records, name: str, spec: StreamSpec, share: int, train: bool,
                  epochs: int | None = None) -> grain.MapDataset:
    """(index, record) of the records share `share` reads, in order: every `shares`-th of the epoch-by-epoch
    order (a new permutation of all records each epoch when shuffling); `epochs` bounds a training stream."""
    ds = grain.MapDataset.source(IndexedRecords(records))
    if train and spec.shuffle:
        ds = ds.shuffle(seed=derive_seed(spec.seed, name, "documents"))
    if train:
        ds = ds.repeat(epochs)
    return ds[share::spec.shares]


def _exit_with_parent(parent_pid: int, worker_index: int, worker_count: int) -> None:
    """In a grain worker: exit as soon as the training process is gone (e.g. after kill -9), instead of
    lingering as an orphan."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="llmjax-parent-watch", daemon=True).start()


def source_rows(source: Source, index: int, records: Records, tokenizer: Any, spec: StreamSpec, share: int,
                train: bool, epochs: int | None = None) -> grain.IterDataset:
    """Packed rows of one source for one share (when `train`: `epochs` epochs, default forever; else one pass
    in file order)."""
    ds = record_stream(records, source.name, spec, share, train, epochs)
    ds = ds.map(TokenizeDocuments(tokenizer, spec.add_bos, source.kind))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=_READ_AHEAD))
    workers = spec.workers if train else 0
    if workers > 0:
        _mark_absl_flags_parsed()
        options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=_READ_AHEAD)
        it = it.mp_prefetch(options, worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
    max_len = spec.raw_length if spec.packing == "best_fit" else None
    pieces = DocumentPieces(it, max_len, f"{source.key} ({source.name}, share {share})")
    rows = pack_rows(pieces, spec.raw_length, spec.packing, spec.packing_bins,
                     derive_seed(spec.seed, source.name, share, "bins"), spec.shuffle and train)
    return rows.map(TagSource(index))


def share_batches(sources: Sequence[Source], tokenizer: Any, objective: Objective, spec: StreamSpec, share: int,
                  train: bool) -> grain.IterDataset:
    """Batches of share `share`: dicts of [batch_size / shares, ...] arrays (plus `_source`, `_tokens`)."""
    streams = [source_rows(s, i, s.train if train else s.validation, tokenizer, spec, share, train)
               for i, s in enumerate(sources)]
    ds = streams[0] if len(streams) == 1 else grain.IterDataset.mix(streams, [s.weight for s in sources])
    if train and spec.shuffle and spec.shuffle_window > 1:
        ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=spec.shuffle_window,
                                                         seed=derive_seed(spec.seed, share, "rows"))
    seed = derive_seed(spec.seed, "objective" if train else "objective-eval")
    ds = ds.map_with_index(ObjectiveStage(objective, seed, share, spec.share_rows, spec.global_batch))
    ds = ds.batch(spec.share_rows, drop_remainder=True)
    if spec.prefetch > 0:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=spec.prefetch)
    return ds


def local_shares(shares: int, block: int, process_count: int) -> list[int]:
    """The shares whose rows lie in batch block `block` of `process_count` (shares is a multiple of it)."""
    per = shares // process_count
    return list(range(block * per, (block + 1) * per))


def concat_batches(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Share batches (in share order) -> this process's batch, concatenated along the batch axis."""
    if len(parts) == 1:
        return dict(parts[0])
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
