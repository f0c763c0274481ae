"""Decoding model output to text when the model's vocabulary is larger than the tokenizer's.

A model may emit ids the tokenizer does not know: the ids a family reserves at the top of the
vocabulary (the encoder's mask, the encoder-decoder's sentinels and start id), or padding ids of a
model whose vocabulary was rounded up. `ModelVocabulary` decodes runs of ordinary ids with the
tokenizer and renders every other id by its name (`<extra_id_0>`, ...) or as `<id N>`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any


class ModelVocabulary:
    """A tokenizer seen through the model's vocabulary: encode as the tokenizer does; decode any model id."""

    def __init__(self, tokenizer: Any, names: dict[int, str] | None = None):
        self.tokenizer = tokenizer
        self.names = names or {}
        self.eos_id = tokenizer.eos_id

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Encode with the tokenizer; a reserved id's name in the text (e.g. `<extra_id_0>`) becomes that id."""
        if not self.names:
            return self.tokenizer.encode(texts)
        ids_of = {name: i for i, name in self.names.items()}
        pattern = re.compile("(" + "|".join(re.escape(n) for n in sorted(ids_of, key=len, reverse=True)) + ")")
        out = []
        for text in texts:
            ids: list[int] = []
            for piece in pattern.split(text):
                if piece in ids_of:
                    ids.append(ids_of[piece])
                elif piece:
                    ids.extend(self.tokenizer.encode([piece])[0])
            out.append(ids)
        return out

    def decode(self, ids: Sequence[int] | Iterable[int]) -> str:
        out, run = [], []
        for i in map(int, ids):
            if 0 <= i < self.tokenizer.vocab_size and i not in self.names:
                run.append(i)
                continue
            if run:
                out.append(self.tokenizer.decode(run))
                run = []
            out.append(self.names.get(i, f"<id {i}>"))
        if run:
            out.append(self.tokenizer.decode(run))
        return "".join(out)
