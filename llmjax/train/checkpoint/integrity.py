"""Checksums of checkpoint files: written once a save is final, verified before a restore.

Orbax 0.12 has no verification of the array bytes it writes (its zarr3 layout checksums
only the shard index; the default OCDBT/zstd layout none), so a few flipped bytes restore
silently as NaNs or huge values. Here every file of a finalised step directory is hashed
(SHA-256, read in 8 MiB chunks, several files at once: hashlib releases the GIL) into
`<step>/llmjax_checksums.<i>-of-<n>.json`: with n processes, process i hashes every n-th
file, so each host reads only a share. `verify` checks a step against its manifests (any
process count may verify: the files are shared out again), reporting the first file whose
size or hash differs, or why the step cannot be verified.

The manifests are written after orbax has finalised the step (a kill -9 between the two
leaves a checkpoint without checksums, reported as unverified and still restorable).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

CHUNK = 8 * 2**20
MANIFEST_RE = re.compile(r"^llmjax_checksums\.(\d+)-of-(\d+)\.json$")
ALGORITHM = "sha256"


def manifest_name(index: int, count: int) -> str:
    return f"llmjax_checksums.{index}-of-{count}.json"


def _walk(step_dir: Any) -> Iterator[tuple[str, Any]]:
    """(relative posix path, path) of every file under `step_dir` (epath or pathlib), manifests excluded."""
    todo = [(step_dir, "")]
    while todo:
        d, rel = todo.pop()
        for child in d.iterdir():
            name = f"{rel}{child.name}"
            if child.is_dir():
                todo.append((child, f"{name}/"))
            elif not MANIFEST_RE.match(name):
                yield name, child


def _size(path: Any) -> int:
    """File size for a pathlib path (st_size) or an epath (length)."""
    st = path.stat()
    return int(getattr(st, "st_size", getattr(st, "length", -1)))


def hash_file(path: Any) -> tuple[int, str]:
    """(size in bytes, hex SHA-256) of a file, read in chunks."""
    h, size = hashlib.new(ALGORITHM), 0
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def _hash_all(paths: dict[str, Any], threads: int) -> dict[str, tuple[int, str]]:
    if not paths:
        return {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(threads, len(paths)))) as pool:
        results = pool.map(hash_file, paths.values())
        return dict(zip(paths, results, strict=True))


def _share(names: list[str], index: int, count: int) -> list[str]:
    """Process `index` of `count`'s share of `names` (sorted, every count-th one)."""
    return sorted(names)[index::count]


def _threads() -> int:
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:
        return max(1, min(8, os.cpu_count() or 1))


def write_manifest(step_dir: Any, index: int = 0, count: int = 1) -> int:
    """Hash this process's share of the files of the finalised `step_dir`; write its manifest (atomically).

    Returns the bytes hashed."""
    files = dict(_walk(step_dir))
    mine = {name: files[name] for name in _share(list(files), index, count)}
    hashed = _hash_all(mine, _threads())
    body = {"algorithm": ALGORITHM, "index": index, "count": count,
            "files": {name: {"size": size, ALGORITHM: digest} for name, (size, digest) in sorted(hashed.items())}}
    target = step_dir / manifest_name(index, count)
    tmp = step_dir / f".{target.name}.tmp"
    tmp.write_text(json.dumps(body, indent=0, sort_keys=True))
    tmp.replace(target)
    return sum(size for size, _ in hashed.values())


class Unverified(Exception):
    """The step has no (complete) checksums: it cannot be verified either way."""


def read_manifests(step_dir: Any) -> dict[str, dict[str, Any]]:
    """{relative file: {"size", "sha256"}} from every manifest of `step_dir`.

    Raises Unverified when there is none or a process's manifest is missing, ValueError when one is
    unreadable (a corrupted manifest fails verification)."""
    found: dict[int, set[int]] = {}
    entries: dict[str, dict[str, Any]] = {}
    for child in step_dir.iterdir():
        match = MANIFEST_RE.match(child.name)
        if not match:
            continue
        index, count = int(match.group(1)), int(match.group(2))
        try:
            body = json.loads(child.read_text())
            files = body["files"]
            if body.get("algorithm") != ALGORITHM or not isinstance(files, dict):
                raise ValueError("unknown format")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise ValueError(f"checksum file {child.name} is unreadable ({e})") from None
        found.setdefault(count, set()).add(index)
        entries.update(files)
    if not found:
        raise Unverified("it has no checksums (written by an older llmjax, or the run stopped before they were "
                         "written)")
    count, indices = max(found.items())
    if indices != set(range(count)):
        missing = sorted(set(range(count)) - indices)
        raise Unverified(f"its checksums are incomplete (missing the manifest of process(es) {missing})")
    return entries


def verify(step_dir: Any, index: int = 0, count: int = 1) -> str | None:
    """None when this process's share of `step_dir`'s files matches the manifests, else the first problem.

    Raises Unverified when the step has no complete checksums."""
    try:
        expected = read_manifests(step_dir)
    except ValueError as e:
        return str(e)
    present = dict(_walk(step_dir))
    mine = _share(list(expected), index, count)
    missing = [name for name in mine if name not in present]
    if missing:
        return f"file {missing[0]} is missing"
    for name in mine:  # sizes first: cheap, and catches truncation without reading
        size = _size(present[name])
        if size != expected[name]["size"]:
            return f"file {name} has {size} bytes, {expected[name]['size']} were written"
    hashed = _hash_all({name: present[name] for name in mine}, _threads())
    for name in mine:
        if hashed[name][1] != expected[name][ALGORITHM]:
            return f"file {name} does not match its SHA-256 checksum (its bytes changed after the save)"
    return None


def agree(problem: str | None, gather: Callable[[bytes], list[bytes]] | None) -> str | None:
    """The first problem any process found (`gather`: all processes' encoded problems), or None."""
    if gather is None:
        return problem
    for encoded in gather((problem or "").encode()[:500]):
        text = encoded.rstrip(b"\0").decode(errors="replace")
        if text:
            return text
    return None
