"""A run's own copy of its tokenizer: `WORKDIR/tokenizer/` (files + `llmjax_tokenizer.json`).

Training copies the tokenizer there when it starts; resuming, `generate`, `eval` and
`convert to-hf` load that copy and never retrain or re-derive it, so a workdir can be moved
or copied to another machine without its data. The manifest records each file's sha256 and
the special ids; a copy whose files no longer match is refused. A remote workdir (gs://) is
read and written through `llmjax.storage`; its copy is loaded from a local mirror in the cache
(`$LLMJAX_CACHE/remote_tokenizers/<manifest hash>`: the tokenizer libraries read local files),
one per distinct tokenizer, reused by later loads instead of a new temporary directory each time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from llmjax.config import Config, ConfigError
from llmjax.data.stream.files import atomic_write_bytes
from llmjax.data.tokenizers.tokenizer import Tokenizer, load_tokenizer
from llmjax.guards import inside
from llmjax.storage import as_path, is_url

DIRNAME = "tokenizer"
MANIFEST = "llmjax_tokenizer.json"


def tokenizer_dir(workdir: Any) -> Any:
    """WORKDIR/tokenizer (a `Path`, or an `etils.epath.Path` for a gs:// workdir)."""
    return as_path(workdir) / DIRNAME if is_url(workdir) else Path(workdir) / DIRNAME


def has_copy(workdir: str | Path) -> bool:
    return (tokenizer_dir(workdir) / MANIFEST).is_file()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_copy(tok: Tokenizer, directory: str | Path, source: str | None = None) -> Path:
    """Copy `tok`'s files into `directory` and write the manifest last (so a half copy has none)."""
    remote = is_url(directory)
    directory = as_path(directory) if remote else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write = (lambda p, b: p.write_bytes(b)) if remote else atomic_write_bytes
    files = {}
    for name, path in tok.files.items():
        data = Path(path).read_bytes()
        write(directory / name, data)
        files[name] = hashlib.sha256(data).hexdigest()
    manifest = {"kind": tok.kind, "files": files, "hash": tok.file_hash(), "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id, "bos_id": tok.bos_id, "pad_id": tok.pad_id, "add_bos": tok.add_bos,
                "source": source or str(tok.path)}
    write(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
    return directory


def load_copy(directory: str | Path) -> Tokenizer:
    """The tokenizer stored in `directory` (checked against its manifest). Raises ConfigError."""
    directory = _local_mirror(directory) if is_url(directory) else Path(directory)
    try:
        manifest: dict[str, Any] = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ConfigError(f"{directory / MANIFEST}: unreadable ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise ConfigError(f"{directory / MANIFEST}: no 'files' mapping")
    for name, digest in files.items():
        path = inside(directory, name, f"{directory / MANIFEST}: files")
        if not path.is_file() or _sha256(path) != digest:
            raise ConfigError(f"{path}: missing or changed since the run copied it (sha256 differs from {MANIFEST}); "
                              "restore the file, or delete the directory to let training copy the tokenizer again")
    return load_tokenizer(directory, str(directory))


def _local_mirror(directory: str | Path) -> Path:
    """A local copy of the remote tokenizer directory `directory`, in the cache under the hash of its
    manifest. Written to a temporary directory and renamed into place, so concurrent processes never
    read a partial copy; an existing mirror is reused (its files are checked against the manifest)."""
    remote = as_path(directory)
    try:
        manifest = (remote / MANIFEST).read_bytes()
    except OSError as e:
        raise ConfigError(f"{directory}/{MANIFEST}: unreadable ({e})") from None
    root = Path(os.environ.get("LLMJAX_CACHE") or Path.home() / ".cache" / "llmjax") / "remote_tokenizers"
    target = root / hashlib.sha256(manifest).hexdigest()[:32]
    if (target / MANIFEST).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=root, prefix=".partial-"))
    for p in remote.iterdir():
        (partial / p.name).write_bytes(p.read_bytes())
    try:
        partial.rename(target)
    except OSError:  # another process put its mirror there first
        shutil.rmtree(partial, ignore_errors=True)
    return target


def run_tokenizer(cfg: Config, workdir: str | Path) -> Tokenizer | None:
    """The workdir's copy of its tokenizer, or None when it has none yet.

    With a copy, `data.tokenizer` (if set and present) must be the same tokenizer; a
    `data.tokenizer` that no longer exists is ignored, since the copy is the tokenizer the
    checkpoints were trained with.
    """
    if not has_copy(workdir):
        return None
    tok = load_copy(tokenizer_dir(workdir))
    given = cfg.data.tokenizer
    if given and Path(given).expanduser().exists():
        other = load_tokenizer(given)
        if other.file_hash() != tok.file_hash():
            raise ConfigError(f"data.tokenizer={given} is not the tokenizer {workdir} was trained with "
                              f"({tokenizer_dir(workdir)}); unset data.tokenizer or use another --workdir")
    return tok

