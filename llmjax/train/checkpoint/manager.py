"""Orbax checkpoints of the train state and the data iterator, in one step directory.

Layout: `WORKDIR/checkpoints/<step>/{state,data}` plus `llmjax_checksums.*.json`. Saves are
asynchronous (the step loop goes on while arrays are written) and atomic (orbax writes to a
temporary directory and renames it when complete), so a kill -9 never leaves a half-written
checkpoint that looks finished. Once a save is final, the SHA-256 of each of its files is
written beside it (`train.integrity`, in a background thread, each process hashing a share).
Restoring reads straight into the target shardings given by the abstract state, so a
checkpoint written under one mesh restores under any other.

Before a restore the step's files are verified against their checksums, and after it the
restored arrays must be finite. A checkpoint that fails either check, or that orbax cannot
read, is reported in one line, the previous one is used and, once that one has restored,
the bad step is moved to `WORKDIR/checkpoints_unreadable/` (kept for inspection, never
deleted). The directory may be a `gs://` URL (orbax and `etils.epath` handle it). A save
that the storage refuses (disk full, quota, read-only) raises `storage.StorageError`, and
the partial step it leaves is removed; finished checkpoints are never touched.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llmjax.errors import CheckpointError, StorageError
from llmjax.storage import as_path, reraise_storage
from llmjax.train.checkpoint import integrity
from llmjax.train.checkpoint.data_state import DataStateRestore, DataStateSave

TMP_MARKER = ".orbax-checkpoint-tmp"


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"llmjax: {msg}", file=sys.stderr, flush=True)


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _gather_problems() -> Callable[[bytes], list[bytes]] | None:
    """All processes' encoded problem strings (fixed 512 bytes each), or None for one process."""
    if jax.process_count() == 1:
        return None
    from jax.experimental import multihost_utils

    def gather(encoded: bytes) -> list[bytes]:
        buf = np.zeros(512, np.uint8)
        buf[: len(encoded)] = np.frombuffer(encoded, np.uint8)
        return [bytes(row) for row in np.asarray(multihost_utils.process_allgather(buf)).reshape(-1, 512)]

    return gather


def _no_replica_slices_on_cpu() -> None:
    """On CPU in one process, write each replicated array from one replica instead of orbax's default of a slice
    from each.

    orbax's replica-parallel save splits a replicated array into one slice per device, each a separately
    compiled `jit(slice)` per device and shape: with 8 CPU devices a first save compiled 64 of them (4.0 s
    of a 4.4 s save of the default model; 0.6 s without). On CPU the devices share the host's memory, so
    the slices save nothing; orbax itself turns replica-parallel off for GPUs. Process-wide (orbax's
    handler registry is global); restoring is unaffected (the same files either way)."""
    if jax.default_backend() != "cpu" or jax.process_count() > 1:  # several hosts: each writes a share
        return
    handler = ocp.type_handlers.get_type_handler(jax.Array)
    if getattr(handler, "_use_replica_parallel", False):
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def nonfinite_leaf(tree: Any) -> str | None:
    """The path of the first floating-point leaf of `tree` holding a NaN or an infinity, or None."""
    leaves = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
    if not leaves:
        return None
    flags = jax.device_get(jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])([x for _, x in leaves]))
    for (path, _), ok in zip(leaves, flags, strict=True):
        if not ok:
            return jax.tree_util.keystr(path)
    return None


class Checkpointer:
    """Save/restore `(state, data_state)` pairs under `directory`, keeping the newest `keep`."""

    def __init__(self, directory: Any, keep: int = 3, async_save: bool = True, primary: bool = True,
                 checksums: bool = True):
        self.directory = as_path(directory)
        self.primary = primary  # the process that moves unreadable checkpoints aside
        self.async_save = async_save
        self.checksums = checksums
        self._sealer: threading.Thread | None = None
        self._seal_error: BaseException | None = None
        self._seal_step = self._in_flight = -1
        self._check_step_entries()
        _no_replica_slices_on_cpu()
        # Always an async manager (the checksum thread waits on it); async_save=False waits after each save.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
        except Exception as e:  # noqa: BLE001 - orbax/epath raise many types
            reraise_storage(e, "create the checkpoint directory", self.directory)
            raise

    def _check_step_entries(self) -> None:
        """A plain file named like a step would be taken for a checkpoint or overwritten: refuse."""
        if not self.directory.is_dir():
            if self.directory.exists():
                raise CheckpointError(f"{self.directory} exists and is not a directory")
            return
        for child in self.directory.iterdir():
            if child.name.isdigit() and not child.is_dir():
                raise CheckpointError(f"{child} is a file, not a checkpoint directory: move it out of "
                                      f"{self.directory} (it would be mistaken for checkpoint {child.name})")

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> Any:
        return self.directory / str(step)

    # ------------------------------------------------------------------------- saving

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        """Start saving `state` (a pytree of jax arrays) and the data iterator state (`BatchIterator.get_state()`,
        or {"step": k}); each process writes its own data shares' files (`train.data_state`).

        Raises StorageError when the storage refuses the write (the partial step is removed)."""
        if step in self.manager.all_steps():
            return
        self._join_sealer()
        self._in_flight = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=DataStateSave(data_state)),
                force=True,
            )
            if not self.async_save:
                self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._fail(e, step)
        if self.checksums:
            self._sealer = threading.Thread(target=self._seal, args=(step,), name=f"llmjax-checksums-{step}",
                                            daemon=True)
            self._sealer.start()
            if not self.async_save:
                self._join_sealer()

    def _seal(self, step: int) -> None:
        """(thread) Wait until `step` is final, then hash this process's share of its files."""
        try:
            self.manager.wait_until_finished()
            directory = self.step_dir(step)
            if directory.is_dir():  # already gone if max_to_keep removed it meanwhile
                integrity.write_manifest(directory, jax.process_index(), jax.process_count())
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread by _join_sealer
            self._seal_error = e
            self._seal_step = step

    def _join_sealer(self) -> None:
        if self._sealer is not None:
            self._sealer.join()
            self._sealer = None
        if self._seal_error is not None:
            e, self._seal_error = self._seal_error, None
            self._fail(e, self._seal_step)

    def _fail(self, e: BaseException, step: int) -> None:
        """Turn a failed save into StorageError (removing the partial step) or re-raise it."""
        from llmjax.storage import storage_problem

        if storage_problem(e) is None:
            raise e
        self._discard_partial(step)
        raise StorageError(f"save checkpoint {step} in", self.directory, storage_problem(e) or "") from e

    def _discard_partial(self, step: int) -> None:
        """Remove the temporary directory a failed save of `step` left, to give the space back. Finished
        checkpoints (with or without their checksums) are never touched."""
        if not self.primary:
            return
        for child in list(self.directory.iterdir()) if self.directory.is_dir() else []:
            partial = child.name.startswith(f"{step}{TMP_MARKER}")
            if partial:
                try:
                    child.rmtree()
                except OSError:
                    pass

    # ------------------------------------------------------------------------- restoring

    def _verify(self, step: int) -> str | None:
        """None when `step` passes its checksums (or has none: said once), else the problem."""
        if not self.checksums:
            return None
        try:
            problem = integrity.verify(self.step_dir(step), jax.process_index(), jax.process_count())
        except integrity.Unverified as e:
            _say(f"note: checkpoint {self.step_dir(step)} is not verified: {e}")
            problem = None
        except OSError as e:
            problem = f"cannot read it ({_reason(e)})"
        problem = integrity.agree(problem, _gather_problems())
        return f"failed verification: {problem}" if problem else None

    def restore_latest(self, abstract_state: Any, check: Callable[[Any], None] | None = None,
                       data_shares: list[int] | None = None) -> tuple[int, Any, dict[str, Any]] | None:
        """Newest good checkpoint as (step, state, data_state), or None if there is none.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings: arrays are
        read directly into that layout. `check(step_dir)` may raise ConfigError when the
        checkpoint belongs to another model (a usage error, not a bad checkpoint). Bad
        checkpoints (unreadable, failing their checksums, or holding non-finite values) are
        reported on stderr and skipped (newest first); if none is good, CheckpointError lists why.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        failures = []
        for step in steps:
            problem = self._verify(step)  # first: a corrupted step must fall back, not look like another model
            if problem is None:
                if check is not None:
                    check(self.step_dir(step))
                try:
                    restored = self.manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore(data_shares)))
                except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable files
                    problem = _reason(e)
                else:
                    bad = nonfinite_leaf(restored.state)
                    if bad is not None:
                        problem = f"non-finite values in {bad}"
            if problem is not None:
                _say(f"checkpoint {self.step_dir(step)} is unreadable ({problem}); trying the previous one")
                failures.append((step, problem))
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

    def restore_params(self, abstract_params: Any, check: Callable[[Any], None] | None = None) -> tuple[int, Any]:
        """Only the model parameters of the newest good checkpoint, as (step, params).

        `abstract_params` (ShapeDtypeStructs with shardings) gives the target layout; the
        optimizer state is not read. `check(step_dir)` as in `restore_latest`. Raises
        CheckpointError when there is no checkpoint or none is good (nothing is moved:
        inference never modifies a workdir)."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        item = {"params": abstract_params}
        failures = []
        for step in steps:
            problem = self._verify(step)
            if problem is None:
                if check is not None:
                    check(self.step_dir(step))
                try:
                    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                        partial_restore=True)))
                    params = restored.state["params"]
                except Exception as e:  # noqa: BLE001 - orbax raises many types for unreadable files
                    problem = _reason(e)
                else:
                    bad = nonfinite_leaf(params)
                    problem = None if bad is None else f"non-finite values in {bad}"
            if problem is None:
                return step, params
            _say(f"checkpoint {self.step_dir(step)} is unreadable ({problem}); trying the previous one")
            failures.append((step, problem))
        raise CheckpointError(f"no checkpoint in {self.directory} could be restored:\n  "
                              + "\n  ".join(f"step {s}: {r}" for s, r in failures))

    def _move_aside(self, step: int) -> None:
        if not self.primary:
            return
        aside = self.directory.parent / f"{self.directory.name}_unreadable"
        target = aside / f"{step}-{int(time.time())}"
        try:
            aside.mkdir(exist_ok=True)
            self.step_dir(step).rename(target)
        except OSError as e:
            _say(f"could not move the bad checkpoint {self.step_dir(step)} aside ({_reason(e)}); it stays where it "
                 "is and will be skipped again")
            return
        _say(f"moved the bad checkpoint to {target}")
        self.manager.reload()

    # ------------------------------------------------------------------------- shutdown

    def wait(self) -> None:
        """Block until the last save is final and its checksums are written (StorageError if it failed)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._fail(e, self._in_flight)
        self._join_sealer()

    def close(self) -> None:
        """Finish pending saves and release orbax's threads; a failed pending save raises as in `wait`."""
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - the failure was reported by wait()
                pass
