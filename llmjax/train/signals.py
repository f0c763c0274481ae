"""Stopping on SIGTERM/SIGINT at a step boundary, the same step on every process."""

from __future__ import annotations

import signal
from typing import Any

import numpy as np


class StopSignals:
    """Remember SIGTERM/SIGINT instead of dying, so the loop can checkpoint and exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def agree_on_signal(received: int | None) -> int | None:
    """The signal any process has received (the largest), or None: a collective that every process
    calls at the same step, so that all of them stop at the same step (otherwise the ones still
    stepping would wait forever in the next step's collectives)."""
    from jax.experimental import multihost_utils

    got = multihost_utils.process_allgather(np.int32(received or 0))
    return int(np.max(got)) or None
