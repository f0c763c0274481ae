"""`llmjax bench-data`: the input pipeline alone (no model), for one process.

Prints the time to the first batch (from building the `DataModule`: sources, tokenizer,
probe, pipeline start), tokens/s over `batches` further batches (batch_size / processes x
seq_len tokens each), how mixed the stream is (distinct documents per batch, the share of a
batch's rows from a file a row of the previous batch came from; see docs/data.md for good
values), and the peak resident memory of this process and of its tokenizer workers. A
benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import resource
import sys
import time

import numpy as np

from llmjax.config import Config
from llmjax.data.stream.data_module import DataModule
from llmjax.data.stream.records import FileDocuments


def independent_mixing(records: object, rows: int) -> tuple[float, float] | None:
    """(distinct files per batch, share of rows from a file of the previous batch) if every row were an
    independent draw of a file weighted by its bytes; None unless `records` are documents of local files."""
    if not isinstance(records, FileDocuments) or not len(records):
        return None
    f = records.docs[:, 0]
    p = np.bincount(f, weights=records.sizes[f] / np.maximum(records.ndocs[f], 1))
    p = p[p > 0] / p.sum()
    hit = 1 - (1 - p) ** rows
    return float(hit.sum()), float((p * hit).sum())


def _peak_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kB on Linux


def bench_data(cfg: Config, batches: int) -> int:
    t0 = time.perf_counter()
    data = DataModule(cfg)
    it = data.train_iterator(mixing_batches=batches + 1)
    first = next(it)
    t_first = time.perf_counter() - t0
    tokens = int(next(iter(first.values())).shape[0]) * cfg.data.seq_len
    t1 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t1
    fractions = it.source_fractions()
    print(data.describe(), file=sys.stderr)
    d = cfg.data
    print(f"pipeline: {d.packing} packing, rows of {data.raw_length}, batch {data.local_batch} x {cfg.data.seq_len}, "
          f"{d.workers} worker(s), {data.shares} share(s), shuffle window {d.shuffle_window if d.shuffle else 0} rows")
    print(f"time to first batch: {t_first:.2f} s (data module {data.build_seconds:.2f} s)")
    print(f"tokens/s: {batches * tokens / dt:,.0f} ({batches} batches in {dt:.2f} s, "
          f"{1e3 * dt / batches:.2f} ms/batch)")
    print(f"peak memory: {_peak_mib(resource.RUSAGE_SELF):,.0f} MiB (this process), "
          f"{_peak_mib(resource.RUSAGE_CHILDREN):,.0f} MiB (largest worker)")
    mixing = it.mixing()
    if mixing:
        print(f"mixing: {mixing['distinct_documents']:.1f} distinct documents and {mixing['distinct_files']:.2f} "
              f"files per batch of {data.local_batch} rows; {100 * mixing['same_file_as_previous']:.1f}% of rows "
              f"from a file of the previous batch ({mixing['batches']} batches)")
        ideal = independent_mixing(data.sources[0].train, data.local_batch) if len(data.sources) == 1 else None
        if ideal:
            print(f"mixing if every row were an independent draw: {ideal[0]:.2f} files per batch, "
                  f"{100 * ideal[1]:.1f}% of rows from a file of the previous batch")
    if len(fractions) > 1:
        print("mixture: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in fractions.items()))
    it.close()
    return 0
