"""How mixed the training stream is under different shuffle mechanisms: the measurement behind issue 23's choice.

    python3 benchmarks/data_mixing.py [CORPUS] [BATCHES] [key=value ...]

For the corpus (default: the embedded stdlib corpus; a directory or file otherwise) and the default config
(`experiments/configs/default.yaml`, overridable), builds the training stream of one process with several
mechanisms and prints, over BATCHES batches (default 300), the mixing measures of `llmjax bench-data` (distinct
documents and files per batch, the share of a batch's rows from a file of the previous batch), the mean position
of the trained tokens (the context they see: 127.5 if every row were one document), tokens/s and the time to the
first batch:

- `before`: the pipeline before issue 23, rebuilt from today's stages: records of whole files / ~1 MiB pieces,
  one share, rows shuffled in windows of 256 rows after packing;
- `docs`: documents (`data.document_bytes`) in one global permutation, one share, no window;
- `docs+rows`: the same, rows shuffled in windows of 256 rows after packing (one share);
- `default`: today's defaults (documents, 256-row windows, gcd(batch_size, 8) shares).

A benchmark, not a test: report it with the machine's load (printed).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grain

from llmjax.config import load_config
from llmjax.data.stream.data_module import BatchIterator, DataModule
from llmjax.data.stream.grain_pipeline import source_rows
from llmjax.data.stream.stages import ObjectiveStage, derive_seed

DEFAULT = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "default.yaml"


def _row_window_iterator(data: DataModule, window: int) -> BatchIterator:
    """One share; rows (not pieces) shuffled in windows of `window` rows after packing, as before issue 23."""
    spec = dataclasses.replace(data.spec, shuffle_window=0, shares=1, prefetch=0)
    (source,) = data.sources
    ds = source_rows(source, 0, source.train, data.tokenizer, spec, 0, True)
    ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=window, seed=derive_seed(spec.seed, 0, "rows"))
    ds = ds.map_with_index(ObjectiveStage(data.objective, 0, 0, spec.global_batch, spec.global_batch))
    ds = ds.batch(spec.global_batch, drop_remainder=True)
    return BatchIterator({0: iter(ds)}, [source.name], "", 1, [source.train.group], 10**9)


def measure(name: str, overrides: list[str], batches: int, row_window: int = 0) -> None:
    t0 = time.perf_counter()
    data = DataModule(load_config(str(DEFAULT), overrides))
    it: Any = _row_window_iterator(data, row_window) if row_window else data.train_iterator(mixing_batches=10**9)
    first = next(it)
    t_first = time.perf_counter() - t0
    t1 = time.perf_counter()
    kept = [first]
    for _ in range(batches - 1):
        b = next(it)
        if len(kept) < 100:
            kept.append(b)
    dt = time.perf_counter() - t1
    m = it.mixing()
    it.close()
    ctx = sum(float(b["positions"][b["weights"] > 0].mean()) for b in kept) / len(kept)
    tokens = first["inputs"].size * (batches - 1)
    print(f"{name:12s} {data.shares:3d} shares: {m['distinct_documents']:6.1f} documents / batch, "
          f"{m['distinct_files']:5.2f} files / batch, {100 * m['same_file_as_previous']:5.1f}% rows from a file of "
          f"the previous batch; context {ctx:5.1f}; {tokens / dt:9,.0f} tokens/s; first batch {t_first:5.2f} s",
          flush=True)


def main() -> None:
    args = sys.argv[1:]
    corpus = args.pop(0) if args and "=" not in args[0] else None
    batches = int(args.pop(0)) if args and "=" not in args[0] else 300
    base = [*([f"data.path={corpus}"] if corpus else []), *args]
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    one = ["data.shares=1"]
    measure("before", [*base, *one, f"data.document_bytes={1 << 20}", "data.shuffle_window=0"], batches, 256)
    measure("docs", [*base, *one, "data.shuffle_window=0"], batches)
    measure("docs+rows", [*base, *one], batches)
    measure("default", base, batches)
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
