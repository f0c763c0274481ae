"""The errors a user sees, and the exit statuses they map to: the one place every layer imports them from.

The CLI (`llmjax.cli.main`) turns each into one line on stderr and an exit status:

  ConfigError (and its subclasses DataError, ScalingError)  EXIT_USAGE (2): a usage or configuration error,
                                                                  the message names the key or file
  CheckpointError                                                 EXIT_USAGE (2): no checkpoint could be restored
  StorageError                                                    EXIT_STORAGE (3): the storage refused a read
                                                                  or write (disk full, quota, read-only path)
  anything else                                                   EXIT_FAILED (1)

This module imports nothing from llmjax (only the standard library), so the base of the package
(`llmjax.config`, `llmjax.storage`, `llmjax.runlog`) and every layer above can raise these errors.
The old import paths (`llmjax.config.ConfigError`, `llmjax.storage.StorageError`,
`llmjax.scaling.ScalingError`, `llmjax.train.checkpoint.manager.CheckpointError`) re-export them.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1  # a run that failed (a non-finite loss, an internal error)
EXIT_USAGE = 2  # a usage or configuration error, reported before anything is compiled
EXIT_STORAGE = 3  # a storage (resource) error: disk full, quota, read-only or forbidden path


class ConfigError(ValueError):
    """A usage error in the configuration; the message names the key."""


class DataError(ConfigError):
    """A data source, shard or tokenizer problem; the message names the file or config key.

    A `ConfigError`, so the CLI reports it in one line with exit status 2, whether it is found before
    the first step (a missing file, an empty source) or during training (a shard that is corrupt, a
    file that disappeared). It is raised in grain worker processes too and crosses the process
    boundary as itself (it is a plain picklable exception)."""


def find_data_error(exc: BaseException) -> DataError | None:
    """The DataError in `exc`'s cause/context chain (grain wraps worker exceptions), or None."""
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        if isinstance(node, DataError):
            return node
        seen.add(id(node))
        node = node.__cause__ or node.__context__
    return None


class ScalingError(ConfigError):
    """A bad sweep spec, run directory or runs.csv: reported as `llmjax: error: ...`, exit status 2."""


class CheckpointError(RuntimeError):
    """No checkpoint in the directory could be restored, or the directory holds something else."""


class StorageError(RuntimeError):
    """A write or read that the storage refused. The message names the path, the reason and the free space."""

    def __init__(self, action: str, path: Any, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot {action} {path}: {reason} ({free_space(path)})")


def free_space(path: Any) -> str:
    """'1.2 GiB free of 20.0 GiB' for the file system holding `path` (or its nearest existing parent)."""
    if isinstance(path, (str, os.PathLike)) and "://" in os.fspath(path):  # `llmjax.storage.is_url`
        return "object store: free space not reported"
    probe = os.path.abspath(os.fspath(path))
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return "free space unknown"
    return f"{_size(usage.free)} free of {_size(usage.total)} on {probe}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
