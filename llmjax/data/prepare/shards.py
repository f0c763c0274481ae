"""`llmjax data prepare`: tokenize a corpus once into sharded array_record token files.

The corpus (the config's one source, `data.path` / `data.tfds_name`) is cut into shard tasks:
contiguous ranges of its train and validation records. Each task tokenizes its records with the
run's tokenizer (stored in OUT/tokenizer/) and writes `<split>-NNNNN-of-MMMMM.array_record`, one
record per document holding its token ids (uint16 when the vocabulary fits, else uint32; no
BOS/EOS, which training adds), plus a small `.json` sidecar with its counts. Tasks run in
`--workers` local processes, or as an Apache Beam pipeline (`llmjax.data.prepare.beam_runner`) for a cluster;
either way the same function writes each shard, so the outputs are identical. `llmjax_prepared.json`
is written last, from the sidecars: a directory without it is not a prepared corpus. Training with
`data.path=OUT` reads the shards without re-tokenizing.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from llmjax.config import Config, ConfigError
from llmjax.data.stream.records import Records
from llmjax.data.stream.sources import PREPARED_FORMAT, PREPARED_META, Source, probe, resolve_sources
from llmjax.data.tokenizers.run_tokenizer import load_copy, save_copy
from llmjax.data.tokenizers.tokenizer import resolve_tokenizer

_ENCODE_DOCS = 256  # documents per batch-encode call
DEFAULT_SHARD_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """Records [start, stop) of one split of the source -> one shard file in `out_dir`."""

    split: str
    index: int
    count: int
    records: Records
    start: int
    stop: int
    tokenizer_dir: str
    out_dir: str
    dtype: str

    @property
    def filename(self) -> str:
        return f"{self.split}-{self.index:05d}-of-{self.count:05d}.array_record"


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Tokenize the task's records and write its shard and sidecar; returns the sidecar's contents."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tok = load_copy(task.tokenizer_dir)
    out = Path(task.out_dir)
    tmp = out / f".{task.filename}.tmp{os.getpid()}"
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    documents = tokens = 0
    pending: list[str] = []

    def flush() -> None:
        nonlocal documents, tokens
        for ids in tok.encode(pending):
            writer.write(np.asarray(ids, dtype=task.dtype).tobytes())
            documents += 1
            tokens += len(ids)
        pending.clear()

    for i in range(task.start, task.stop):
        pending.extend(d for d in cast(Sequence[str], task.records[i]) if d)  # text sources only (`prepare`)
        if len(pending) >= _ENCODE_DOCS:
            flush()
    flush()
    writer.close()
    os.replace(tmp, out / task.filename)
    info = {"split": task.split, "index": task.index, "file": task.filename, "documents": documents, "tokens": tokens}
    (out / f"{task.filename}.json").write_text(json.dumps(info))
    return info


def _tasks(records: Records, split: str, shards: int, tokenizer_dir: Path, out: Path,
           dtype: str) -> list[ShardTask]:
    n = len(records)
    shards = max(1, min(shards, n)) if n else 0
    bounds = [round(k * n / shards) for k in range(shards + 1)] if shards else []
    return [ShardTask(split, k, shards, records, bounds[k], bounds[k + 1], str(tokenizer_dir), str(out), dtype)
            for k in range(shards)]


def plan(cfg: Config, out: Path, shards: int = 0, workers: int = 1) -> tuple[Source, list[ShardTask]]:
    """Resolve the source and the tokenizer (copied into OUT/tokenizer), and cut the shard tasks."""
    sources = resolve_sources(cfg)
    if len(sources) != 1:
        raise ConfigError("llmjax data prepare: prepare one source at a time (data.sources has "
                          f"{len(sources)}); mix the prepared directories with data.sources")
    source = sources[0]
    if source.kind != "text":
        raise ConfigError(f"{source.key}: {source.description.split(':')[0]} is already tokenized")
    probe(source)
    tok = resolve_tokenizer(cfg, sources)
    out.mkdir(parents=True, exist_ok=True)  # only once the source and the tokenizer are known good
    save_copy(tok, out / "tokenizer")
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    nbytes = getattr(source.train, "nbytes", None)
    auto = math.ceil(nbytes / DEFAULT_SHARD_BYTES) if nbytes else math.ceil(len(source.train) / 100_000)
    n_train = shards or max(auto, workers, 1)
    n_val = max(1, round(n_train * len(source.validation) / max(len(source.train), 1)))
    tasks = _tasks(source.train, "train", n_train, out / "tokenizer", out, dtype)
    tasks += _tasks(source.validation, "validation", n_val, out / "tokenizer", out, dtype)
    return source, tasks


def finish(out: Path, source: Source, tasks: list[ShardTask], runner: str) -> dict[str, Any]:
    """Write llmjax_prepared.json from the shards' sidecars (and delete them)."""
    tok = load_copy(out / "tokenizer")
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
    for t in sorted(tasks, key=lambda t: (t.split, t.index)):
        side = out / f"{t.filename}.json"
        if not side.is_file():
            raise ConfigError(f"llmjax data prepare: shard {out / t.filename} was not written")
        info = json.loads(side.read_text())
        splits[t.split].append({k: info[k] for k in ("file", "documents", "tokens")})
    meta = {"format": PREPARED_FORMAT, "source": source.description, "tokenizer_hash": tok.file_hash(),
            "vocab_size": tok.vocab_size, "dtype": tasks[0].dtype, "splits": splits, "runner": runner}
    tmp = out / f".{PREPARED_META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / PREPARED_META)
    for t in tasks:
        (out / f"{t.filename}.json").unlink()
    return meta


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"OUT: {out} exists and is not an empty directory")


def prepare(cfg: Config, out: str | Path, workers: int = 1, shards: int = 0, runner: str = "local",
            beam_args: Sequence[str] = ()) -> dict[str, Any]:
    """Prepare the config's source into `out`; returns the metadata. Raises ConfigError."""
    out = Path(out).expanduser()
    if workers < 0 or shards < 0:
        raise ConfigError("--workers and --shards must be >= 0")
    _check_out(out)
    t0 = time.perf_counter()
    source, tasks = plan(cfg, out, shards, workers)
    if runner == "beam":
        from llmjax.data.prepare.beam_runner import run_beam

        run_beam(tasks, list(beam_args))
    elif workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(write_shard, tasks):
                pass
    else:
        for t in tasks:
            write_shard(t)
    meta = finish(out, source, tasks, runner)
    train = meta["splits"]["train"]
    print(f"llmjax: prepared {source.description} into {out} in {time.perf_counter() - t0:.1f}s ({runner}): "
          f"{len(train)} train shards, {sum(s['documents'] for s in train)} documents, "
          f"{sum(s['tokens'] for s in train)} tokens; train with data.path={out}", file=sys.stderr)
    return meta
