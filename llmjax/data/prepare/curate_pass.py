"""The global pass of curation in `llmjax data prepare` (only when a dedup stage is configured).

`scan_shard` runs in the workers (local processes or Beam), one call per shard task: it writes
what the decision needs of each of the task's documents (`Curator.scan`: the filter code, the
exact hash, the MinHash signature) to `OUT/.curate/<shard>.npz`. `decide` then reads the files
in corpus order (train shards, then validation, each in record order), so the first occurrence
in the corpus is the one kept whichever worker scanned it, and returns every task with its
decisions attached; `write_shard` applies them. Duplicates are removed across splits too: a
validation document that repeats a training one is removed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmjax.data.prepare.curator import Curator, Scan

if TYPE_CHECKING:
    from llmjax.data.prepare.shards import ShardTask

SCAN_DIR = ".curate"


def scan_path(task: ShardTask) -> Path:
    return Path(task.out_dir) / SCAN_DIR / f"{task.filename}.npz"


def scan_shard(task: ShardTask) -> str:
    """Pass 1 for one task: write its documents' scans to `scan_path(task)`; returns the file's name."""
    from llmjax.data.prepare.shards import documents

    assert task.curate is not None
    curator = Curator(task.curate)
    num_perm = task.curate.near_dedup.num_perm
    codes: list[int] = []
    keys: list[bytes] = []
    sigs: list[np.ndarray] = []
    no_sig = np.zeros(num_perm, np.uint32)  # a text without words (never a near duplicate)
    for _, text in documents(task):
        code, key, sig = curator.scan(text)
        codes.append(code)
        keys.append(key or b"\0" * 16)  # None: removed by a filter before the exact stage (never looked up)
        sigs.append(no_sig if sig is None else sig)
    n = len(codes)
    arrays: dict[str, Any] = {"codes": np.asarray(codes, np.uint8)}
    if "exact_dedup" in curator.stages:
        arrays["keys"] = np.frombuffer(b"".join(keys), np.uint8).reshape(n, 16)
    if "near_dedup" in curator.stages:
        arrays["sigs"] = np.stack(sigs) if sigs else np.zeros((0, num_perm), np.uint32)
    path = scan_path(task)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, allow_pickle=False, **arrays)
    os.replace(tmp, path)
    return path.name


def _scans(tasks: Sequence[ShardTask]) -> Iterator[Scan]:
    for task in tasks:
        with np.load(scan_path(task)) as z:
            codes, keys, sigs = z["codes"], z.get("keys"), z.get("sigs")
        for i in range(len(codes)):
            sig = None if sigs is None or not sigs[i].any() else sigs[i]
            yield int(codes[i]), None if keys is None else keys[i].tobytes(), sig


def decide(tasks: Sequence[ShardTask]) -> list[ShardTask]:
    """The tasks, in corpus order, with the decisions of the global pass attached (and the scans deleted)."""
    ordered = sorted(tasks, key=lambda t: (t.split != "train", t.index))
    assert ordered and ordered[0].curate is not None
    codes = Curator(ordered[0].curate).decide(_scans(ordered))
    out, start = [], 0
    for task in ordered:
        with np.load(scan_path(task)) as z:
            n = len(z["codes"])
        out.append(dataclasses.replace(task, decisions=codes[start:start + n].tobytes()))
        start += n
    shutil.rmtree(Path(ordered[0].out_dir) / SCAN_DIR)
    return out
