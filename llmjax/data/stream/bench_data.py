"""`llmjax bench-data`: the input pipeline alone (no model), for one process.

Prints the time to the first batch (from building the `DataModule`: sources, tokenizer,
probe, pipeline start), tokens/s over `batches` further batches (batch_size / processes x
seq_len tokens each), and the peak resident memory of this process and of its tokenizer
workers. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import resource
import sys
import time

from llmjax.config import Config
from llmjax.data.stream.data_module import DataModule


def _peak_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # kB on Linux


def bench_data(cfg: Config, batches: int) -> int:
    t0 = time.perf_counter()
    data = DataModule(cfg)
    it = data.train_iterator()
    first = next(it)
    t_first = time.perf_counter() - t0
    tokens = int(next(iter(first.values())).shape[0]) * cfg.data.seq_len
    t1 = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t1
    fractions = it.source_fractions()
    it.close()
    print(data.describe(), file=sys.stderr)
    d = cfg.data
    print(f"pipeline: {d.packing} packing, rows of {data.raw_length}, batch {data.local_batch} x {cfg.data.seq_len}, "
          f"{d.workers} worker(s), {data.shares} share(s), shuffle window {d.shuffle_window if d.shuffle else 0}")
    print(f"time to first batch: {t_first:.2f} s (data module {data.build_seconds:.2f} s)")
    print(f"tokens/s: {batches * tokens / dt:,.0f} ({batches} batches in {dt:.2f} s, "
          f"{1e3 * dt / batches:.2f} ms/batch)")
    print(f"peak memory: {_peak_mib(resource.RUSAGE_SELF):,.0f} MiB (this process), "
          f"{_peak_mib(resource.RUSAGE_CHILDREN):,.0f} MiB (largest worker)")
    if len(fractions) > 1:
        print("mixture: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in fractions.items()))
    return 0
