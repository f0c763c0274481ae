"""Random-access record sources that grain reads lazily: documents of local files, TFDS splits, token shards.

Each is a picklable sequence (`len`, `[i]`) whose item is a list of documents: strings for text
sources, int32 token arrays for prepared shards. Nothing is read when a source is built except
listings and shard indexes; a record is read when the pipeline asks for it, usually in a worker
process. Read errors raise `DataError` naming the file. `Records` is the interface a source's splits
satisfy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from llmjax.data.stream.files import cut_documents, file_format, read_document
from llmjax.errors import DataError

log = logging.getLogger(__name__)

# A document: text (text sources) or int32 token ids (prepared shards).
Document = str | npt.NDArray[np.int32]
Indices = npt.NDArray[np.int64]


class Records(Protocol):
    """A split of a source: a picklable random-access sequence whose item i is record i's documents.

    `kind`: "text" or "tokens"; `key`: the config key the source came from (for messages); `nbytes`: the
    bytes it reads, when known; `name(i)`: a short name of record i; `subset(indices)`: the records at those
    indices, as records."""

    @property
    def kind(self) -> str: ...

    @property
    def key(self) -> str: ...

    @property
    def nbytes(self) -> int | None: ...

    def __len__(self) -> int: ...

    def __getitem__(self, i: int, /) -> Sequence[Document]: ...

    def name(self, i: int) -> str: ...

    def subset(self, indices: Indices) -> Records: ...


class FileDocuments(Sequence[list[str]]):
    """Documents of local text / JSON-lines files (`files.py`); record i is `docs[i]` = (file index, document
    index in the file). A text record holds one document (a gzip file: all of its documents); a JSON-lines
    record holds the lines of about `document_bytes` bytes."""

    kind = "text"

    def __init__(self, root: Path, rels: Sequence[str], ndocs: npt.ArrayLike, sizes: npt.ArrayLike,
                 docs: npt.ArrayLike, document_bytes: int, text_key: str, key: str):
        self.root, self.rels = Path(root), list(rels)
        self.ndocs, self.sizes = np.asarray(ndocs, np.int64), np.asarray(sizes, np.int64)
        self.docs = np.asarray(docs, np.int64).reshape(-1, 2)
        self.document_bytes, self.text_key, self.key = document_bytes, text_key, key
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.docs)

    @property
    def nbytes(self) -> int:
        """Bytes of the selected documents (a file's size split evenly over its documents)."""
        f = self.docs[:, 0]
        return int(np.sum(self.sizes[f] / np.maximum(self.ndocs[f], 1)))

    def name(self, i: int) -> str:
        f, j = self.docs[i]
        return self.rels[f] if self.ndocs[f] == 1 else f"{self.rels[f]}#{j}"

    def group(self, i: int) -> int:
        """The file record i comes from (the mixing measures count rows from the same file)."""
        return int(self.docs[int(i)][0])

    def subset(self, indices: Indices) -> FileDocuments:
        return FileDocuments(self.root, self.rels, self.ndocs, self.sizes, self.docs[indices], self.document_bytes,
                             self.text_key, self.key)

    def read(self, i: int) -> tuple[Path, str | None]:
        """(file, text of record i), text None when it is not valid UTF-8. OSError when unreadable."""
        f, j = (int(x) for x in self.docs[int(i)])
        path = self.root / self.rels[f]
        data = read_document(path, j, int(self.ndocs[f]), self.document_bytes, file_format(path.name) == "jsonl")
        try:
            return path, data.decode("utf-8")
        except UnicodeDecodeError:
            return path, None

    def documents(self, i: int, path: Path, text: str) -> list[str]:
        """The documents of record i from its `text` (`read`): the document itself (a gzip file: its documents
        cut in memory), or its JSON lines' texts."""
        if file_format(path.name) == "text":
            if path.name.endswith(".gz") and len(text) > self.document_bytes:
                return [d.decode("utf-8") for d in cut_documents(text.encode("utf-8"), self.document_bytes) if d]
            return [text] if text else []
        return _json_lines(text, self.text_key, path, int(self.docs[int(i)][1]))

    def __getitem__(self, i: int) -> list[str]:  # type: ignore[override]
        try:
            path, text = self.read(i)
        except OSError as e:
            path = self.root / self.rels[int(self.docs[int(i)][0])]
            raise DataError(f"{self.key}: cannot read {path} (it disappeared or is unreadable: {e})") from None
        if text is None:
            f = int(self.docs[int(i)][0])
            if f not in self._warned:
                self._warned.add(f)
                log.warning("data: skipping %s: not valid UTF-8", path)
            return []
        return self.documents(i, path, text)


def _json_lines(text: str, key: str, path: Path, block: int) -> list[str]:
    docs = []
    for n, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except RecursionError:
            raise DataError(f"{path}: line {n + 1} of block {block} is nested too deeply to read as JSON") from None
        except ValueError as e:
            raise DataError(f"{path}: line {n + 1} of document {block} is not valid JSON ({e}); the file is corrupt "
                            "or truncated") from None
        value = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(value, str):
            raise DataError(f"{path}: line {n + 1} of document {block} has no string field {key!r} (data.text_key)")
        if value:
            docs.append(value)
    return docs


class TfdsRecords(Sequence[list[str]]):
    """Records [start, stop) of a TFDS split read with `tfds.data_source` (array_record, no TensorFlow)."""

    kind = "text"

    def __init__(self, name: str, data_dir: str, split: str, text_key: str, start: int, stop: int, key: str):
        self.name_, self.data_dir, self.split, self.text_key = name, data_dir, split, text_key
        self.start, self.stop, self.key = start, stop, key
        self._source: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_source": None}

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    nbytes = None

    def name(self, i: int) -> str:
        return f"{self.split}[{self.start + i}]"

    def subset(self, indices: Indices) -> Records:
        return _Subset(self, indices)

    def __getitem__(self, i: int) -> list[str]:  # type: ignore[override]
        import tensorflow_datasets as tfds

        try:
            if self._source is None:
                self._source = tfds.data_source(self.name_, split=self.split, data_dir=self.data_dir, download=False,
                                                try_gcs=False)
            value = self._source[self.start + int(i)][self.text_key]
        except Exception as e:  # tfds/array_record raise several types
            raise DataError(f"{self.key}: cannot read record {self.start + int(i)} of {self.name_}/{self.split} in "
                            f"{self.data_dir}: {type(e).__name__}: {e}") from None
        text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
        return [text] if text else []


class _Subset(Sequence[Sequence[Document]]):
    def __init__(self, parent: Records, indices: Indices):
        self.parent, self.indices = parent, np.asarray(indices, np.int64)
        self.kind, self.key = parent.kind, parent.key

    nbytes = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Sequence[Document]:  # type: ignore[override]
        return self.parent[int(self.indices[int(i)])]

    def name(self, i: int) -> str:
        return self.parent.name(int(self.indices[int(i)]))

    def subset(self, indices: Indices) -> Records:
        return _Subset(self.parent, self.indices[indices])


class TokenShards(Sequence[list[npt.NDArray[np.int32]]]):
    """Documents of pre-tokenized array_record shards (`llmjax data prepare`); record = one document."""

    kind = "tokens"

    def __init__(self, paths: Sequence[Path], counts: Sequence[int], dtype: str, key: str, tokens: int):
        self.paths = [Path(p) for p in paths]
        self.counts = np.asarray(counts, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        self.dtype, self.key, self.tokens = dtype, key, tokens
        self._readers: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_readers": {}}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    nbytes = None

    def name(self, i: int) -> str:
        return str(i)

    def subset(self, indices: Indices) -> Records:
        return _Subset(self, indices)

    def _reader(self, shard: int) -> Any:
        from array_record.python.array_record_module import ArrayRecordReader

        if shard not in self._readers:
            self._readers[shard] = ArrayRecordReader(str(self.paths[shard]), "readahead_buffer_size:0")
        return self._readers[shard]

    def __getitem__(self, i: int) -> list[npt.NDArray[np.int32]]:  # type: ignore[override]
        i = int(i)
        shard = int(np.searchsorted(self.offsets, i, side="right")) - 1
        path = self.paths[shard]
        try:
            (blob,) = self._reader(shard).read([i - int(self.offsets[shard])])
        except Exception as e:  # array_record raises RuntimeError/ValueError/OSError
            raise DataError(f"{self.key}: shard {path} is corrupt or unreadable ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
        return [np.frombuffer(blob, dtype=self.dtype).astype(np.int32)]


def iter_records(records: Records, order: Sequence[int]) -> Iterator[Sequence[Document]]:
    """Records in the given order (lazily)."""
    for i in order:
        yield records[int(i)]
