"""From the `data` config to `Source`s: named, weighted train/validation record sets.

One source comes from `data.path` / `data.tfds_name` (or the embedded corpus, the running
interpreter's standard library, when neither is set); a mixture from `data.sources`. A path is
text (a file, directory or glob of text / JSON-lines files, read as documents cut at natural boundaries) or a
directory written by `llmjax data prepare` (pre-tokenized array_record shards and their
tokenizer). Building a source lists files and opens shard indexes, nothing more; `probe` then
reads a few records so that an empty or undecodable source fails before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import cast

import numpy as np

from llmjax.config import Config, ConfigError, SourceConfig
from llmjax.config.rules.data_rules import check_weights
from llmjax.data.stream.files import (
    fingerprint_files,
    list_local_files,
    list_stdlib_files,
    num_documents,
    split_records,
)
from llmjax.data.stream.records import FileDocuments, Records, TfdsRecords, TokenShards
from llmjax.guards import inside
from llmjax.storage import is_url

PREPARED_META = "llmjax_prepared.json"
PREPARED_FORMAT = 1
_SAMPLE_SEED = "llmjax-tokenizer-sample-v1"
_PROBE_RECORDS = 8


@dataclasses.dataclass
class Source:
    """A named, weighted source: random-access train and validation records and their provenance."""

    name: str
    key: str  # the config key it came from, for messages ("data.path", "data.sources[1]")
    weight: float
    kind: str  # "text" (documents are strings) or "tokens" (pre-tokenized)
    train: Records
    validation: Records
    description: str
    fingerprint: str  # keys the trained tokenizer's cache
    tokenizer_dir: Path | None = None  # prepared sources: the tokenizer their tokens come from
    tokenizer_hash: str | None = None

    def sample_documents(self) -> Iterator[str]:
        """Training documents in an order fixed by a hash of the record index (spread over the corpus)."""
        n = len(self.train)
        order: Iterable[int]
        if n <= 200_000:
            order = sorted(range(n), key=lambda i: hashlib.sha1(f"{_SAMPLE_SEED}:{i}".encode()).digest())
        else:
            order = np.random.default_rng(0).permutation(n)
        for i in order:
            yield from cast(Sequence[str], self.train[int(i)])  # `kind` "text": documents are strings

    def max_tokens(self, split: str) -> int | None:
        """An upper bound on the tokens of a split (text: at most one per byte, plus BOS/EOS), if known."""
        records = self.train if split == "train" else self.validation
        if isinstance(records, TokenShards):
            return records.tokens + 2 * len(records)
        nbytes = getattr(records, "nbytes", None)
        return None if nbytes is None else int(nbytes) + 2 * len(records)


def source_configs(cfg: Config) -> list[tuple[str, SourceConfig]]:
    """(config key, SourceConfig) of every source: `data.sources`, else one from the top-level keys."""
    d = cfg.data
    if d.sources:
        if d.path or d.tfds_name:
            raise ConfigError("data.sources is set: move data.path / data.tfds_name into it (set one or the other)")
        return [(f"data.sources[{i}]", s) for i, s in enumerate(d.sources)]
    one = SourceConfig(path=d.path, tfds_name=d.tfds_name, tfds_data_dir=d.tfds_data_dir,
                       tfds_train_split=d.tfds_train_split, tfds_eval_split=d.tfds_eval_split, text_key=d.text_key)
    return [("data.path" if d.path else "data.tfds_name" if d.tfds_name else "data", one)]


def resolve_sources(cfg: Config) -> list[Source]:
    """Every source with a positive weight (weights normalised to sum 1). Raises ConfigError."""
    items = source_configs(cfg)
    check_weights(items)
    total = sum(s.weight for _, s in items)
    sources = [_resolve(cfg, key, s) for key, s in items if s.weight > 0]
    names: dict[str, int] = {}
    for src, (_, s) in zip(sources, [it for it in items if it[1].weight > 0], strict=True):
        src.weight = s.weight / total
        n = names.get(src.name, 0)
        names[src.name] = n + 1
        if n:
            src.name = f"{src.name}_{n}"
    return sources


def _resolve(cfg: Config, key: str, s: SourceConfig) -> Source:
    if s.path and s.tfds_name:
        raise ConfigError(f"{key}: set only one of path and tfds_name")
    if s.tfds_name:
        return _tfds_source(cfg, key, s)
    if s.path:
        path = Path(s.path).expanduser()
        if path.is_dir() and (path / PREPARED_META).is_file():
            return prepared_source(path, key, s.name)
        root, files = list_local_files(s.path, cfg.data.extensions, f"{key}.path" if key.endswith("]") else key)
        return _local_source(cfg, key, s, root, files, f"{s.path}")
    root, files = list_stdlib_files()
    return _local_source(cfg, key, s, root, files, f"embedded default corpus (Python stdlib {root})", name="stdlib")


# ----------------------------------------------------------------------------- local text


def _local_source(cfg: Config, key: str, s: SourceConfig, root: Path, files: list[Path], what: str,
                  name: str = "") -> Source:
    stats = []
    for p in files:
        try:
            st = p.stat()
        except OSError as e:
            raise ConfigError(f"{key}: cannot read {p}: {e}") from None
        stats.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    nonempty = [t for t in stats if t[1] > 0]
    if not nonempty:
        raise ConfigError(f"{key}: {what}: no documents (all {len(files)} files are empty)")
    rels = [t[0] for t in nonempty]
    sizes = np.array([t[1] for t in nonempty], np.int64)
    db, bb = cfg.data.document_bytes, cfg.data.block_bytes
    ndocs = np.array([num_documents(r, int(n), db) for r, n in zip(rels, sizes, strict=True)], np.int64)
    doc_file = np.repeat(np.arange(len(rels)), ndocs)
    within = np.arange(len(doc_file)) - np.repeat(np.cumsum(ndocs) - ndocs, ndocs)
    records = FileDocuments(root, rels, ndocs, sizes, np.stack([doc_file, within], 1), db, s.text_key, key)
    # the split is decided per file, or per block of data.block_bytes for larger files (never per document, so
    # that validation text has no neighbours in training); a hash of "file" or "file#block" for each
    nunits = np.where((sizes > bb) & (ndocs > 1), (ndocs - 1) * db // bb + 1, 1)
    first = np.cumsum(nunits) - nunits
    names = [f"{rels[f]}#{b}" if sizes[f] > bb and ndocs[f] > 1 else rels[f]
             for f in range(len(rels)) for b in range(int(nunits[f]))]
    _, unit_val = split_records(names, cfg.data.validation_fraction)
    is_val = np.zeros(len(names), bool)
    is_val[unit_val] = True
    unit_of = first[doc_file] + np.where(nunits[doc_file] > 1, within * db // bb, 0)
    train_idx, val_idx = np.flatnonzero(~is_val[unit_of]), np.flatnonzero(is_val[unit_of])
    fp = fingerprint_files(root, rels, sizes.tolist(), [t[2] for t in nonempty],
                           f"{cfg.data.validation_fraction}|{bb}|{db}|{s.text_key}")
    label = s.name or name or Path(s.path or root).name.split(".")[0] or "local"
    desc = (f"{what}: {len(rels)} files ({sizes.sum() / 1e6:.1f} MB), documents train {len(train_idx)} / "
            f"validation {len(val_idx)}")
    return Source(label, key, s.weight, "text", records.subset(train_idx), records.subset(val_idx), desc, "local_" + fp)


def probe(source: Source) -> None:
    """Read the first few training records: a source with no readable document fails here (ConfigError)."""
    records = source.train
    if len(records) == 0:
        raise ConfigError(f"{source.key}: {source.description}: no training records")
    n = min(len(records), _PROBE_RECORDS)
    if isinstance(records, FileDocuments):
        bad = []
        for i in range(n):  # each document read once
            try:
                path, text = records.read(i)
            except OSError as e:
                raise ConfigError(f"{source.key}: cannot read {records.root / records.rels[records.group(i)]}: "
                                  f"{e}") from None
            if text is None:
                bad.append(str(path))
                continue
            if records.documents(i, path, text):
                return
        if bad and len(bad) == n and n == len(records):
            raise ConfigError(f"{source.key}: no documents: all {n} files are undecodable (not UTF-8), e.g. {bad[0]}")
        if n == len(records):
            raise ConfigError(f"{source.key}: no documents in {source.description}")
        return  # a larger source whose first records are empty: reading goes on past them
    if not any(len(records[i]) for i in range(n)) and n == len(records):
        raise ConfigError(f"{source.key}: no documents in {source.description}")


# ----------------------------------------------------------------------------- prepared shards


def prepared_source(path: Path, key: str, name: str = "") -> Source:
    """A directory written by `llmjax data prepare`: its shards are checked against the metadata."""
    meta_path = path / PREPARED_META
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ConfigError(f"{key}: {meta_path} is unreadable ({e}); prepare the directory again") from None
    if meta.get("format") != PREPARED_FORMAT:
        raise ConfigError(f"{key}: {meta_path} has format {meta.get('format')!r}, this llmjax reads {PREPARED_FORMAT}")
    splits: dict[str, TokenShards] = {}
    for split in ("train", "validation"):
        shards = meta["splits"].get(split, [])
        paths = [path / sh["file"] if is_url(path) else inside(path, sh["file"], f"{meta_path}: file") for sh in shards]
        for p, sh in zip(paths, shards, strict=True):
            check_shard(p, sh["documents"], key)
        splits[split] = TokenShards(paths, [sh["documents"] for sh in shards], meta["dtype"], key,
                                    sum(sh["tokens"] for sh in shards))
    if len(splits["train"]) == 0:
        raise ConfigError(f"{key}: {path} holds no training documents")
    tok_dir = path / "tokenizer"
    desc = (f"prepared {path}: {meta['source']}; documents train {len(splits['train'])} / validation "
            f"{len(splits['validation'])}, tokens train {splits['train'].tokens}")
    return Source(name or path.name, key, 1.0, "tokens", splits["train"], splits["validation"], desc,
                  "prepared_" + meta["tokenizer_hash"], tok_dir, meta["tokenizer_hash"])


def check_shard(path: Path, documents: int, key: str) -> None:
    """ConfigError when a shard is missing, unreadable, or holds another number of records than recorded."""
    from array_record.python.array_record_module import ArrayRecordReader

    if not path.is_file():
        raise ConfigError(f"{key}: shard {path} is missing")
    try:
        n = ArrayRecordReader(str(path), "readahead_buffer_size:0").num_records()
    except Exception as e:  # array_record raises RuntimeError / ValueError
        raise ConfigError(f"{key}: shard {path} is corrupt or not an array_record file ({e})") from None
    if n != documents:
        raise ConfigError(f"{key}: shard {path} holds {n} records where {PREPARED_META} records {documents}: it is "
                          "truncated or was replaced; prepare the directory again")


# ----------------------------------------------------------------------------- TFDS


def _tfds_source(cfg: Config, key: str, s: SourceConfig) -> Source:
    """A dataset the user prepared with TFDS (array_record). Raises ConfigError."""
    import tensorflow_datasets as tfds

    assert s.tfds_name is not None  # `_resolve` comes here only when it is set

    k = key if key.endswith("]") else "data"
    if not s.tfds_data_dir:
        raise ConfigError(f"{k}.tfds_data_dir must be set to the directory where {s.tfds_name!r} was prepared")
    data_dir = Path(s.tfds_data_dir).expanduser()
    if not data_dir.is_dir():
        raise ConfigError(f"{k}.tfds_data_dir: {data_dir} does not exist")
    try:
        builder = tfds.builder(s.tfds_name, data_dir=str(data_dir), try_gcs=False)
    except Exception as e:  # tfds raises several types (DatasetNotFoundError, FileNotFoundError, ...)
        raise ConfigError(f"{k}.tfds_name: cannot find dataset {s.tfds_name!r} in {data_dir}: {e}") from None
    if not builder.is_prepared():
        raise ConfigError(f"{k}.tfds_name: dataset {s.tfds_name!r} is not prepared in {k}.tfds_data_dir={data_dir}")
    splits, features = builder.info.splits, builder.info.features
    if s.tfds_train_split not in splits:
        raise ConfigError(f"{k}.tfds_train_split: {s.tfds_name!r} has no split {s.tfds_train_split!r} "
                          f"(available: {sorted(splits)})")
    if s.text_key not in features:
        raise ConfigError(f"{k}.text_key: {s.tfds_name!r} has no feature {s.text_key!r} (features: {sorted(features)})")
    fmt = str(getattr(builder.info, "file_format", "") or "")
    if "array_record" not in fmt.lower():
        raise ConfigError(f"{k}.tfds_name: {s.tfds_name!r} in {data_dir} is stored as {fmt or 'unknown'}; it must be "
                          "prepared with file_format=array_record")
    ddir = str(builder.data_dir)
    n = splits[s.tfds_train_split].num_examples
    if n == 0:
        raise ConfigError(f"{k}.tfds_name: split {s.tfds_train_split!r} of {s.tfds_name!r} has no examples")
    if s.tfds_eval_split in splits:
        train = TfdsRecords(s.tfds_name, str(data_dir), s.tfds_train_split, s.text_key, 0, n, key)
        m = splits[s.tfds_eval_split].num_examples
        val = TfdsRecords(s.tfds_name, str(data_dir), s.tfds_eval_split, s.text_key, 0, m, key)
        how = f"{s.tfds_train_split}/{s.tfds_eval_split}"
    else:
        n_val = min(math.ceil(n * cfg.data.validation_fraction) if n >= 2 else 0, n - 1)
        train = TfdsRecords(s.tfds_name, str(data_dir), s.tfds_train_split, s.text_key, 0, n - n_val, key)
        val = TfdsRecords(s.tfds_name, str(data_dir), s.tfds_train_split, s.text_key, n - n_val, n, key)
        how = f"{s.tfds_train_split} minus its last {n_val} examples as validation"
    fp_src = "|".join(["v2", s.tfds_name, ddir, how, s.text_key, str(len(train)), str(len(val))])
    fp = "tfds_" + hashlib.sha256(fp_src.encode()).hexdigest()[:20]
    desc = f"tfds {s.tfds_name} ({how}) in {data_dir}: records train {len(train)} / validation {len(val)}"
    return Source(s.name or s.tfds_name.split("/")[0], key, s.weight, "text", train, val, desc, fp)
