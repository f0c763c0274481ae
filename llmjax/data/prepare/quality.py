"""The `quality` curation stage: Gopher/C4-style heuristic filters, each selected by name.

The rules and default thresholds are those of Gopher (Rae et al. 2021, appendix A: length, mean
word length, symbol ratios, bullet and ellipsis lines, words with a letter, stop words, repeated
lines and n-grams) and FineWeb's share of lines ending in punctuation (a C4 idea). Words are the
whitespace-separated pieces of the text; lines are its non-blank lines. `QualityFilters.check`
returns the name of the first filter (in `curate.quality.filters` order) the document fails.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from llmjax.config.curation import QualityConfig

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_BULLETS = ("•", "-", "*", "‣", "●", "◦", "▪", "–")
_ELLIPSES = ("...", "…")
_TERMINAL = (".", "!", "?", '"', "'", "”", "’")
_PUNCT = "\"'.,;:!?()[]{}<>«»“”‘’`*_"


class _Doc:
    """A document's words and lines, computed once for all filters."""

    def __init__(self, text: str):
        self.text = text
        self.words = text.split()
        self.lines = [ln.strip() for ln in text.splitlines() if ln.strip()]


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
    return sum(any(c.isalpha() for c in w) for w in d.words) / len(d.words) >= q.min_alpha_words


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


def _top_ngrams(q: QualityConfig, d: _Doc) -> bool:
    """The most frequent n-gram (n = 2, 3, ...), if repeated, holds at most the given share of the word characters."""
    total = _word_chars(d)
    for n, limit in enumerate(q.max_top_ngram_chars, start=2):
        if len(d.words) < n:
            break
        counts = Counter(zip(*(d.words[i:] for i in range(n)), strict=False))
        gram, count = counts.most_common(1)[0]
        if count > 1 and sum(map(len, gram)) * count / total > limit:
            return False
    return True


def _duplicate_ngrams(q: QualityConfig, d: _Doc) -> bool:
    """The words inside repeated n-grams (n = 5, 6, ...; each word counted once) hold at most the given share of the
    word characters."""
    total = _word_chars(d)
    words = d.words
    for n, limit in enumerate(q.max_duplicate_ngram_chars, start=5):
        if len(words) < n:
            break
        seen: set[tuple[str, ...]] = set()
        covered = [False] * len(words)
        for i, gram in enumerate(zip(*(words[j:] for j in range(n)), strict=False)):
            if gram in seen:
                covered[i:i + n] = [True] * n
            else:
                seen.add(gram)
        if sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total > limit:
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
