"""The `quality` curation stage: Gopher/C4-style heuristic filters, each selected by name.

The rules and default thresholds are those of Gopher (Rae et al. 2021, appendix A: length, mean
word length, symbol ratios, bullet and ellipsis lines, words with a letter, stop words, repeated
lines and n-grams) and FineWeb's share of lines ending in punctuation (a C4 idea). Words are the
whitespace-separated pieces of the text; lines are its non-blank lines. `QualityFilters.check`
returns the name of the first filter (in `curate.quality.filters` order) the document fails.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from llmjax.config.curation import QualityConfig

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_BULLETS = ("•", "-", "*", "‣", "●", "◦", "▪", "–")
_ELLIPSES = ("...", "…")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’")
_PUNCT = "\"'.,;:!?()[]{}<>«»“”‘’`*_"
_LETTER = re.compile(r"[^\W\d_]")


class _Doc:
    """A document's words and lines, computed once for all filters."""

    def __init__(self, text: str):
        self.text = text
        self.words = text.split()
        self.lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        self._ids: npt.NDArray[np.int64] | None = None
        self._cache: dict[int, npt.NDArray[np.int64]] = {}

    @property
    def ids(self) -> npt.NDArray[np.int64]:
        """Each word's id (equal words, equal ids) [words], for the n-gram filters."""
        if self._ids is None:
            vocab: dict[str, int] = {}
            self._ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in self.words), np.int64, len(self.words))
        return self._ids

    def grams(self, n: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """For the word n-grams [len(words) - n + 1] in order: their group (equal n-grams, equal groups), and per
        group the index of its first occurrence and its size."""
        group = self._groups(n)
        _, first, counts = np.unique(group, return_index=True, return_counts=True)
        return group, first, counts

    def _groups(self, n: int) -> npt.NDArray[np.int64]:
        """Group ids of the n-grams, from those of the (n-1)-grams and the next word (pairs as one int64)."""
        if n == 1:
            return self.ids
        if n not in self._cache:
            m = len(self.words) - n + 1
            pairs = self._groups(n - 1)[:m] * (len(self.words) + 1) + self.ids[n - 1:n - 1 + m]
            self._cache[n] = np.unique(pairs, return_inverse=True)[1].reshape(-1)
        return self._cache[n]


def _length(q: QualityConfig, d: _Doc) -> bool:
    return q.min_words <= len(d.words) <= q.max_words


def _mean_word_length(q: QualityConfig, d: _Doc) -> bool:
    if not d.words:
        return False
    mean = sum(map(len, d.words)) / len(d.words)
    return q.min_mean_word_length <= mean <= q.max_mean_word_length


def _symbol_ratio(q: QualityConfig, d: _Doc) -> bool:
    n = max(len(d.words), 1)
    hashes = d.text.count("#")
    ellipses = d.text.count("...") + d.text.count("…")
    return hashes / n <= q.max_symbol_ratio and ellipses / n <= q.max_symbol_ratio


def _share(lines: list[str], test: Callable[[str], bool]) -> float:
    return sum(map(test, lines)) / len(lines) if lines else 0.0


def _bullet_lines(q: QualityConfig, d: _Doc) -> bool:
    return _share(d.lines, lambda ln: ln.startswith(_BULLETS)) <= q.max_bullet_lines


def _ellipsis_lines(q: QualityConfig, d: _Doc) -> bool:
    return _share(d.lines, lambda ln: ln.endswith(_ELLIPSES)) <= q.max_ellipsis_lines


def _alpha_words(q: QualityConfig, d: _Doc) -> bool:
    if not d.words:
        return False
    return sum(1 for w in d.words if _LETTER.search(w)) / len(d.words) >= q.min_alpha_words


def _stop_words(q: QualityConfig, d: _Doc) -> bool:
    found = 0
    for w in d.words:
        if w.strip(_PUNCT).lower() in STOP_WORDS:
            found += 1
            if found >= q.min_stop_words:
                return True
    return found >= q.min_stop_words


def _duplicate_lines(q: QualityConfig, d: _Doc) -> bool:
    if not d.lines:
        return True
    seen: set[str] = set()
    dup_lines = dup_chars = 0
    for ln in d.lines:
        if ln in seen:
            dup_lines += 1
            dup_chars += len(ln)
        else:
            seen.add(ln)
    chars = sum(map(len, d.lines))
    return dup_lines / len(d.lines) <= q.max_duplicate_lines and dup_chars / max(chars, 1) <= q.max_duplicate_line_chars


def _word_chars(d: _Doc) -> int:
    return max(sum(map(len, d.words)), 1)


def _lengths(d: _Doc) -> npt.NDArray[np.int64]:
    return np.fromiter(map(len, d.words), np.int64, len(d.words))


def _top_ngrams(q: QualityConfig, d: _Doc) -> bool:
    """The most frequent n-gram (n = 2, 3, ...; of several, the longest), if repeated, holds at most the given share
    of the word characters (its length times its count)."""
    total = _word_chars(d)
    lengths = _lengths(d)
    for n, limit in enumerate(q.max_top_ngram_chars, start=2):
        if len(d.words) < n:
            break
        _, first, counts = d.grams(n)
        top = counts.max()
        if top < 2:
            continue
        gram_chars = np.lib.stride_tricks.sliding_window_view(lengths, n).sum(axis=1)[first[counts == top]]
        if int(gram_chars.max()) * int(top) / total > limit:
            return False
    return True


def _duplicate_ngrams(q: QualityConfig, d: _Doc) -> bool:
    """The words inside repeated n-grams (n = 5, 6, ...; each word counted once) hold at most the given share of the
    word characters."""
    total = _word_chars(d)
    lengths = _lengths(d)
    for n, limit in enumerate(q.max_duplicate_ngram_chars, start=5):
        if len(d.words) < n:
            break
        group, first, _ = d.grams(n)
        starts = np.flatnonzero(first[group] != np.arange(len(group)))  # n-grams that occurred before
        if not len(starts):
            continue
        depth = np.zeros(len(d.words) + 1, np.int64)  # words under at least one repeated n-gram
        np.add.at(depth, starts, 1)
        np.add.at(depth, starts + n, -1)
        if int(lengths[np.cumsum(depth[:-1]) > 0].sum()) / total > limit:
            return False
    return True


def _terminal_punct(q: QualityConfig, d: _Doc) -> bool:
    return _share(d.lines, lambda ln: ln.endswith(_TERMINAL)) >= q.min_terminal_lines


# name -> test (True: the document passes); the names are `llmjax.config.curation.QualityFilter`
FILTERS: dict[str, Callable[[QualityConfig, _Doc], bool]] = {
    "length": _length,
    "mean_word_length": _mean_word_length,
    "symbol_ratio": _symbol_ratio,
    "bullet_lines": _bullet_lines,
    "ellipsis_lines": _ellipsis_lines,
    "alpha_words": _alpha_words,
    "stop_words": _stop_words,
    "duplicate_lines": _duplicate_lines,
    "top_ngrams": _top_ngrams,
    "duplicate_ngrams": _duplicate_ngrams,
    "terminal_punct": _terminal_punct,
}


class QualityFilters:
    """The filters `cfg.filters` names, with `cfg`'s thresholds."""

    def __init__(self, cfg: QualityConfig):
        self.cfg = cfg
        self.names = list(cfg.filters)
        self._tests = [FILTERS[name] for name in self.names]

    def check(self, text: str) -> str | None:
        """The name of the first filter `text` fails, or None if it passes them all."""
        doc = _Doc(text)
        for name, test in zip(self.names, self._tests, strict=True):
            if not test(self.cfg, doc):
                return name
        return None
