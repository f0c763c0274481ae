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

With `curate.stages` set, each document goes through the curation stages before it is tokenized
(`llmjax.data.prepare.curator`); with a dedup stage, a first pass over the same tasks and a global
decision come first (`llmjax.data.prepare.curate_pass`). The merged report is written to
OUT/curation_report.json and printed as a table.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from llmjax.config import Config, ConfigError
from llmjax.config.curation import CurateConfig
from llmjax.data.prepare import report as curation_report
from llmjax.data.prepare.curate_pass import decide, scan_shard
from llmjax.data.prepare.curator import DEDUP_STAGES, Curator
from llmjax.data.stream.records import Records
from llmjax.data.stream.sources import PREPARED_FORMAT, PREPARED_META, Source, probe, resolve_sources
from llmjax.data.tokenizers.run_tokenizer import load_copy, save_copy
from llmjax.data.tokenizers.tokenizer import resolve_tokenizer

CURATION_REPORT = "curation_report.json"
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
    curate: CurateConfig | None = None  # curation stages (None: none)
    decisions: bytes | None = None  # uint8 per document: the global pass's removal codes (`Curator.decide`)

    @property
    def filename(self) -> str:
        return f"{self.split}-{self.index:05d}-of-{self.count:05d}.array_record"


def documents(task: ShardTask) -> Iterator[tuple[int, str]]:
    """The task's documents in order (the non-empty texts of its records), each with its record's index."""
    for i in range(task.start, task.stop):
        yield from ((i, d) for d in cast(Sequence[str], task.records[i]) if d)  # text sources only (`prepare`)


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Curate (if configured) and tokenize the task's documents and write its shard and sidecar; returns the
    sidecar's contents."""
    from array_record.python.array_record_module import ArrayRecordWriter

    curator = Curator(task.curate) if task.curate is not None else None
    report = curation_report.new_report(curator.stages if curator else [])
    decisions = np.frombuffer(task.decisions, np.uint8) if task.decisions is not None else None
    tok = load_copy(task.tokenizer_dir)
    out = Path(task.out_dir)
    tmp = out / f".{task.filename}.tmp{os.getpid()}"
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    documents_out = tokens = 0
    pending: list[str] = []

    def flush() -> None:
        nonlocal documents_out, tokens
        for ids in tok.encode(pending):
            writer.write(np.asarray(ids, dtype=task.dtype).tobytes())
            documents_out += 1
            tokens += len(ids)
        pending.clear()

    for j, (i, text) in enumerate(documents(task)):
        if curator is not None:
            decision = None if decisions is None else int(decisions[j])
            kept = curator.apply(text, decision, report, split=task.split, record=task.records.name(i))
            if kept is None:
                continue
            text = kept
        pending.append(text)
        if len(pending) >= _ENCODE_DOCS:
            flush()
    flush()
    writer.close()
    os.replace(tmp, out / task.filename)
    info = {"split": task.split, "index": task.index, "file": task.filename, "documents": documents_out,
            "tokens": tokens, "curation": report}
    (out / f"{task.filename}.json").write_text(json.dumps(info))
    return info


def _tasks(records: Records, split: str, shards: int, tokenizer_dir: Path, out: Path,
           dtype: str, curate: CurateConfig | None) -> list[ShardTask]:
    n = len(records)
    shards = max(1, min(shards, n)) if n else 0
    bounds = [round(k * n / shards) for k in range(shards + 1)] if shards else []
    return [ShardTask(split, k, shards, records, bounds[k], bounds[k + 1], str(tokenizer_dir), str(out), dtype,
                      curate) for k in range(shards)]


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
    curate = cfg.curate if cfg.curate.stages else None
    tasks = _tasks(source.train, "train", n_train, out / "tokenizer", out, dtype, curate)
    tasks += _tasks(source.validation, "validation", n_val, out / "tokenizer", out, dtype, curate)
    return source, tasks


def finish(out: Path, source: Source, tasks: list[ShardTask], runner: str) -> dict[str, Any]:
    """Write llmjax_prepared.json (and, with curation, curation_report.json) from the shards' sidecars (and delete
    them)."""
    tok = load_copy(out / "tokenizer")
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
    reports = []
    for t in sorted(tasks, key=lambda t: (t.split, t.index)):
        side = out / f"{t.filename}.json"
        if not side.is_file():
            raise ConfigError(f"llmjax data prepare: shard {out / t.filename} was not written")
        info = json.loads(side.read_text())
        splits[t.split].append({k: info[k] for k in ("file", "documents", "tokens")})
        reports.append(info["curation"])
    meta = {"format": PREPARED_FORMAT, "source": source.description, "tokenizer_hash": tok.file_hash(),
            "vocab_size": tok.vocab_size, "dtype": tasks[0].dtype, "splits": splits, "runner": runner}
    curate = tasks[0].curate
    if curate is not None:
        report = curation_report.merge(reports, curate.examples)
        curation_report.check(report)
        (out / CURATION_REPORT).write_text(json.dumps(report, indent=1, ensure_ascii=False))
        meta["curate"] = dataclasses.asdict(curate)
    tmp = out / f".{PREPARED_META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out / PREPARED_META)
    for t in tasks:
        (out / f"{t.filename}.json").unlink()
    return meta


def _run(fn: Callable[[ShardTask], object], tasks: list[ShardTask], runner: str, pool: Any,
         beam_args: Sequence[str]) -> None:
    """`fn` over `tasks`: on Beam, in the local worker pool, or in this process."""
    if runner == "beam":
        from llmjax.data.prepare.beam_runner import run_beam

        run_beam(tasks, list(beam_args), fn)
    elif pool is not None:
        for _ in pool.imap_unordered(fn, tasks):
            pass
    else:
        for t in tasks:
            fn(t)


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
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 and runner == "local" else None
    try:
        if tasks[0].curate is not None and any(s in DEDUP_STAGES for s in tasks[0].curate.stages):
            _run(scan_shard, tasks, runner, pool, beam_args)
            tasks = decide(tasks)
        _run(write_shard, tasks, runner, pool, beam_args)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    meta = finish(out, source, tasks, runner)
    if "curate" in meta:
        print(curation_report.table(json.loads((out / CURATION_REPORT).read_text())))
    train = meta["splits"]["train"]
    print(f"llmjax: prepared {source.description} into {out} in {time.perf_counter() - t0:.1f}s ({runner}): "
          f"{len(train)} train shards, {sum(s['documents'] for s in train)} documents, "
          f"{sum(s['tokens'] for s in train)} tokens; train with data.path={out}", file=sys.stderr)
    return meta
