"""The lengths of span corruption (T5), jax- and numpy-free: config validation checks them at load.

`model.family=encoder_decoder` trains on span corruption (`llmjax.data.stream.row_objectives.SpanCorruption`,
which re-exports these functions); its config checks that the sentinels and `model.max_seq_len` cover the
spans and the target length a row of `data.seq_len` makes.
"""

from __future__ import annotations


def span_lengths(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, spans) of span corruption on `length` tokens (T5's `random_spans_noise_mask` rule):
    round(length x density) noise tokens (at least 1, at most length - 1) in round(noise / mean) spans (>= 1)."""
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    spans = max(int(round(noise / mean_span_length)), 1)
    return noise, spans


def corrupted_lengths(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(encoder input length, target length) after span corruption of `length` tokens, EOS appended to each:
    the kept tokens plus one sentinel per span, and per span its sentinel plus its tokens."""
    noise, spans = span_lengths(length, noise_density, mean_span_length)
    return length - noise + spans + 1, noise + spans + 1


def corruption_row_length(seq_len: int, noise_density: float, mean_span_length: float) -> int:
    """The longest row whose span-corrupted encoder input (`corrupted_lengths`) fits `seq_len` tokens."""
    n = seq_len
    while n > 2 and corrupted_lengths(n, noise_density, mean_span_length)[0] > seq_len:
        n -= 1
    while corrupted_lengths(n + 1, noise_density, mean_span_length)[0] <= seq_len:
        n += 1
    return n
