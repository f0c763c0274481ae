"""SentencePiece tokenizer: loading a user model, or training one (cached) on the training documents.

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

import sentencepiece as spm

from llmjax.config import Config, ConfigError
from llmjax.data.sources import atomic_write_bytes, file_lock, resolve_cache_dir

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# SentencePiece drops training "sentences" longer than this (bytes); documents are cut into chunks below it.
_MAX_SENTENCE_BYTES = 8192
_CHUNK_CHARS = 2048
_SAMPLE_SEED = "llmjax-tokenizer-sample-v1"


class Tokenizer:
    """A loaded SentencePiece model with batch encoding."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size: int = self._sp.get_piece_size()
        self.eos_id: int = self._sp.eos_id()
        self.bos_id: int = self._sp.bos_id()
        self.pad_id: int = self._sp.pad_id()
        if self.eos_id < 0:
            raise ConfigError(f"data.tokenizer: the sentencepiece model {self.path} defines no EOS id (eos_id)")

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Batch-encode `texts` (no BOS/EOS added) -> one list of ids per text."""
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: Sequence[int] | Iterable[int]) -> str:
        """Ids -> text. Special ids (pad/bos/eos) decode to the empty string."""
        return self._sp.decode([int(i) for i in ids])

    def file_hash(self) -> str:
        """sha256 of the model file (keys the token caches)."""
        return hashlib.sha256(Path(self.path).read_bytes()).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _load_user_tokenizer(cfg: Config) -> Tokenizer:
    path = Path(cfg.data.tokenizer).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.tokenizer: file not found: {path}")
    try:
        tok = Tokenizer(path)
    except (RuntimeError, OSError) as e:
        raise ConfigError(f"data.tokenizer: {path} is not a sentencepiece model ({e})") from None
    if tok.vocab_size > trained_vocab_size(cfg):
        reserved, vocab = cfg.model.reserved_ids, cfg.model.vocab_size
        msg = f"data.tokenizer: {path} has vocab size {tok.vocab_size}, larger than model.vocab_size={vocab}"
        if reserved:
            msg += f" minus the {reserved} ids model.family={cfg.model.family} reserves"
        raise ConfigError(f"{msg}; raise model.vocab_size to at least {tok.vocab_size + reserved}")
    return tok


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


def sample_training_text(docs: Sequence[str], max_bytes: int) -> list[str]:
    """A deterministic sample of at most `max_bytes` (UTF-8) of `docs`, cut into training sentences.

    Documents are visited in an order fixed by a hash of their index, so the sample spreads over
    the corpus instead of taking its first files.
    """
    order = sorted(range(len(docs)), key=lambda i: hashlib.sha1(f"{_SAMPLE_SEED}:{i}".encode()).digest())
    out: list[str] = []
    total = 0
    for i in order:
        for chunk in _chunks(docs[i]):
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


def load_or_train_tokenizer(cfg: Config, corpus) -> Tokenizer:
    """Load `cfg.data.tokenizer`, or train (once, cached) a model on `corpus`.

    `corpus` is a `llmjax.data.sources.Corpus` (needs `.fingerprint` and `.train_texts()`).
    Raises ConfigError for a missing/invalid model or one whose vocab exceeds model.vocab_size.
    """
    if cfg.data.tokenizer:
        return _load_user_tokenizer(cfg)
    d = cfg.data
    vocab = trained_vocab_size(cfg)
    key_src = f"{corpus.fingerprint}|{vocab}|{d.tokenizer_type}|{d.tokenizer_train_bytes}|v1"
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = resolve_cache_dir(cfg) / "tokenizers" / f"sp_{d.tokenizer_type}_{vocab}_{key}.model"
    with file_lock(path):
        if not path.exists():
            t0 = time.perf_counter()
            sentences = sample_training_text(corpus.train_texts(), d.tokenizer_train_bytes)
            if not sentences:
                raise ConfigError(f"data: no training text to train a tokenizer on ({corpus.description})")
            try:
                blob = train_sentencepiece(sentences, vocab, d.tokenizer_type)
            except RuntimeError as e:
                raise ConfigError(
                    f"model.vocab_size={cfg.model.vocab_size}: cannot train a {d.tokenizer_type} tokenizer of {vocab} "
                    f"pieces ({e})") from None
            atomic_write_bytes(path, blob)
            log.info("trained %s tokenizer (vocab %d) in %.1fs -> %s", d.tokenizer_type, vocab,
                     time.perf_counter() - t0, path)
    tok = Tokenizer(path)
    if tok.vocab_size > vocab:  # cannot happen with hard_vocab_limit=False, kept as a guard
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} < trained tokenizer vocab {tok.vocab_size}")
    return tok


def trained_vocab_size(cfg: Config) -> int:
    """Pieces of a tokenizer trained for `cfg`: model.vocab_size minus the ids the model family reserves at
    the top of the vocabulary (the encoder's mask id, the encoder-decoder's sentinels and start id)."""
    return cfg.model.vocab_size - cfg.model.reserved_ids
