"""When the trainer reads metrics, evaluates and checkpoints: the step bookkeeping the lone trainer
(`train/loop.py`) and the packed one (`scaling/sweep/multipoint_loop.py`) share.

Step k's metrics are read from the device while step k+1 runs, so the host never stalls the
accelerator. At a boundary (a checkpoint or an evaluation is due, the run's last step, a stop
signal) the step's own metrics are read first, so a checkpoint is written only after its step's
loss is known finite; the evaluation's time is not counted in the next step's time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax


@dataclass(frozen=True)
class Due:
    """What follows the step that ends at a boundary."""

    evaluate: bool
    save: bool


class StepCadence:
    """`record(step, metrics, seconds)` is called exactly once per step, in order, with the step's wall time.

    `steps`: the schedule's length (the final evaluation follows it); `end`: where this run stops
    (`train.stop_after`, else `steps`)."""

    def __init__(self, cfg: Any, steps: int, end: int, record: Callable[[int, Any, float], None]):
        self.ckpt_every, self.eval_every = cfg.checkpoint.every_steps, cfg.eval.every_steps
        self.steps, self.end, self.record = steps, end, record
        self.pending: tuple[int, Any] | None = None
        self.t_prev = time.time()

    def dispatched(self, step: int, metrics: Any) -> None:
        """Step `step` was dispatched: record the previous one (its metrics are ready by now)."""
        if self.pending is not None:
            self._record(*self.pending)
        self.pending = (step, metrics)

    def boundary(self, done: int, stop: int | None) -> Due | None:
        """After `done` steps: None to go on, else (once the step's own metrics are recorded) what is due."""
        ckpt_due = self.ckpt_every > 0 and done % self.ckpt_every == 0
        eval_due = self.eval_every > 0 and done % self.eval_every == 0
        if not (ckpt_due or eval_due or done == self.end or stop):
            return None
        self.flush()
        return Due(evaluate=eval_due or done == self.steps, save=ckpt_due or done == self.end or bool(stop))

    def restart_clock(self) -> None:
        """Exclude what the host did since the last step (an evaluation) from the next step's time."""
        self.t_prev = time.time()

    def flush(self) -> None:
        """Record the step still pending, if any (at a boundary and when the loop ends)."""
        if self.pending is not None:
            self._record(*self.pending)
            self.pending = None

    def _record(self, step: int, metrics: Any) -> None:
        jax.block_until_ready(metrics)
        now = time.time()
        self.record(step, metrics, now - self.t_prev)
        self.t_prev = now
