"""Hugging Face `tokenizers` (a `tokenizer.json`, as Llama-3, Qwen2.5, SmolLM and most open models ship).

BOS/EOS/pad come from `tokenizer_config.json`, else `special_tokens_map.json` next to the file,
else well-known special token names. `add_bos` follows `add_bos_token` in the config, else what
the tokenizer's own post-processor does. The config (special tokens, `chat_template`) stays
available as `HFTokenizer.config`. A model directory's `chat_template.jinja` (the chat template,
`llmjax.data.tokenizers.chat_template`) and `generation_config.json` (the model's end-of-turn ids: `stop_ids`) travel
with the tokenizer's files, so a run's tokenizer copy keeps them.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from llmjax.config import ConfigError
from llmjax.data.tokenizers.tokenizer import Tokenizer
from llmjax.guards import inside

CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
COMPANION_FILES = ("generation_config.json",)  # the model's end-of-turn ids (`stop_ids`), kept with the tokenizer
_GUESSES = {
    "eos": ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]", "<|im_end|>"),
    "bos": ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]"),
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>"),
}
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte -> printable character table, inverted: character -> byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def _read_json(path: Path | None, key: str) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise ConfigError(f"{key}: cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


def _content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _decoder_types(node: Any) -> set[str]:
    if isinstance(node, dict):
        out = {node.get("type", "")}
        for child in node.get("decoders") or ():
            out |= _decoder_types(child)
        return out
    return set()


class HFTokenizer(Tokenizer):
    """A `tokenizer.json` read with the `tokenizers` library."""

    kind = "huggingface"

    def __init__(self, path: str | Path, key: str = "data.tokenizer"):
        from tokenizers import Tokenizer as HFTokenizerImpl

        path = Path(path)
        self._key = key
        try:
            self._tok = HFTokenizerImpl.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception for malformed files
            raise ConfigError(f"{key}: {path} is JSON but not a Hugging Face tokenizer.json ({e})") from None
        self._spec = json.loads(path.read_text(encoding="utf-8"))
        self.files = {"tokenizer.json": path}
        for name in CONFIG_FILES + COMPANION_FILES:  # companions: inside the directory (`llmjax.guards.inside`)
            if (path.parent / name).is_file():
                self.files[name] = inside(path.parent, name, key)
        self.config = _read_json(self.files.get("tokenizer_config.json"), key)
        self.special_tokens_map = _read_json(self.files.get("special_tokens_map.json"), key)
        added = self._tok.get_added_tokens_decoder()
        self._special_ids = {i for i, t in added.items() if t.special}
        self.vocab_size = max([self._tok.get_vocab_size(with_added_tokens=True), *(i + 1 for i in added)])
        self.bos_id = self._special("bos")
        self.eos_id = self._special("eos")
        self.pad_id = self._special("pad")
        configured = self.config.get("add_bos_token")
        if isinstance(configured, bool):
            self.add_bos = configured
        else:
            ids = self._tok.encode("a", add_special_tokens=True).ids
            self.add_bos = self.bos_id is not None and bool(ids) and ids[0] == self.bos_id

    @property
    def chat_template(self) -> str | None:
        """The `chat_template` of tokenizer_config.json, if any."""
        value = self.config.get("chat_template")
        return value if isinstance(value, str) else None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a model's turn: EOS and generation_config.json's `eos_token_id` (an id or a list)."""
        ids = [] if self.eos_id is None else [self.eos_id]
        path = self.files.get("generation_config.json")
        if path is not None:
            value = _read_json(Path(path), self._key).get("eos_token_id")
            for i in value if isinstance(value, list) else [value]:
                if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size and i not in ids:
                    ids.append(i)
        return tuple(ids)

    def _special(self, which: str) -> int | None:
        names = [_content(self.config.get(f"{which}_token")), _content(self.special_tokens_map.get(f"{which}_token"))]
        for name in names:
            if name is not None:
                i = self._tok.token_to_id(name)
                if i is None:
                    raise ConfigError(f"{self._key}: {which}_token {name!r} of {self.files['tokenizer.json'].parent} "
                                      "is not in the vocabulary of its tokenizer.json")
                return int(i)
        for name in _GUESSES[which]:
            i = self._tok.token_to_id(name)
            if i is not None and (i in self._special_ids or not self._special_ids):
                return int(i)
        return None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.files["tokenizer.json"]), "key": self._key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        type(self).__init__(self, state["path"], state["key"])

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """One text (special tokens in it are matched, no BOS/EOS added) -> (ids, [(start, end)] character
        offsets of each token in `text`), for masks over parts of a rendered chat
        (`llmjax.data.tokenizers.chat_template`)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [(start, end) for start, end in enc.offsets]

    def decode(self, ids: Sequence[int] | Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self) -> npt.NDArray[np.int64]:
        """Byte-level BPE: one byte per alphabet character; SentencePiece-style: U+2581 is a space,
        `<0xHH>` one byte; WordPiece: the `##` continuation prefix does not count; specials 0."""
        byte_level = "ByteLevel" in _decoder_types(self._spec.get("decoder"))
        alphabet = _byte_level_alphabet()
        prefix = (self._spec.get("model") or {}).get("continuing_subword_prefix") or ""
        byte_fallback = bool((self._spec.get("model") or {}).get("byte_fallback"))
        out = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if piece is None or i in self._special_ids:
                continue
            if byte_level:
                out[i] = sum(1 if c in alphabet else len(c.encode("utf-8")) for c in piece)
            elif byte_fallback and _BYTE_PIECE.match(piece):
                out[i] = 1
            else:
                if prefix and piece.startswith(prefix):
                    piece = piece[len(prefix):]
                out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
        return out
