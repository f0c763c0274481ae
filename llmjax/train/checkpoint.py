"""Orbax checkpoints of the train state and the data iterator, in one step directory.

Layout: `WORKDIR/checkpoints/<step>/{state,data}`. Saves are asynchronous (the step
loop goes on while arrays are written) and atomic (orbax writes to a temporary
directory and renames it when complete), so a kill -9 never leaves a half-written
checkpoint that looks finished. Restoring reads straight into the target shardings
given by the abstract state, so a checkpoint written under one mesh restores under
any other. If the newest checkpoint cannot be read (corrupted files), the error is
reported, the previous one is used and, once it has restored, the unreadable step is
moved to `WORKDIR/checkpoints_unreadable/` (kept for inspection, never deleted).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from llmjax.train.data_state import DataStateRestore, DataStateSave


class CheckpointError(RuntimeError):
    """No checkpoint in the directory could be restored."""


class Checkpointer:
    """Save/restore `(state, data_state)` pairs under `directory`, keeping the newest `keep`."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True, primary: bool = True):
        self.directory = Path(directory).absolute()
        self.primary = primary  # the process that moves unreadable checkpoints aside
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        """Start saving `state` (a pytree of jax arrays) and the data iterator state (`BatchIterator.get_state()`,
        or {"step": k}); each process writes its own data shares' files (`train.data_state`)."""
        if step in self.manager.all_steps():
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=DataStateSave(data_state)),
            force=True,
        )

    def restore_latest(self, abstract_state: Any, data_shares: list[int] | None = None
                       ) -> tuple[int, Any, dict[str, Any]] | None:
        """Newest readable checkpoint as (step, state, data_state), or None if there is none.

        `data_shares`: the data shares whose iterator states this process reads.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings: arrays are
        read directly into that layout. Unreadable checkpoints are reported on stderr and
        skipped (newest first); if none is readable, CheckpointError lists why.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        failures = []
        for step in steps:
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore(data_shares)
                    ),
                )
            except Exception as e:  # orbax raises many types for unreadable files
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                print(f"llmjax: checkpoint {self.directory / str(step)} is unreadable ({reason}); "
                      "trying the previous one", file=sys.stderr)
                failures.append((step, reason))
                continue
            for bad_step, _ in failures:  # only once an older one is known good
                self._move_aside(bad_step)
            return step, restored.state, dict(restored.data or {})
        if failures:
            raise CheckpointError(
                f"no checkpoint in {self.directory} could be restored (nothing was moved or deleted):\n  "
                + "\n  ".join(f"step {s}: {r}" for s, r in failures)
            )
        return None

    def restore_params(self, abstract_params: Any) -> tuple[int, Any]:
        """Only the model parameters of the newest readable checkpoint, as (step, params).

        `abstract_params` (ShapeDtypeStructs with shardings) gives the target layout; the
        optimizer state is not read. Raises CheckpointError when there is no checkpoint or
        none is readable (nothing is moved: inference never modifies a workdir)."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        item = {"params": abstract_params}
        failures = []
        for step in steps:
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                    item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
                return step, restored.state["params"]
            except Exception as e:  # orbax raises many types for unreadable files
                failures.append((step, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]))
        raise CheckpointError(f"no checkpoint in {self.directory} could be restored:\n  "
                              + "\n  ".join(f"step {s}: {r}" for s, r in failures))

    def _move_aside(self, step: int) -> None:
        if not self.primary:
            return
        aside = self.directory.parent / f"{self.directory.name}_unreadable"
        aside.mkdir(exist_ok=True)
        target = aside / f"{step}-{int(time.time())}"
        shutil.move(str(self.directory / str(step)), str(target))
        print(f"llmjax: moved the unreadable checkpoint to {target}", file=sys.stderr)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
