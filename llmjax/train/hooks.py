"""The trainer's step loop and its hooks: everything besides stepping happens in a hook on the step cadence.

`run_loop(run, step_fn, next_batch, hooks)` steps from `run.start` to `run.end` and calls every hook's
events, in the list's order:
  start(run)                 once, before the first step (the evaluation of step 0 of a fresh run)
  before(run, step)          before dispatching a step (the profiler starts or stops its trace)
  around(run, step)          a context for the step's dispatch, or None (the profiler's step annotation)
  step(run, step, metrics)   the step is dispatched (metrics still on the device: recording reads them one
                             step late, so the host never stalls the accelerator)
  due(run, done) -> bool     asked of every hook after every step (the stop hook's poll is a collective)
  boundary(run, done)        when any hook is due or the run's last step is done: the recorder first reads
                             the step's own metrics, so a checkpoint is written only after its loss is known
                             finite, then evaluation, checkpoint, stop
  end(run)                   the loop ended without an exception (the recorder reads the last step)
  close(run)                 always, by `close_all` (in order; the first error is raised after all closed)

Step numbering: the record `{"step": k, "loss": ...}` is the loss of batch k under the parameters after
k updates; an evaluation or checkpoint at `done` holds the parameters after `done` updates.
The lone trainer (`llmjax.train.loop`) and the multi-point trainer (`llmjax.scaling.sweep.multipoint`) run
this same loop with these hooks; they differ in the callables the hooks are given (one point or K).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from llmjax.errors import EXIT_OK


@dataclasses.dataclass
class Run:
    """What the loop and its hooks share. `steps`: the schedule's length (the final evaluation follows it);
    `end`: where this run stops (`train.stop_after`, else `steps`)."""

    state: Any
    start: int
    end: int
    steps: int
    stop: int | None = None  # the stop signal every process agreed on, once received
    status: int = EXIT_OK
    finished: bool = False  # a hook ends the loop (stop signal; every point of a pack failed)
    completed: bool = False  # the loop and its `end` events ran without an exception
    clock: float = dataclasses.field(default_factory=time.time)  # when the last recorded step ended


class Hook:
    """A hook: override the events it needs (module docstring); `every` > 0 makes it due every `every` steps."""

    every: int = 0

    def due(self, run: Run, done: int) -> bool:
        return self.every > 0 and done % self.every == 0

    def start(self, run: Run) -> None:
        return None

    def before(self, run: Run, step: int) -> None:
        return None

    def around(self, run: Run, step: int) -> Any:
        return None

    def step(self, run: Run, step: int, metrics: Any) -> None:
        return None

    def boundary(self, run: Run, done: int) -> None:
        return None

    def end(self, run: Run) -> None:
        return None

    def close(self, run: Run) -> None:
        return None


def run_loop(run: Run, step_fn: Callable[[Any, Any], tuple[Any, Any]], next_batch: Callable[[], Any],
             hooks: Sequence[Hook]) -> None:
    """Step `run.state` with `step_fn(state, batch) -> (state, metrics)` (state donated) on `next_batch()`
    from `run.start` to `run.end`, calling the hooks' events (module docstring)."""
    for h in hooks:
        h.start(run)
    for step in range(run.start, run.end):
        batch = next_batch()
        for h in hooks:
            h.before(run, step)
        with contextlib.ExitStack() as stack:
            for h in hooks:
                ctx = h.around(run, step)
                if ctx is not None:
                    stack.enter_context(ctx)
            run.state, metrics = step_fn(run.state, batch)
        for h in hooks:
            h.step(run, step, metrics)
        done = step + 1
        due = [h.due(run, done) for h in hooks]  # every hook is asked: no short circuit
        if any(due) or done == run.end:
            for h in hooks:
                h.boundary(run, done)
        if run.finished:
            break
    for h in hooks:
        h.end(run)
    run.completed = True


def close_all(run: Run, hooks: Sequence[Hook], failing: bool = False) -> None:
    """Every hook's `close`, in order; the first error is raised once all are closed. `failing`: the loop is
    already ending with an error, which must reach the user: closing errors are only recorded in the run log
    (a full disk fails the metrics writer's close as well, and must not hide the first error's message)."""
    error: BaseException | None = None
    for h in hooks:
        try:
            h.close(run)
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others closed
            error = error or e
            run.completed = False
    if error is not None:
        if failing:
            from llmjax import runlog

            runlog.record_exception(error, "while closing the run after an earlier error")
            return
        raise error


class Record(Hook):
    """Reads each step's metrics one step late and hands them to `report(step, metrics, seconds)` exactly once
    per step, in order, with the step's wall time (evaluations excluded: see `Evaluate`)."""

    def __init__(self, report: Callable[[int, Any, float], None]) -> None:
        self.report = report
        self.pending: tuple[int, Any] | None = None

    def start(self, run: Run) -> None:
        run.clock = time.time()

    def step(self, run: Run, step: int, metrics: Any) -> None:
        if self.pending is not None:
            self._record(run, *self.pending)
        self.pending = (step, metrics)

    def boundary(self, run: Run, done: int) -> None:
        self.flush(run)

    def end(self, run: Run) -> None:
        self.flush(run)

    def flush(self, run: Run) -> None:
        if self.pending is not None:
            self._record(run, *self.pending)
            self.pending = None

    def _record(self, run: Run, step: int, metrics: Any) -> None:
        jax.block_until_ready(metrics)
        now = time.time()
        self.report(step, metrics, now - run.clock)
        run.clock = now


class Evaluate(Hook):
    """`evaluate(step)` at step 0 of a fresh run, every `every` steps and after the schedule's last step; the
    time it takes is not counted in the next step's time."""

    def __init__(self, every: int, evaluate: Callable[[int], None]) -> None:
        self.every, self.evaluate = every, evaluate

    def start(self, run: Run) -> None:
        if run.start == 0:
            self._at(run, 0)

    def boundary(self, run: Run, done: int) -> None:
        if self.due(run, done) or done == run.steps:
            self._at(run, done)

    def _at(self, run: Run, step: int) -> None:
        if self.every > 0:
            self.evaluate(step)
        run.clock = time.time()


class Checkpoint(Hook):
    """`save(step)` every `every` steps, at the run's end and on a stop signal (after `Record` read the step's
    metrics: a checkpoint's loss is known finite); `close()` when the run closes (waits for async saves)."""

    def __init__(self, every: int, save: Callable[[int], None], close: Callable[[], None]) -> None:
        self.every, self.save, self._close = every, save, close

    def boundary(self, run: Run, done: int) -> None:
        if self.due(run, done) or done == run.end or run.stop:
            self.save(done)

    def close(self, run: Run) -> None:
        self._close()


class Stop(Hook):
    """SIGTERM/SIGINT: `poll()` after every step (the agreed signal, or None); on one, after the checkpoint,
    `stopped(done, signal)` reports it, the status becomes 128 + N and the loop ends. `restore()` at close."""

    def __init__(self, poll: Callable[[], int | None], stopped: Callable[[int, int], None],
                 restore: Callable[[], None]) -> None:
        self.poll, self.stopped, self.restore = poll, stopped, restore

    def due(self, run: Run, done: int) -> bool:
        run.stop = self.poll()
        return bool(run.stop)

    def boundary(self, run: Run, done: int) -> None:
        if run.stop:
            self.stopped(done, run.stop)
            run.status = 128 + run.stop
            run.finished = True

    def close(self, run: Run) -> None:
        self.restore()


class Profile(Hook):
    """`train.profile_steps`: a `StepProfiler` trace around the steps it covers."""

    def __init__(self, profiler: Any) -> None:
        self.profiler = profiler

    def before(self, run: Run, step: int) -> None:
        self.profiler.before_step(step, run.state)

    def around(self, run: Run, step: int) -> Any:
        return self.profiler.annotation(step)

    def close(self, run: Run) -> None:
        self.profiler.finish(run.state)


class Closing(Hook):
    """Runs `close()` when the run closes (a data iterator, a progress bar, metrics writers)."""

    def __init__(self, close: Callable[[], None]) -> None:
        self._close = close

    def close(self, run: Run) -> None:
        self._close()


class Samples(Hook):
    """The end-of-run samples (`show()`) once the run completed with status 0 and its checkpoints are closed;
    the stop signals stay handled until they are done (a Ctrl-C must not interrupt a collective midway).
    `poll()` is the agreed signal (every process calls it: the samples are a collective); `saved()` is (the
    last saved step, the checkpoint directory) for the messages. Closes before `Stop` (which restores the
    signal handlers)."""

    def __init__(self, show: Callable[[], None], poll: Callable[[], int | None], saved: Callable[[], tuple[int, Any]],
                 log: Callable[[str], None]) -> None:
        self.show, self.poll, self.saved, self.log = show, poll, saved, log

    def close(self, run: Run) -> None:
        import signal

        if not run.completed or run.status != EXIT_OK:
            return
        late = self.poll()
        last, directory = self.saved()
        if late:  # a signal during the last step's eval or save: the checkpoint is saved, skip the samples
            self.log(f"{signal.Signals(late).name} received after the last step: checkpoint {last} is saved in "
                     f"{directory}; skipping the samples")
            run.status = 128 + late
        elif run.end < run.steps:
            self.log(f"stopped after step {run.end} of {run.steps} (train.stop_after): checkpoint {run.end} in "
                     f"{directory}")
        else:
            self.show()
            late = self.poll()
            if late:
                self.log(f"{signal.Signals(late).name} received during the samples: the run is complete, "
                         f"checkpoint {last} is saved in {directory}")
                run.status = 128 + late
