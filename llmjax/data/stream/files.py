"""Local files: the cache directory and locks, listing `data.path`, documents cut from files, the split.

A local file is read as documents: a file of at most `data.document_bytes` (D) bytes is one
document (for JSON lines: all of its lines); a larger one is cut into ceil(size / D) documents,
document j running from the cut at j*D to the cut at (j+1)*D. The cut at position x is the first
natural boundary in [x, x + D): a line starting in column 0 after a blank line (a paragraph, a
top-level definition in code), else the end of a blank line, else a line start, else a UTF-8
character start; JSON lines are only ever cut at line starts. So the documents of a file are
found by seeking, nothing is scanned up front, each holds at most 2 D bytes (JSON lines: whole
lines), and together they are the file, byte for byte. Gzip files are decompressed whole and cut
the same way in memory. Which documents go to validation is
decided by a hash of the file's relative path and, for files over `data.block_bytes`, of the
block of that many bytes the document starts in, never by reading them.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import re
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from llmjax.config import Config, ConfigError
from llmjax.storage import write_bytes_atomic

_GLOB_CHARS = set("*?[")
_SCAN = 1 << 16


# ----------------------------------------------------------------------------- cache helpers


def resolve_cache_dir(cfg: Config) -> Path:
    """`data.cache_dir`, else `$LLMJAX_CACHE`, else `~/.cache/llmjax` (created if missing)."""
    raw = cfg.data.cache_dir or os.environ.get("LLMJAX_CACHE") or "~/.cache/llmjax"
    path = Path(raw).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"data.cache_dir: cannot create cache directory {path}: {e}") from None
    return path


@contextlib.contextmanager
def file_lock(target: Path) -> Iterator[None]:
    """Exclusive inter-process lock on `<target>.lock` (fcntl.flock), held for the `with` block."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.with_name(target.name + ".lock")
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file next to `path`, fsync, then rename it over `path`."""
    write_bytes_atomic(path, data)


# ----------------------------------------------------------------------------- listing


def list_stdlib_files() -> tuple[Path, list[Path]]:
    """All `*.py` files of the running interpreter's stdlib (no site-/dist-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]  # not walked at all
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return root, sorted(p for p in files if p.is_file())


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def list_local_files(spec: str, extensions: Sequence[str], key: str = "data.path") -> tuple[Path, list[Path]]:
    """A file, directory (recursively, files ending in `extensions`) or glob -> (root, sorted files).

    Raises ConfigError naming `key`.
    """
    path = Path(spec).expanduser()
    exts = tuple(e if e.startswith(".") else f".{e}" for e in extensions)
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _matches(p.name, exts) and _visible(p, path))
        if not files:
            raise ConfigError(f"{key}: directory {path} contains no files with data.extensions {sorted(exts)}")
        return path, files
    if _GLOB_CHARS & set(spec):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise ConfigError(f"{key}: glob {spec!r} matches no files")
        root = Path(os.path.commonpath([str(p.parent) for p in files]))
        return root, files
    raise ConfigError(f"{key}: {spec} does not exist")


def _matches(name: str, exts: tuple[str, ...]) -> bool:
    base = name[:-3] if name.endswith(".gz") else name
    return base.endswith(exts)


def file_format(name: str) -> str:
    """"jsonl" (one JSON object per line) or "text" (the block is one document)."""
    base = name[:-3] if name.endswith(".gz") else name
    return "jsonl" if base.endswith((".jsonl", ".json")) else "text"


def fingerprint_files(root: Path, rels: Sequence[str], sizes: Sequence[int], mtimes: Sequence[int], extra: str) -> str:
    """A hash of the listing (names, sizes, mtimes) and `extra`: keys caches such as the trained tokenizer."""
    h = hashlib.sha256(f"v2|{root}|{extra}".encode())
    for rel, size, mtime in zip(rels, sizes, mtimes, strict=True):
        h.update(f"\n{rel}|{size}|{mtime}".encode())
    return h.hexdigest()[:20]


# ----------------------------------------------------------------------------- split


def split_score(name: str) -> float:
    """Deterministic uniform number in [0, 1) from a record name; < fraction means validation."""
    digest = hashlib.sha256(f"llmjax-split|{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_records(names: Sequence[str], fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) of records called `names`, chosen by a hash of the name.

    At least one validation record when there are >= 2 records and fraction > 0, and at least
    one training record always.
    """
    scores = np.array([split_score(n) for n in names], dtype=np.float64)
    val = np.flatnonzero(scores < fraction)
    if fraction > 0 and len(val) == 0 and len(names) >= 2:
        val = np.array([int(np.argmin(scores))])
    if len(val) == len(names) and len(names):
        val = np.delete(val, int(np.argmax(scores[val])))
    is_val = np.zeros(len(names), dtype=bool)
    is_val[val] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


# ----------------------------------------------------------------------------- documents

_TOP_LEVEL = re.compile(rb"\n[ \t\r\f\v]*\n(?=\S)")  # a blank line, then a line starting in column 0
_BLANK = re.compile(rb"\n[ \t\r\f\v]*\n")


def num_documents(name: str, size: int, document_bytes: int) -> int:
    """Documents of a file: 0 if empty, 1 if gzip or at most document_bytes, else ceil(size / document_bytes)."""
    if size == 0:
        return 0
    if name.endswith(".gz") or size <= document_bytes:
        return 1
    return -(-size // document_bytes)


def natural_cut(window: bytes) -> int:
    """Offset of the first natural boundary in `window`: the start of a line in column 0 after a blank line (a
    paragraph, a top-level definition), else after a blank line, else after a line break, else at a UTF-8
    character start; len(window) when it is empty."""
    for pattern in (_TOP_LEVEL, _BLANK):
        m = pattern.search(window)
        if m:
            return m.end()
    j = window.find(b"\n")
    if j >= 0:
        return j + 1
    for k, byte in enumerate(window):
        if byte & 0xC0 != 0x80:
            return k
    return len(window)


def cut_documents(data: bytes, document_bytes: int) -> list[bytes]:
    """`data` cut the way a file of these bytes is (see the module docstring); b"".join(result) == data."""
    n = num_documents("", len(data), document_bytes)
    if n <= 1:
        return [data] if data else []
    d = document_bytes
    cuts = [0] + [x + natural_cut(data[x:x + d]) for x in range(d, n * d, d)] + [len(data)]
    return [data[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def read_document(path: Path, j: int, ndocs: int, document_bytes: int, jsonl: bool) -> bytes:
    """The bytes of document `j` of `ndocs` of `path` (JSON lines: whole lines; gzip: the whole file)."""
    if jsonl or str(path).endswith(".gz"):
        return read_block(path, j, ndocs, document_bytes)
    with open(path, "rb") as f:
        if ndocs == 1:
            return f.read()
        d = document_bytes
        f.seek(j * d)
        buf = f.read(2 * d)
    start = natural_cut(buf[:d]) if j else 0
    end = len(buf) if j == ndocs - 1 else d + natural_cut(buf[d:])
    return buf[start:end] if end > start else b""


# ----------------------------------------------------------------------------- blocks


def num_blocks(name: str, size: int, block_bytes: int) -> int:
    """Blocks of a file: 0 if empty, 1 if gzip or at most block_bytes, else ceil(size / block_bytes)."""
    if size == 0:
        return 0
    if name.endswith(".gz") or size <= block_bytes:
        return 1
    return -(-size // block_bytes)


def _line_start_at_or_after(f, pos: int, size: int) -> int:
    """The smallest offset b >= pos with b == size or byte b-1 a newline."""
    if pos <= 0:
        return 0
    if pos >= size:
        return size
    f.seek(pos - 1)
    while True:
        chunk = f.read(_SCAN)
        if not chunk:
            return size
        j = chunk.find(b"\n")
        if j >= 0:
            return f.tell() - len(chunk) + j + 1


def read_block(path: Path, block: int, nblocks: int, block_bytes: int) -> bytes:
    """The bytes of block `block` of `nblocks` of `path` (line-aligned; gzip files decompressed whole)."""
    if str(path).endswith(".gz"):
        import gzip

        with gzip.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        if nblocks == 1:
            return f.read()
        size = os.fstat(f.fileno()).st_size
        start = _line_start_at_or_after(f, block * block_bytes, size)
        end = size if block == nblocks - 1 else _line_start_at_or_after(f, (block + 1) * block_bytes, size)
        if end <= start:
            return b""
        f.seek(start)
        return f.read(end - start)
