"""Objectives: the last, replaceable step of the data pipeline, from a packed row to a training example.

An objective says how many tokens of the packed stream one example consumes (`raw_length`) and
turns one packed row into the example dict (`__call__`). The row holds int32 arrays of length
`raw_length(seq_len)`: `tokens`, `segment_ids` (1, 2, ... per document piece; 0 is padding) and
`positions` (0, 1, ... within each piece). `rng` is a `np.random.Generator` seeded from (seed,
global example index), so what an objective draws does not depend on worker or process counts.
A model family with another objective (masked LM, span corruption) passes its own to
`DataModule(cfg, objective=...)`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Objective(Protocol):
    def raw_length(self, seq_len: int) -> int:
        """Tokens of the packed stream that one example of length `seq_len` consumes."""
        ...

    def __call__(self, row: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One packed row -> one example (a dict of numpy arrays of fixed shapes and dtypes)."""
        ...


class LanguageModeling:
    """Next-token prediction: `inputs`, `targets`, `segment_ids`, `positions` (int32 [L]) and `weights` (f32 [L]).

    A row of L+1 tokens gives inputs = tokens[:-1] and targets = tokens[1:]. A target counts
    (weight 1) only when it belongs to the same document piece as its input: padding and the
    step from one document's last token to the next document's first are not trained on.
    """

    def raw_length(self, seq_len: int) -> int:
        return seq_len + 1

    def __call__(self, row: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        tokens, seg, pos = row["tokens"], row["segment_ids"], row["positions"]
        seg_in, seg_out = seg[:-1], seg[1:]
        return {
            "inputs": tokens[:-1].astype(np.int32),
            "targets": tokens[1:].astype(np.int32),
            "segment_ids": seg_in.astype(np.int32),
            "positions": pos[:-1].astype(np.int32),
            "weights": ((seg_in == seg_out) & (seg_in > 0)).astype(np.float32),
        }


def example_spec(objective: Objective, seq_len: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{field: (shape, dtype)} of one example, found by running the objective on a dummy row."""
    n = objective.raw_length(seq_len)
    row = {"tokens": np.zeros(n, np.int32), "segment_ids": np.ones(n, np.int32),
           "positions": np.arange(n, dtype=np.int32)}
    out = objective(row, np.random.default_rng(0))
    return {k: (tuple(v.shape), v.dtype) for k, v in out.items()}
