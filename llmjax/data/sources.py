"""Where documents come from: the embedded stdlib corpus, local files, or a prepared TFDS dataset.

Local corpora (the default stdlib corpus and `data.path`) are written once to array_record by a
TFDS builder under `<cache>/tfds/<fingerprint>/` and read back with `tfds.data_source` (no
TensorFlow needed). A user TFDS dataset (`data.tfds_name`) is read the same way. Every corpus is
exposed as a `Corpus`: two random-access sequences of document strings plus a fingerprint that
keys all downstream caches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from llmjax.config import Config, ConfigError

log = logging.getLogger(__name__)

_BUILDER_NAME = "llmjax_text"
_FORMAT_VERSION = "v1"  # bump to invalidate local corpus caches
_GLOB_CHARS = set("*?[")


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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


def _tfds():
    """Import tensorflow_datasets lazily (it is slow-ish and only needed when building/reading)."""
    import tensorflow_datasets as tfds

    return tfds


# ----------------------------------------------------------------------------- corpus


class TextView(Sequence[str]):
    """Random-access view of documents (str) over a TFDS data source, optionally a sub-range."""

    def __init__(self, source: Any, key: str, start: int = 0, stop: int | None = None):
        self._source = source
        self._key = key
        self._start = start
        self._stop = len(source) if stop is None else stop

    def __len__(self) -> int:
        return max(0, self._stop - self._start)

    def __getitem__(self, i: int) -> str:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        value = self._source[self._start + i][self._key]
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        return str(value)

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self[i]


@dataclasses.dataclass
class Corpus:
    """Train/validation documents plus provenance. `fingerprint` keys every downstream cache."""

    train: Sequence[str]
    validation: Sequence[str]
    fingerprint: str
    description: str
    skipped: int = 0  # undecodable files
    skipped_example: str | None = None
    empty: int = 0  # empty files dropped

    def train_texts(self) -> Sequence[str]:
        """Training documents (random access), used to train the tokenizer."""
        return self.train


def load_corpus(cfg: Config) -> Corpus:
    """Resolve `cfg.data` to a Corpus (building the array_record cache if needed). Raises ConfigError."""
    d = cfg.data
    if d.path and d.tfds_name:
        raise ConfigError("set only one of data.path and data.tfds_name")
    if d.tfds_name:
        return _load_tfds_corpus(cfg)
    if d.path:
        root, files = list_local_files(d.path, d.extensions)
        return _load_local_corpus(cfg, root, files, f"data.path={d.path}")
    root, files = list_stdlib_files()
    return _load_local_corpus(cfg, root, files, f"embedded default corpus (Python stdlib {root})")


# ----------------------------------------------------------------------------- file listing


def list_stdlib_files() -> tuple[Path, list[Path]]:
    """All `*.py` files of the running interpreter's stdlib (no site-/dist-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in root.rglob("*.py")
        if p.is_file() and not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
    ]
    return root, sorted(files)


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def list_local_files(spec: str, extensions: Sequence[str]) -> tuple[Path, list[Path]]:
    """`data.path` (file, directory or glob) -> (root for relative names, sorted files). Raises ConfigError."""
    path = Path(spec).expanduser()
    exts = {e if e.startswith(".") else f".{e}" for e in extensions}
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in exts and _visible(p, path))
        if not files:
            raise ConfigError(f"data.path: directory {path} contains no files with data.extensions {sorted(exts)}")
        return path, files
    if _GLOB_CHARS & set(spec):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise ConfigError(f"data.path: glob {spec!r} matches no files")
        root = Path(os.path.commonpath([str(p.parent) for p in files]))
        return root, files
    raise ConfigError(f"data.path: {spec} does not exist")


def _files_fingerprint(root: Path, files: Sequence[Path], cfg: Config) -> str:
    h = hashlib.sha256(f"{_FORMAT_VERSION}|{root}|{cfg.data.validation_fraction}".encode())
    for p in files:
        st = p.stat()
        h.update(f"\n{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _split_score(rel: str) -> float:
    """Deterministic uniform number in [0, 1) from a relative path; < fraction means validation."""
    digest = hashlib.sha256(f"llmjax-split|{rel}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(rels: Sequence[str], fraction: float) -> tuple[list[int], list[int]]:
    """Indices (train, validation) for documents named `rels`, chosen by a hash of the name.

    At least one validation document when there are >= 2 documents and fraction > 0, and at
    least one training document always.
    """
    scores = [_split_score(r) for r in rels]
    val = [i for i, s in enumerate(scores) if s < fraction]
    if fraction > 0 and not val and len(rels) >= 2:
        val = [min(range(len(rels)), key=scores.__getitem__)]
    if len(val) == len(rels) and rels:
        val.remove(max(val, key=scores.__getitem__))
    val_set = set(val)
    return [i for i in range(len(rels)) if i not in val_set], sorted(val)


# ----------------------------------------------------------------------------- TFDS builder


def _make_builder_class():
    """Define (once) the GeneratorBasedBuilder that writes local documents to array_record."""
    tfds = _tfds()

    class LlmjaxText(tfds.core.GeneratorBasedBuilder):
        """Local text documents, one example per file, in the given order (no shuffling)."""

        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES = {"1.0.0": "Initial release."}
        # Not a TFDS package: no checksums file to look up (tfds' lookup needs importlib_resources).
        code_path = None
        _log_download_bytes = _log_download_done = lambda self: None  # nothing is downloaded: no "Downloading"

        def __init__(self, *, split_docs: dict[str, list[str]] | None = None, **kwargs: Any):
            self._split_docs = split_docs
            super().__init__(**kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description="llmjax local text corpus",
                features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            if self._split_docs is None:
                raise RuntimeError("llmjax_text can only be prepared by llmjax.data.sources")
            return {name: self._generate_examples(docs) for name, docs in self._split_docs.items() if docs}

        def _generate_examples(self, docs):
            for i, text in enumerate(docs):
                yield i, {"text": text}

    return LlmjaxText


_BUILDER_CLS: Any = None


def _builder_cls():
    global _BUILDER_CLS
    if _BUILDER_CLS is None:
        _BUILDER_CLS = _make_builder_class()
    return _BUILDER_CLS


def _read_documents(root: Path, files: Sequence[Path]) -> tuple[list[str], list[str], list[str], int]:
    """Read files as UTF-8 -> (relative names, texts, undecodable paths, #empty). Empty files are dropped."""
    rels, texts, bad, empty = [], [], [], 0
    for p in files:
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            bad.append(str(p))
            continue
        except OSError as e:
            raise ConfigError(f"data.path: cannot read {p}: {e}") from None
        if not text:
            empty += 1
            continue
        rels.append(str(p.relative_to(root)))
        texts.append(text)
    return rels, texts, bad, empty


def _prepare_local(cfg: Config, root: Path, files: Sequence[Path], final_dir: Path, what: str) -> dict:
    """Decode, split and write the corpus to array_record in `final_dir` (atomically). Returns its metadata."""
    t0 = time.perf_counter()
    rels, texts, bad, empty = _read_documents(root, files)
    if not texts:
        reason = f"all {len(bad)} files are undecodable (not UTF-8), e.g. {bad[0]}" if bad else "all files are empty"
        key = "data.path" if cfg.data.path else "data"
        raise ConfigError(f"{key}: {what}: no documents ({reason}; {len(files)} files under {root})")
    train_idx, val_idx = split_documents(rels, cfg.data.validation_fraction)
    split_docs = {"train": [texts[i] for i in train_idx], "validation": [texts[i] for i in val_idx]}
    tmp_dir = final_dir.with_name(final_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tfds = _tfds()
    tfds.disable_progress_bar()
    builder = _builder_cls()(split_docs=split_docs, data_dir=str(tmp_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    meta = {
        "description": what, "root": str(root), "num_files": len(files), "num_train": len(train_idx),
        "num_validation": len(val_idx), "skipped": len(bad), "skipped_example": bad[0] if bad else None,
        "empty": empty,
    }
    (tmp_dir / "llmjax_meta.json").write_text(json.dumps(meta, indent=1))
    os.replace(tmp_dir, final_dir)
    log.info("data: wrote %s (%d train / %d validation docs) to array_record in %.1fs: %s", what,
             len(train_idx), len(val_idx), time.perf_counter() - t0, final_dir)
    return meta


def _data_source(name: str, split: str, data_dir: Path | str, builder_kwargs: dict | None = None) -> Any:
    tfds = _tfds()
    return tfds.data_source(name, split=split, data_dir=str(data_dir), download=False,
                            builder_kwargs=builder_kwargs, try_gcs=False)


def _load_local_corpus(cfg: Config, root: Path, files: Sequence[Path], what: str) -> Corpus:
    """Local files -> Corpus, preparing `<cache>/tfds/<fingerprint>` once (under a lock)."""
    if not files:
        raise ConfigError(f"data.path: {what}: no files found")
    fp = _files_fingerprint(root, files, cfg)
    final_dir = resolve_cache_dir(cfg) / "tfds" / f"local_{fp}"
    with file_lock(final_dir):
        meta_path = final_dir / "llmjax_meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            log.info("data: reusing cached array_record corpus %s", final_dir)
        else:
            meta = _prepare_local(cfg, root, files, final_dir, what)
    if meta["skipped"]:
        log.warning("data: skipped %d of %d files that are not valid UTF-8 (e.g. %s)", meta["skipped"],
                    meta["num_files"], meta["skipped_example"])
    _builder_cls()  # register the builder name before reading by name
    kwargs = {"file_format": "array_record"}
    train = TextView(_data_source(_BUILDER_NAME, "train", final_dir, kwargs), "text")
    val: Sequence[str] = []
    if meta["num_validation"]:
        val = TextView(_data_source(_BUILDER_NAME, "validation", final_dir, kwargs), "text")
    return Corpus(train=train, validation=val, fingerprint=f"local_{fp}", description=what,
                  skipped=meta["skipped"], skipped_example=meta["skipped_example"], empty=meta["empty"])


# ----------------------------------------------------------------------------- user TFDS datasets


def _tfds_builder(cfg: Config) -> Any:
    d = cfg.data
    if not d.tfds_data_dir:
        raise ConfigError(f"data.tfds_data_dir must be set to the directory where {d.tfds_name!r} was prepared")
    data_dir = Path(d.tfds_data_dir).expanduser()
    if not data_dir.is_dir():
        raise ConfigError(f"data.tfds_data_dir: {data_dir} does not exist")
    tfds = _tfds()
    try:
        builder = tfds.builder(d.tfds_name, data_dir=str(data_dir), try_gcs=False)
    except Exception as e:  # tfds raises several types (DatasetNotFoundError, FileNotFoundError, ...)
        raise ConfigError(f"data.tfds_name: cannot find dataset {d.tfds_name!r} in {data_dir}: {e}") from None
    if not builder.is_prepared():
        raise ConfigError(f"data.tfds_name: dataset {d.tfds_name!r} is not prepared in data.tfds_data_dir={data_dir}")
    return builder


def _load_tfds_corpus(cfg: Config) -> Corpus:
    """A dataset the user prepared with TFDS (array_record) -> Corpus. Raises ConfigError."""
    d = cfg.data
    builder = _tfds_builder(cfg)
    splits = builder.info.splits
    if d.tfds_train_split not in splits:
        raise ConfigError(f"data.tfds_train_split: {d.tfds_name!r} has no split {d.tfds_train_split!r} "
                          f"(available: {sorted(splits)})")
    features = builder.info.features
    if d.text_key not in features:
        raise ConfigError(
            f"data.text_key: {d.tfds_name!r} has no feature {d.text_key!r} (features: {sorted(features)})"
        )
    try:
        train_src = builder.as_data_source(split=d.tfds_train_split)
    except Exception as e:
        raise ConfigError(f"data.tfds_name: cannot read {d.tfds_name!r} from {d.tfds_data_dir} "
                          f"(it must be prepared with file_format=array_record): {e}") from None
    n = len(train_src)
    if d.tfds_eval_split in splits:
        train: Sequence[str] = TextView(train_src, d.text_key)
        val: Sequence[str] = TextView(builder.as_data_source(split=d.tfds_eval_split), d.text_key)
        how = f"{d.tfds_train_split}/{d.tfds_eval_split}"
    else:
        n_val = math.ceil(n * d.validation_fraction) if n >= 2 else 0
        n_val = min(n_val, n - 1)
        train, val = TextView(train_src, d.text_key, 0, n - n_val), TextView(train_src, d.text_key, n - n_val, n)
        how = f"{d.tfds_train_split} minus its last {n_val} examples as validation"
    if n == 0:
        raise ConfigError(f"data.tfds_name: split {d.tfds_train_split!r} of {d.tfds_name!r} has no examples")
    key = "|".join([_FORMAT_VERSION, d.tfds_name, str(builder.data_dir), how, d.text_key, str(n), str(len(val))])
    fp = "tfds_" + hashlib.sha256(key.encode()).hexdigest()[:20]
    return Corpus(train=train, validation=val, fingerprint=fp,
                  description=f"tfds {d.tfds_name} ({how}) in {d.tfds_data_dir}")
