"""The `curate.*` section: what `llmjax data prepare` does to a corpus before tokenizing it.

`curate.stages` lists the stages to run, in order, each at most once (empty: none, the default):
`exact_dedup` (a hash of the normalised text), `near_dedup` (MinHash with LSH banding on word
n-grams), `quality` (the Gopher/C4-style heuristic filters named in `curate.quality.filters`) and
`pii` (e-mail addresses, IP addresses and phone numbers replaced by placeholders). A stage sees
the documents the stages before it kept, as they left them. The stage names and filter names are
declared here (the `Literal`s), the implementations are in `llmjax.data.prepare`; the rules that
join keys (a stage named twice, list thresholds) are `config.rules.data_rules.check_curation`.
Training ignores the section: curation happens once, when the corpus is prepared.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from llmjax.config.fields import option, section

Stage = Literal["exact_dedup", "near_dedup", "quality", "pii"]
QualityFilter = Literal["length", "mean_word_length", "symbol_ratio", "bullet_lines", "ellipsis_lines",
                        "alpha_words", "stop_words", "duplicate_lines", "top_ngrams", "duplicate_ngrams",
                        "terminal_punct"]
PiiKind = Literal["email", "ip", "phone"]

# Gopher (Rae et al. 2021, appendix A) and FineWeb's defaults; `curate.quality.*` overrides each
DEFAULT_FILTERS = ["length", "mean_word_length", "symbol_ratio", "bullet_lines", "ellipsis_lines", "alpha_words",
                   "stop_words", "duplicate_lines", "top_ngrams", "duplicate_ngrams"]


@dataclasses.dataclass
class NearDedupConfig:
    """MinHash signatures of word n-grams; a document whose estimated Jaccard similarity to a kept one is at
    least `threshold` is a near duplicate (LSH bands find the candidates, the signatures decide)."""

    threshold: float = option(0.8, "Jaccard similarity from which a document is a near duplicate", gt=0, le=1)
    ngram: int = option(5, "words per shingle", ge=1, le=64)
    num_perm: int = option(128, "MinHash permutations (signature length)", ge=16, le=1024)


@dataclasses.dataclass
class QualityConfig:
    """Heuristic document filters (Gopher's quality and repetition rules, FineWeb's line punctuation); a document
    failing any filter in `filters` is removed and counted under that filter."""

    filters: list[QualityFilter] = option(factory=lambda: list(DEFAULT_FILTERS),
                                          doc="filters applied, by name (each at most once)")
    min_words: int = option(50, "length: fewest words", ge=0)
    max_words: int = option(100_000, "length: most words", ge=1)
    min_mean_word_length: float = option(3.0, "mean_word_length: lower bound (characters)", ge=0)
    max_mean_word_length: float = option(10.0, "mean_word_length: upper bound (characters)", gt=0)
    max_symbol_ratio: float = option(0.1, "symbol_ratio: most '#' and '...' per word", ge=0)
    max_bullet_lines: float = option(0.9, "bullet_lines: largest share of lines starting with a bullet", ge=0, le=1)
    max_ellipsis_lines: float = option(0.3, "ellipsis_lines: largest share of lines ending in '...'", ge=0, le=1)
    min_alpha_words: float = option(0.8, "alpha_words: smallest share of words holding a letter", ge=0, le=1)
    min_stop_words: int = option(2, "stop_words: fewest English stop words (the, be, to, of, and, that, have, "
                                    "with)", ge=0)
    max_duplicate_lines: float = option(0.3, "duplicate_lines: largest share of lines that repeat an earlier one",
                                        ge=0, le=1)
    max_duplicate_line_chars: float = option(0.2, "duplicate_lines: largest share of characters in repeated lines",
                                             ge=0, le=1)
    max_top_ngram_chars: list[float] = option(
        factory=lambda: [0.20, 0.18, 0.16],
        doc="top_ngrams: largest share of characters in the most frequent 2-, 3-, 4-gram (one value per n from 2)")
    max_duplicate_ngram_chars: list[float] = option(
        factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10],
        doc="duplicate_ngrams: largest share of characters in repeated 5-, 6-, ... n-grams (one value per n from 5)")
    min_terminal_lines: float = option(0.12, "terminal_punct: smallest share of lines ending in . ! ? or a quote",
                                       ge=0, le=1)


@dataclasses.dataclass
class PiiConfig:
    """Personal data replaced in the text of the documents kept: e-mail addresses by `<EMAIL>`, IPv4 and IPv6
    addresses by `<IP>`, phone numbers (international or North American formats) by `<PHONE>`."""

    kinds: list[PiiKind] = option(factory=lambda: ["email", "ip", "phone"], doc="what is replaced")


@dataclasses.dataclass
class CurateConfig:
    """Curation in `llmjax data prepare` (`llmjax.data.prepare`): stages in order, each configured below."""

    stages: list[Stage] = option(factory=list, doc="stages run in this order, each at most once: exact_dedup, "
                                 "near_dedup, quality, pii; empty: no curation")
    examples: int = option(3, "removed documents quoted per stage in the report", ge=0, le=100)
    near_dedup: NearDedupConfig = section(NearDedupConfig, "near-duplicate removal (MinHash LSH)")
    quality: QualityConfig = section(QualityConfig, "heuristic quality filters")
    pii: PiiConfig = section(PiiConfig, "personal data replaced by placeholders")
