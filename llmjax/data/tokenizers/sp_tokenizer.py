"""SentencePiece: loading a model, and training one (cached) on a sample of the training text.

Trained models round-trip code and whitespace exactly (identity normalisation, byte fallback,
no dummy prefix) and reserve fixed special ids: pad=0, unk=1, bos=2, eos=3.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import sentencepiece as spm

from llmjax.config import Config, ConfigError
from llmjax.data.stream.files import atomic_write_bytes, file_lock, resolve_cache_dir
from llmjax.data.tokenizers.tokenizer import Tokenizer

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# SentencePiece drops training "sentences" longer than this (bytes); documents are cut into chunks below it.
_MAX_SENTENCE_BYTES = 8192
_CHUNK_CHARS = 2048


def _optional(i: int) -> int | None:
    return None if i < 0 else int(i)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model file (`.model`)."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path, key: str = "data.tokenizer"):
        path = Path(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise ConfigError(f"{key}: {path} is not a SentencePiece model nor a Hugging Face tokenizer.json "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        self.files = {"tokenizer.model": path}
        self._key = key
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = _optional(self._sp.eos_id())
        self.bos_id = _optional(self._sp.bos_id())
        self.pad_id = _optional(self._sp.pad_id())
        self.add_bos = False

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.files["tokenizer.model"]), "key": self._key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        type(self).__init__(self, state["path"], state["key"])

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int] | Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_bytes(self) -> npt.NDArray[np.int64]:
        """Byte-fallback pieces 1, control/unknown/unused 0, others the UTF-8 length (U+2581 is a space)."""
        sp = self._sp
        out = np.zeros(sp.get_piece_size(), np.int64)
        for i in range(len(out)):
            if sp.is_byte(i):
                out[i] = 1
            elif not (sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)):
                out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out


# ----------------------------------------------------------------------------- training


def _chunks(text: str) -> Iterator[str]:
    """Cut a document into training sentences of about _CHUNK_CHARS characters, on line boundaries."""
    buf: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        while len(line) > _CHUNK_CHARS:  # very long lines: hard cut
            if buf:
                yield "".join(buf)
                buf, size = [], 0
            yield line[:_CHUNK_CHARS]
            line = line[_CHUNK_CHARS:]
        if size + len(line) > _CHUNK_CHARS and buf:
            yield "".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += len(line)
    if buf:
        yield "".join(buf)


def training_sentences(docs: Iterable[str], max_bytes: int) -> list[str]:
    """Cut `docs` (in the given order) into training sentences, at most `max_bytes` of UTF-8 in all."""
    out: list[str] = []
    total = 0
    for doc in docs:
        for chunk in _chunks(doc):
            n = len(chunk.encode("utf-8"))
            if n > _MAX_SENTENCE_BYTES or not chunk:
                continue
            if total + n > max_bytes:
                return out
            out.append(chunk)
            total += n
    return out


def train_sentencepiece(sentences: list[str], vocab_size: int, model_type: str) -> bytes:
    """Train a SentencePiece model on `sentences`; return the serialized model bytes."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # small corpora: vocab_size is an upper bound
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        split_by_whitespace=True,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        max_sentencepiece_length=16,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        user_defined_symbols=["\n", "\t"],
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=2,
        seed_sentencepiece_size=1_000_000,
        minloglevel=2,
    )
    return model.getvalue()


def _sample_sentences(sources: Sequence[Any], max_bytes: int) -> list[str]:
    """Training sentences from every source, each source's byte budget in proportion to its weight."""
    total = sum(s.weight for s in sources)
    out: list[str] = []
    for s in sources:
        budget = int(max_bytes * s.weight / total)
        out += training_sentences(s.sample_documents(), budget)
    return out


def train_cached(cfg: Config, sources: Sequence[Any], vocab_size: int) -> SentencePieceTokenizer:
    """Train (once per corpus and settings, under a lock) a SentencePiece model on the sources' text.

    `sources` need `.fingerprint`, `.weight`, `.kind` and `.sample_documents()` (an iterator of
    training documents in a fixed order spread over the corpus). Raises ConfigError.
    """
    d = cfg.data
    if any(s.kind != "text" for s in sources):
        raise ConfigError("data.tokenizer: set it to the tokenizer of the pre-tokenized sources")
    parts = [f"{s.fingerprint}:{s.weight}" for s in sources]
    key_src = f"{'|'.join(parts)}|{vocab_size}|{d.tokenizer_type}|{d.tokenizer_train_bytes}|v2"
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = resolve_cache_dir(cfg) / "tokenizers" / f"sp_{d.tokenizer_type}_{vocab_size}_{key}.model"
    with file_lock(path):
        if not path.exists():
            t0 = time.perf_counter()
            sentences = _sample_sentences(sources, d.tokenizer_train_bytes)
            if not sentences:
                what = ", ".join(s.description for s in sources)
                raise ConfigError(f"data: no text to train a tokenizer on ({what})")
            try:
                blob = train_sentencepiece(sentences, vocab_size, d.tokenizer_type)
            except RuntimeError as e:
                raise ConfigError(f"model.vocab_size={vocab_size}: cannot train a {d.tokenizer_type} tokenizer "
                                  f"({e})") from None
            atomic_write_bytes(path, blob)
            log.info("trained %s tokenizer (vocab %d) on %d sentences in %.1fs -> %s", d.tokenizer_type, vocab_size,
                     len(sentences), time.perf_counter() - t0, path)
    tok = SentencePieceTokenizer(path)
    if tok.vocab_size > vocab_size:  # cannot happen with hard_vocab_limit=False, kept as a guard
        raise ConfigError(f"model.vocab_size={vocab_size} < trained tokenizer vocab {tok.vocab_size}")
    return tok
