"""The tokenizer interface shared by SentencePiece and Hugging Face `tokenizers`, and how a run gets one.

`data.tokenizer` names a SentencePiece `.model`, a Hugging Face `tokenizer.json` or a directory
holding either (`tokenizer.json` wins; `tokenizer_config.json` / `special_tokens_map.json` next to
it give BOS/EOS/pad). Unset, a SentencePiece model is trained on the corpus (cached), with the
vocabulary size given by `trained_vocab_size`; a source prepared by `llmjax data prepare` brings
its own tokenizer.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import numpy.typing as npt

from llmjax.config import Config, ConfigError
from llmjax.guards import inside

if TYPE_CHECKING:
    from llmjax.data.stream.sources import Source


class Tokenizer(abc.ABC):
    """Batch encoding/decoding plus the special ids and files that define the tokenizer.

    Attributes: `kind` ("sentencepiece" or "huggingface"), `vocab_size` (ids are < it), `eos_id`,
    `bos_id`, `pad_id` (None when the tokenizer has none), `add_bos` (its own convention for
    starting a document with BOS) and `files` ({name: path} of the files to copy with a run).
    Picklable (it reloads from its files), so grain worker processes can use it.
    """

    kind: str
    vocab_size: int
    eos_id: int | None
    bos_id: int | None
    pad_id: int | None
    add_bos: bool
    files: dict[str, Path]

    @abc.abstractmethod
    def encode(self, texts: list[str]) -> list[list[int]]:
        """Batch-encode `texts` without adding BOS/EOS -> one list of ids per text."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | Iterable[int]) -> str:
        """Ids -> text; special tokens (pad/bos/eos) decode to the empty string."""

    @abc.abstractmethod
    def token_bytes(self) -> npt.NDArray[np.int64]:
        """int64 [vocab_size]: the UTF-8 bytes each id stands for (special ids 0), for bits per byte."""

    def model_token_bytes(self, model_vocab: int) -> npt.NDArray[np.int64]:
        """`token_bytes` over a model's `model_vocab` ids: ids the tokenizer does not have (a family's
        reserved mask / sentinel ids, padding rows of the embedding) stand for 0 bytes."""
        out = np.zeros(model_vocab, np.int64)
        known = self.token_bytes()[:model_vocab]
        out[: len(known)] = known
        return out

    @property
    def path(self) -> str:
        """The main file (tokenizer.model or tokenizer.json)."""
        return str(next(iter(self.files.values())))

    def file_hash(self) -> str:
        """sha256 (first 16 hex digits) over the defining files, by name: keys caches and workdir copies."""
        h = hashlib.sha256()
        for name in sorted(self.files):
            h.update(name.encode() + b"\0" + Path(self.files[name]).read_bytes() + b"\0")
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


def document_start(tokenizer: Tokenizer, add_bos: bool | None) -> list[int]:
    """[BOS] when documents start with it (`add_bos`: `data.add_bos`; None: the tokenizer's own convention,
    e.g. Llama's and Mistral's add it, Qwen's does not), else []. Prompts and scored texts start with it, as
    the documents the model was trained on did."""
    add = add_bos if add_bos is not None else tokenizer.add_bos
    return [tokenizer.bos_id] if add and tokenizer.bos_id is not None else []


def trained_vocab_size(cfg: Config) -> int:
    """Vocabulary size of the tokenizer llmjax trains when `data.tokenizer` is unset.

    The one place it is decided: a model family that reserves ids at the top of the vocabulary
    (the encoder's mask id, the encoder-decoder's sentinels and start id) makes this
    `model.vocab_size` minus those.
    """
    return cfg.model.vocab_size - cfg.model.reserved_ids


def _looks_like_json(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    return head.startswith(b"{")


def load_tokenizer(path: str | Path, key: str = "data.tokenizer") -> Tokenizer:
    """A SentencePiece model, a tokenizer.json, or a directory holding one -> Tokenizer.

    The kind is read from the content, not the name. Raises ConfigError naming `key` and the file. The files
    found in a directory (and the companions next to a tokenizer.json) must be inside it, not links elsewhere.
    """
    from llmjax.data.tokenizers.hf_tokenizer import HFTokenizer
    from llmjax.data.tokenizers.sp_tokenizer import SentencePieceTokenizer

    p = Path(path).expanduser()
    if p.is_dir():  # the file in it must be inside it (`llmjax.guards.inside`: not a link elsewhere)
        if (p / "tokenizer.json").is_file():
            p = inside(p, "tokenizer.json", key)
        elif (p / "tokenizer.model").is_file():
            p = inside(p, "tokenizer.model", key)
        else:
            raise ConfigError(f"{key}: directory {p} holds neither a tokenizer.json nor a tokenizer.model")
    if not p.is_file():
        raise ConfigError(f"{key}: file not found: {p}")
    try:
        is_json = _looks_like_json(p)
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {p}: {e}") from None
    if is_json:
        return HFTokenizer(p, key)
    return SentencePieceTokenizer(p, key)


def check_vocab(tok: Tokenizer, cfg: Config, key: str = "data.tokenizer") -> None:
    """ConfigError when the tokenizer has more ids than the model's embedding rows less the ids the model
    family reserves."""
    if tok.vocab_size > trained_vocab_size(cfg):
        reserved, vocab = cfg.model.reserved_ids, cfg.model.vocab_size
        msg = f"{key}: {tok.path} has vocab size {tok.vocab_size}, larger than model.vocab_size={vocab}"
        if reserved:
            msg += f" minus the {reserved} ids model.family={cfg.model.family} reserves"
        raise ConfigError(f"{msg}; raise model.vocab_size to at least {tok.vocab_size + reserved}")
    if tok.eos_id is None:
        raise ConfigError(f"{key}: {tok.path} defines no EOS token (documents are separated by EOS); use a "
                          "tokenizer with one, or give its tokenizer_config.json an eos_token")


def resolve_tokenizer(cfg: Config, sources: Sequence[Source]) -> Tokenizer:
    """The run's tokenizer: `data.tokenizer`, else a prepared source's own, else one trained (cached).

    `sources` are `llmjax.data.stream.sources.Source`s (the trained tokenizer samples their training text).
    """
    if cfg.data.tokenizer:
        tok = load_tokenizer(cfg.data.tokenizer)
    else:
        prepared = [s for s in sources if s.tokenizer_dir is not None]
        if prepared:
            tok_dir = cast(Path, prepared[0].tokenizer_dir)  # not None: `prepared` are those that have one
            tok = load_tokenizer(tok_dir, f"{prepared[0].key} (its prepared tokenizer)")
        else:
            from llmjax.data.tokenizers.sp_tokenizer import train_cached

            tok = train_cached(cfg, sources, trained_vocab_size(cfg))
    check_vocab(tok, cfg)
    return tok
