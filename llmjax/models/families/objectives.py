"""Host-side objectives: how one training example is made from a packed row of tokens.

The data pipeline cuts the token stream into rows of `raw_length(seq_len)` tokens, numbers
the documents of each row (`segment_ids`, from 1) and each token's position in its document,
and calls the family's objective on every row with a `np.random.Generator` seeded from
(seed, global example index), so examples do not depend on worker or process counts. An
objective returns the example's fields (numpy arrays) named as its family's batch type.
"""

from __future__ import annotations

import numpy as np

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


class NextToken:
    """Causal language modelling: inputs = row[:-1], targets = row[1:] (a row is seq_len + 1 tokens)."""

    def raw_length(self, seq_len: int) -> int:
        return seq_len + 1

    def __call__(self, row: Row, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        tokens = row["tokens"]
        return {"inputs": tokens[:-1], "targets": tokens[1:], "segment_ids": row["segment_ids"][:-1],
                "positions": row["positions"][:-1], "weights": np.ones(len(tokens) - 1, np.float32)}
