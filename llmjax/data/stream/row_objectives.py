"""Host-side objectives: the last, replaceable step of the data pipeline, from a packed row to an example.

The packer (`llmjax.data.stream.stages`) cuts the token stream into rows of `raw_length(seq_len)`
tokens: int32 `tokens`, `segment_ids` (1, 2, ... per document piece; 0 is padding) and
`positions` (0, 1, ... within each piece). The model family's objective
(`ModelFamily.objective`) turns every row into one example with a `np.random.Generator` seeded
from (seed, global example index), so examples do not depend on worker or process counts. An
objective returns the example's fields (numpy arrays of fixed shapes) named as its family's
batch type.
"""

from __future__ import annotations

import numpy as np

from llmjax.config.span_corruption import corrupted_lengths, corruption_row_length, span_lengths

__all__ = ["MaskedLM", "NextToken", "Objective", "Row", "SpanCorruption", "corrupted_lengths",
           "corruption_row_length", "example_spec", "number_documents", "span_lengths", "uncorrupt"]

Row = dict[str, np.ndarray]  # tokens, segment_ids, positions: int32 [raw_length]


def number_documents(tokens: np.ndarray, eos_id: int) -> Row:
    """A row of a stream of EOS-terminated documents -> tokens, segment_ids, positions (int32 [N]).

    A token's segment is 1 + the number of EOS tokens strictly before it (an EOS belongs to the
    document it ends); positions count from 0 within each segment."""
    n = len(tokens)
    starts = np.zeros(n, dtype=bool)
    starts[0] = True
    starts[1:] = tokens[:-1] == eos_id
    segment_ids = np.cumsum(starts, dtype=np.int32)
    idx = np.arange(n, dtype=np.int32)
    positions = idx - np.maximum.accumulate(np.where(starts, idx, 0)).astype(np.int32)
    return {"tokens": tokens.astype(np.int32), "segment_ids": segment_ids, "positions": positions}


class Objective:
    """The interface: how many tokens of the packed stream one example consumes, and the example of a row."""

    def raw_length(self, seq_len: int) -> int:
        """Tokens of the packed stream that one example of length `seq_len` consumes."""
        return seq_len

    def __call__(self, row: Row, rng: np.random.Generator) -> dict[str, np.ndarray]:
        raise NotImplementedError


class NextToken(Objective):
    """Causal language modelling: `inputs`, `targets`, `segment_ids`, `positions` (int32 [L]) and `weights`
    (float32 [L]) from a row of L + 1 tokens: inputs = tokens[:-1], targets = tokens[1:].

    A target counts (weight 1) only when it belongs to the same document piece as its input: padding
    and the step from one document's last token (its EOS) to the next document's first are not
    trained on."""

    def raw_length(self, seq_len: int) -> int:
        return seq_len + 1

    def __call__(self, row: Row, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        tokens, seg = row["tokens"], row["segment_ids"]
        seg_in, seg_out = seg[:-1], seg[1:]
        return {"inputs": tokens[:-1].astype(np.int32), "targets": tokens[1:].astype(np.int32),
                "segment_ids": seg_in.astype(np.int32), "positions": row["positions"][:-1].astype(np.int32),
                "weights": ((seg_in == seg_out) & (seg_in > 0)).astype(np.float32)}


class MaskedLM(Objective):
    """BERT's masked-LM recipe on a row of `seq_len` tokens (documents keep their segment ids; attention is
    bidirectional within a document). Each token other than EOS and padding (segment 0) is selected with
    probability `mask_prob` (independently); a selected token becomes `mask_id` with probability
    `mask_token_prob`, a uniformly random ordinary token (ids [first_id, vocab)) with `random_token_prob`,
    and stays itself otherwise.
    targets = the original tokens, weights = 1 exactly at the selected positions."""

    def __init__(self, mask_prob: float, mask_token_prob: float, random_token_prob: float, mask_id: int,
                 eos_id: int, vocab: int, first_id: int = 0):
        self.mask_prob, self.mask_token_prob, self.random_token_prob = mask_prob, mask_token_prob, random_token_prob
        self.mask_id, self.eos_id, self.vocab, self.first_id = mask_id, eos_id, vocab, first_id

    def raw_length(self, seq_len: int) -> int:
        return seq_len

    def __call__(self, row: Row, rng: np.random.Generator) -> dict[str, np.ndarray]:
        tokens = row["tokens"]
        n = len(tokens)
        selected = (rng.random(n) < self.mask_prob) & (tokens != self.eos_id) & (row["segment_ids"] > 0)
        how = rng.random(n)
        inputs = tokens.copy()
        to_mask = selected & (how < self.mask_token_prob)
        to_random = selected & (how >= self.mask_token_prob) & (how < self.mask_token_prob + self.random_token_prob)
        inputs[to_mask] = self.mask_id
        inputs[to_random] = rng.integers(self.first_id, self.vocab, int(to_random.sum()), dtype=np.int32)
        return {"inputs": inputs.astype(np.int32), "targets": tokens.astype(np.int32),
                "segment_ids": row["segment_ids"], "positions": row["positions"],
                "weights": selected.astype(np.float32)}


class SpanCorruption(Objective):
    """T5's span corruption (Raffel et al. 2020, sec. 3.1.4) of a row of raw tokens.

    The row (documents concatenated, as in T5's C4 preprocessing: one sequence) is split into
    alternating kept and noise spans, starting with a kept one: the noise tokens and the span count
    follow `span_lengths`, and each of the two is cut into that many non-empty pieces uniformly at
    random. The encoder input is the kept tokens with noise span i replaced by sentinel i, then EOS;
    the target is, for each span i, sentinel i and the span's tokens, then EOS; the decoder input is
    the target shifted right after `start_id`. `raw_length(seq_len)` is the longest row whose encoder
    input fits seq_len; every example then has the same two lengths."""

    def __init__(self, noise_density: float, mean_span_length: float, sentinel_ids: list[int], start_id: int,
                 eos_id: int):
        self.noise_density, self.mean_span_length = noise_density, mean_span_length
        self.sentinel_ids, self.start_id, self.eos_id = sentinel_ids, start_id, eos_id

    def raw_length(self, seq_len: int) -> int:
        return corruption_row_length(seq_len, self.noise_density, self.mean_span_length)

    def target_length(self, seq_len: int) -> int:
        return corrupted_lengths(self.raw_length(seq_len), self.noise_density, self.mean_span_length)[1]

    def spans_needed(self, seq_len: int) -> int:
        return span_lengths(self.raw_length(seq_len), self.noise_density, self.mean_span_length)[1]

    @staticmethod
    def _cut(total: int, pieces: int, rng: np.random.Generator) -> np.ndarray:
        """`total` split into `pieces` positive parts, uniformly over the compositions."""
        if pieces == 1:
            return np.array([total])
        cuts = np.sort(rng.choice(np.arange(1, total), pieces - 1, replace=False))
        return np.diff(np.concatenate([[0], cuts, [total]]))

    def __call__(self, row: Row, rng: np.random.Generator) -> dict[str, np.ndarray]:
        tokens = row["tokens"]
        n = len(tokens)
        noise, spans = span_lengths(n, self.noise_density, self.mean_span_length)
        if spans > len(self.sentinel_ids):
            raise ValueError(f"span corruption needs {spans} sentinels per row, has {len(self.sentinel_ids)}")
        kept = self._cut(n - noise, spans, rng)
        noisy = self._cut(noise, spans, rng)
        inputs: list[np.ndarray | list[int]] = []
        targets: list[np.ndarray | list[int]] = []
        start = 0
        for i in range(spans):
            inputs.append(tokens[start:start + kept[i]])
            start += kept[i]
            inputs.append([self.sentinel_ids[i]])
            targets.append([self.sentinel_ids[i]])
            targets.append(tokens[start:start + noisy[i]])
            start += noisy[i]
        enc = np.concatenate([*inputs, [self.eos_id]]).astype(np.int32)
        tgt = np.concatenate([*targets, [self.eos_id]]).astype(np.int32)
        dec_in = np.concatenate([[self.start_id], tgt[:-1]]).astype(np.int32)
        Le, Ld = len(enc), len(tgt)
        return {"encoder_inputs": enc, "encoder_segment_ids": np.ones(Le, np.int32),
                "encoder_positions": np.arange(Le, dtype=np.int32), "decoder_inputs": dec_in,
                "decoder_targets": tgt, "decoder_segment_ids": np.ones(Ld, np.int32),
                "decoder_positions": np.arange(Ld, dtype=np.int32), "weights": np.ones(Ld, np.float32)}


def uncorrupt(encoder_inputs: np.ndarray, targets: np.ndarray, sentinel_ids: list[int]) -> np.ndarray:
    """The original row from a span-corrupted example: each sentinel in the input replaced by the tokens
    that follow it in the target (the inverse of `SpanCorruption`, for tests and inspection). Both end
    with the EOS the objective appended (EOS tokens inside are the documents' own)."""
    sentinel = {s: i for i, s in enumerate(sentinel_ids)}
    pieces: dict[int, list[int]] = {}
    current = None
    for t in targets[:-1].tolist():
        if t in sentinel:
            current = sentinel[t]
            pieces[current] = []
        elif current is not None:
            pieces[current].append(t)
    out: list[int] = []
    for t in encoder_inputs[:-1].tolist():
        out.extend(pieces[sentinel[t]] if t in sentinel else [t])
    return np.asarray(out, np.int32)


def example_spec(objective: Objective, seq_len: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{field: (shape, dtype)} of one example, found by running the objective on a dummy row."""
    n = objective.raw_length(seq_len)
    row = {"tokens": np.full(n, 4, np.int32), "segment_ids": np.ones(n, np.int32),
           "positions": np.arange(n, dtype=np.int32)}
    out = objective(row, np.random.default_rng(0))
    return {k: (tuple(v.shape), v.dtype) for k, v in out.items()}
