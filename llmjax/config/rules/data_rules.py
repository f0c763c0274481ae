"""Rules of the `data` section (called by `config.rules.validate`): ranges, sources and mixture weights; and of the
`curate` section that `llmjax data prepare` reads (`check_curation`)."""

from __future__ import annotations

import math

from llmjax.config.curation import CurateConfig
from llmjax.config.schema import Config, ConfigError, SourceConfig


def check_weights(items: list[tuple[str, SourceConfig]]) -> None:
    """Weights are finite, >= 0 and sum to a positive number (ConfigError naming the key)."""
    for key, s in items:
        if not math.isfinite(s.weight) or s.weight < 0:
            raise ConfigError(f"{key}.weight must be a number >= 0, got {s.weight}")
    total = sum(s.weight for _, s in items)
    if not total > 0:
        raise ConfigError(f"data.sources: the weights sum to {total}; they must sum to a positive number")


def validate_data(cfg: Config) -> None:
    d = cfg.data
    if d.seq_len <= 0:
        raise ConfigError(f"data.seq_len must be positive, got {d.seq_len}")
    if d.path and d.tfds_name:
        raise ConfigError("set only one of data.path and data.tfds_name")
    if d.sources and (d.path or d.tfds_name):
        raise ConfigError("data.sources is set: move data.path / data.tfds_name into it (set one or the other)")
    if not 0.0 <= d.validation_fraction < 1.0:
        raise ConfigError(f"data.validation_fraction must be in [0, 1), got {d.validation_fraction}")
    for name in ("shuffle_window", "workers", "shares", "prefetch"):
        if getattr(d, name) < 0:
            raise ConfigError(f"data.{name} must be >= 0, got {getattr(d, name)}")
    for name, low in (("packing_bins", 1), ("block_bytes", 4096), ("document_bytes", 64),
                      ("tokenizer_train_bytes", 1)):
        if getattr(d, name) < low:
            raise ConfigError(f"data.{name} must be >= {low}, got {getattr(d, name)}")
    if d.shares and cfg.train.batch_size % d.shares:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by data.shares={d.shares}")
    items = [(f"data.sources[{i}]", s) for i, s in enumerate(d.sources)]
    for key, s in items:
        if bool(s.path) == bool(s.tfds_name):
            raise ConfigError(f"{key}: set exactly one of path and tfds_name")
    if items:
        check_weights(items)
    check_curation(cfg.curate)


def _once(key: str, names: list[str]) -> None:
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"{key}: {name} is named twice ({key}[{names.index(name)}] and {key}[{i}])")


def check_curation(c: CurateConfig) -> None:
    """Each stage, filter and PII kind named at most once; the per-n thresholds of the n-gram filters are
    shares in [0, 1]; lower bounds not above upper bounds. ConfigError naming the key."""
    _once("curate.stages", list(c.stages))
    _once("curate.quality.filters", list(c.quality.filters))
    _once("curate.pii.kinds", list(c.pii.kinds))
    q = c.quality
    for name in ("max_top_ngram_chars", "max_duplicate_ngram_chars"):
        values = getattr(q, name)
        if not values:
            raise ConfigError(f"curate.quality.{name}: empty; give one share per n")
        for i, v in enumerate(values):
            if not 0 <= v <= 1:
                raise ConfigError(f"curate.quality.{name}[{i}]={v} must be in [0, 1]")
    if q.min_words > q.max_words:
        raise ConfigError(f"curate.quality.min_words={q.min_words} exceeds curate.quality.max_words={q.max_words}")
    if q.min_mean_word_length > q.max_mean_word_length:
        raise ConfigError(f"curate.quality.min_mean_word_length={q.min_mean_word_length} exceeds "
                          f"curate.quality.max_mean_word_length={q.max_mean_word_length}")
