"""Where a run writes: local paths and object-store URLs (`gs://bucket/run`) through one API.

Workdirs, checkpoints and metrics go through `etils.epath` (`as_path`), which orbax uses
too, so `--workdir gs://bucket/run` works wherever epath has a backend for the scheme
(gcsfs or TensorFlow's gfile for gs://). Object stores cannot append to a file; writers
that append (metrics.jsonl, TensorBoard events) stage locally and upload (`writers`).
`write_atomic`/`read_text` are the whole-file writes and reads of small state files (a sweep's
queue and markers) on either kind of path; gcsfs and google-cloud-storage both honour
STORAGE_EMULATOR_HOST, so the same code runs against a GCS emulator in tests.

Storage failures (a full disk, a quota, a read-only or forbidden path) become one
`StorageError` that names the path and its free space, so the CLI can print one line and
exit with `EXIT_STORAGE` instead of a traceback (`storage_problem` recognises them in the
many exception types orbax, tensorstore and the OS raise). `StorageError`, `free_space` and
`EXIT_STORAGE` are defined in `llmjax.errors` and re-exported here.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from llmjax.errors import EXIT_STORAGE, ConfigError, StorageError, free_space

__all__ = ["EXIT_STORAGE", "STORAGE_ERRNOS", "StorageError", "any_path", "as_path", "check_backend", "free_space",
           "is_url", "read_text", "relative", "reraise_storage", "storage_problem", "writable_ancestor", "write_atomic",
           "write_bytes_atomic"]

# errno values that are a property of the storage, not of llmjax or the config.
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large for the file system",
}
# The same problems as tensorstore / gRPC / cloud clients spell them in messages.
STORAGE_TEXT = (
    ("No space left on device", "no space left on the device"),
    ("Disk quota exceeded", "disk quota exceeded"),
    ("Read-only file system", "read-only file system"),
    ("PERMISSION_DENIED", "permission denied"),
    ("Permission denied", "permission denied"),
    ("File too large", "file too large for the file system"),
    ("RESOURCE_EXHAUSTED", "the storage is out of resources (RESOURCE_EXHAUSTED)"),
)


def is_url(path: Any) -> bool:
    """True for `scheme://...` paths (gs://, s3://, ...)."""
    return "://" in os.fspath(path) if isinstance(path, (str, os.PathLike)) else False


def as_path(path: Any) -> Any:
    """An `etils.epath.Path`: URLs as they are, local paths made absolute (and `~` expanded)."""
    from etils import epath

    if is_url(path):
        _no_listing_cache()
        return epath.Path(os.fspath(path))
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _no_listing_cache() -> None:
    """gcsfs keeps every directory listing it made, without expiry by default, and answers later `exists`,
    `is_file` and reads from it: a long-lived process (a sweep worker, `sweep status --wait`) would never
    see a file another machine wrote since (a DONE marker, a lease's journal entry). Ask fsspec for no
    listing cache (cache_timeout 0) for gs://, unless the user configured one (fsspec.config, or
    FSSPEC_GCS_CACHE_TIMEOUT)."""
    try:
        from fsspec.config import conf  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return
    for protocol in ("gs", "gcs"):
        conf.setdefault(protocol, {}).setdefault("cache_timeout", 0)


def any_path(path: Any) -> Any:
    """A local path as a `pathlib.Path` (as given: relative stays relative), a URL as an `etils.epath.Path`:
    for code that treats both alike with the methods they share (`/`, read_text, write_text, is_file,
    is_dir, mkdir, unlink, iterdir, glob) and keeps the local file system's own semantics (rglob, stat)."""
    from pathlib import Path

    return as_path(path) if is_url(path) else Path(os.fspath(path))


def write_atomic(path: Any, text: str) -> None:
    """Replace the file `path` (local or URL) with `text` so that readers see the old or the new content,
    never a part: locally a private temporary file renamed over it; on an object store one upload (an
    object is replaced whole, and a reader gets either generation)."""
    path = any_path(path)
    if is_url(path):
        path.write_text(text)
        return
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Any, data: bytes) -> None:
    """Write `data` to a private temporary file next to the local file `path`, fsync, then rename it over
    `path` (its directory made if missing; the temporary file removed if anything fails)."""
    import contextlib
    import tempfile

    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(os.fspath(path))}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_text(path: Any) -> str | None:
    """The text of the file `path` (local or URL), or None when it does not exist."""
    try:
        return str(any_path(path).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None


def relative(path: Any, start: Any) -> str:
    """`path` relative to the directory `start` where both are local; else `path` as it is (a URL)."""
    if is_url(path) or is_url(start):
        return str(os.fspath(path))
    return str(os.path.relpath(os.fspath(path), os.fspath(start)))


def check_backend(path: Any) -> None:
    """ConfigError when `path` is a URL whose scheme has no storage backend installed (gs:// needs gcsfs,
    or TensorFlow's gfile), instead of an ImportError deep inside a run."""
    if not is_url(path):
        return
    try:
        as_path(path).exists()
    except ImportError as e:
        scheme = os.fspath(path).split("://", 1)[0]
        raise ConfigError(f"{path}: no backend for {scheme}:// paths is installed ({e}); for gs:// "
                          "`pip install gcsfs`") from None


def _chain(e: BaseException) -> list[BaseException]:
    """`e`, its causes and contexts, and the members of exception groups, each once."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    out: list[BaseException] = []
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        out.append(x)
        todo += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
    return out


def storage_problem(e: BaseException) -> str | None:
    """The storage reason behind `e` ('no space left on the device', ...), or None if it is something else."""
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in STORAGE_ERRNOS:
            return STORAGE_ERRNOS[x.errno]
    for x in _chain(e):
        text = str(x)
        for needle, reason in STORAGE_TEXT:
            if needle in text:
                return reason
    return None


def reraise_storage(e: BaseException, action: str, path: Any) -> None:
    """Raise StorageError(action, path) from `e` when `e` is a storage problem; otherwise return."""
    reason = storage_problem(e)
    if reason is not None:
        raise StorageError(action, path, reason) from e


def writable_ancestor(path: Any) -> str | None:
    """None when `path` could be created or written (its nearest existing ancestor is a writable directory),
    else why not. Object-store URLs are not probed (None)."""
    if is_url(path):
        return None
    probe = os.path.abspath(os.fspath(path))
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return f"{probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    kind = _pseudo_file_system(probe)
    if kind is not None:
        return f"{probe} is on a {kind} file system, which holds no files of ours"
    return None


# kernel file systems where mkdir fails (or means something else) even for root
PSEUDO_FILE_SYSTEMS = {"proc", "sysfs", "devpts", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "pstore",
                       "bpf", "configfs", "fusectl", "mqueue", "binfmt_misc", "efivarfs", "hugetlbfs", "autofs"}


def _pseudo_file_system(path: str) -> str | None:
    """The type of the kernel pseudo file system holding `path` (/proc, /sys, ...), or None (from
    /proc/self/mounts: the longest mount point that contains `path`; None where that cannot be read)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return None
    real = os.path.realpath(path)
    best, kind = "", None
    for point, fs in mounts:
        point = point.replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fs
    return kind if kind in PSEUDO_FILE_SYSTEMS else None
