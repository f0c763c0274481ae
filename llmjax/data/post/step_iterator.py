"""The iterator of an in-memory post-training data set (SFT conversations, DPO pairs): batch k is a pure
function of k, so the iterator's whole state is its step (plus the data's fingerprint, which a resume
checks)."""

from __future__ import annotations

from typing import Any

import numpy as np


class StepIterator:
    """This process's rows of global batches k = step, step+1, ... (dicts of numpy [B / P, ...] arrays).

    `data` has `global_batch`, `local_batch`, `block` (this process's block of rows) and `fingerprint`;
    a subclass defines `NAME`, `STATE_FORMAT` and `rows(first)`, the local batch whose first row is
    global row `first`."""

    NAME = ""
    STATE_FORMAT = ""

    def __init__(self, data: Any, step: int = 0):
        self.data, self.step = data, step

    def rows(self, first: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __iter__(self) -> StepIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        d = self.data
        batch = self.rows(self.step * d.global_batch + d.block * d.local_batch)
        self.step += 1
        return batch

    def source_fractions(self) -> dict[str, float]:
        return {self.NAME: 1.0}

    def get_state(self) -> dict[str, Any]:
        return {"format": self.STATE_FORMAT, "step": self.step, "fingerprint": self.data.fingerprint}

    def close(self) -> None:
        pass
