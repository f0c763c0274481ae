"""Guards against hostile inputs: paths named by a file stay inside the directory given, and the memory
that sizes read from a file imply is checked before it is allocated.

A downloaded model directory is untrusted: its `model.safetensors.index.json` names shard files, a
workdir's tokenizer manifest names the tokenizer's files, and any file in it may be a symbolic link.
`inside(directory, name, source)` is the one check every such path goes through: the name must be a
plain relative path which, resolved (symbolic links followed), stays inside `containment_root(directory)`.
That root is the directory itself, or for a Hugging Face hub cache snapshot
(`.../models--org--name/snapshots/<revision>`, whose files are links to `../../blobs/<hash>`) the cache's
repository directory, so the hub's layout keeps working.

`memory_bound()` is the limit the sizes are checked against: `LLMJAX_MEMORY_LIMIT` (e.g. `64GiB`) when set,
else this machine's RAM. Imports only the standard library and `llmjax.errors`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from llmjax.errors import ConfigError

GIB = 1024.0**3
MEMORY_ENV = "LLMJAX_MEMORY_LIMIT"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def containment_root(directory: str | os.PathLike[str]) -> Path:
    """The directory that files of `directory` may resolve into: `directory` resolved, or the repository
    directory of a Hugging Face hub cache snapshot (`<repo>/snapshots/<rev>` with a `<repo>/blobs`)."""
    d = Path(directory).resolve()
    if d.parent.name == "snapshots" and (d.parent.parent / "blobs").is_dir():
        return d.parent.parent
    return d


def inside(directory: str | os.PathLike[str], name: Any, source: str) -> Path:
    """`directory / name` when `name` is a relative path that, resolved, stays inside `containment_root(directory)`.

    ConfigError naming `name` and `source` (the file or key that named it) otherwise: an absolute path, a
    path that climbs out with `..`, or a symbolic link to a file elsewhere. Nothing is opened."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ConfigError(f"{source}: {name!r} is not a file name")
    if os.path.isabs(name) or name.startswith("~"):
        raise ConfigError(f"{source}: {name!r} is an absolute path; a file named here must be inside {directory}")
    path = Path(directory) / name
    root = containment_root(directory)
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as e:  # a symbolic link loop
        raise ConfigError(f"{source}: cannot resolve {name!r} ({e})") from None
    if not target.is_relative_to(root):
        raise ConfigError(f"{source}: {name!r} resolves to {target}, outside {root}; the files a model or run "
                          "directory names must be inside it")
    return path


def parse_bytes(text: str, key: str) -> int:
    """'64GiB' -> 64 * 2**30, '5GB' -> 5e9, '1000' -> 1000. ConfigError naming `key`."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"{key}: cannot read {text!r} as a size (e.g. 64GiB, 500MB or a number of bytes)")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if size < 1:
        raise ConfigError(f"{key} must be positive, got {text!r}")
    return size


def memory_bound() -> tuple[int, str] | None:
    """(bytes, description) that sizes read from files are checked against: $LLMJAX_MEMORY_LIMIT, else this
    machine's RAM; None when neither is known."""
    given = os.environ.get(MEMORY_ENV)
    if given:
        return parse_bytes(given, MEMORY_ENV), f"{MEMORY_ENV}={given}"
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return ram, f"this machine's {ram / GIB:.1f} GiB of RAM (set {MEMORY_ENV} to change the bound)"


def gib(n: float) -> str:
    """Bytes as '12.3 GiB' (at least three significant digits for small sizes)."""
    return f"{n / GIB:,.1f} GiB" if n >= GIB / 10 else f"{n / GIB:.3g} GiB"
