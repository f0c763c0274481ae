"""`train.profile_steps = [start, stop]`: a `jax.profiler` trace of train steps start .. stop-1.

The trace goes to `<workdir>/profile/plugins/profile/<timestamp>/` as XLA's `*.xplane.pb`
(TensorBoard's profile plugin: `tensorboard --logdir <workdir>/profile`) plus
`perfetto_trace.json.gz` (open it in https://ui.perfetto.dev). Each step runs under a
`StepTraceAnnotation`, so the profiler's step-time breakdown finds the steps. Every process
traces its own devices. A run resumed past `start` traces the steps of the range it still runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax


class StepProfiler:
    """Starts the trace before step `start`, stops it (after the last traced step finishes) before `stop`."""

    def __init__(self, steps: list[int], workdir: Path, log: Any = None) -> None:
        self.start, self.stop = (steps[0], steps[1]) if steps else (0, 0)
        self.directory = workdir / "profile"
        self.log = log or (lambda msg: None)
        self.active = False

    def before_step(self, step: int, pending: Any) -> None:
        """Call before dispatching `step`; `pending` is what the previous steps produced (waited on when stopping)."""
        if not self.active and self.start <= step < self.stop:
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.active = True
            self.first = step
        elif self.active and step >= self.stop:
            self.finish(pending)
        if self.active:
            self.last = step

    def annotation(self, step: int) -> Any:
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def finish(self, pending: Any) -> None:
        """Stop an active trace once `pending` is computed."""
        if not self.active:
            return
        try:
            jax.block_until_ready(pending)
        except RuntimeError:  # a step failed after its input was donated: nothing left to wait for
            pass
        jax.profiler.stop_trace()
        self.active = False
        self.log(f"profile of steps {self.first}..{self.last} written to {self.directory} "
                 f"(tensorboard --logdir {self.directory}, or perfetto_trace.json.gz in ui.perfetto.dev)")
