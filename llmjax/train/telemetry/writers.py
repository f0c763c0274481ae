"""Metrics sinks: `WORKDIR/metrics.jsonl` (one JSON object per line) and TensorBoard, local or remote."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from llmjax.storage import as_path, is_url, reraise_storage

REQUIRED_KEYS = {"train": "loss", "eval": "eval_loss"}


def _to_python(value: Any) -> Any:
    """Convert numpy / jax scalars to Python numbers for JSON; leave other values as they are."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (np.generic, np.ndarray, jax.Array)) and np.ndim(value) == 0:
        return np.asarray(value).item()
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


class EventWriter:
    """TensorBoard event files written synchronously in the calling thread (tensorboardX's SummaryWriter
    writes from a background thread, where a full disk kills the thread and then blocks the trainer)."""

    def __init__(self, logdir: str, suffix: str = "") -> None:
        from tensorboardX.event_file_writer import EventsWriter

        os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        self._events = EventsWriter(os.path.join(logdir, "events"), suffix)

    def _write(self, summary: Any, step: int) -> None:
        from tensorboardX.proto import event_pb2

        self._events.write_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.summary import scalar

        self._write(scalar(tag, float(value)), step)

    def add_summary(self, summary: Any, step: int = 0) -> None:
        """A prepared `Summary` proto (e.g. tensorboardX's hparams session records)."""
        self._write(summary, step)

    def add_text(self, tag: str, text: str, step: int = 0) -> None:
        from tensorboardX.summary import text as text_summary

        self._write(text_summary(tag, text), step)

    def flush(self) -> None:
        self._events.flush()

    def close(self) -> None:
        self._events.close()


class MetricsWriter:
    """Appends one JSON object per line to `workdir/metrics.jsonl` and scalars to TensorBoard.

    Never truncates an existing metrics file (resumed runs append). With `enabled=False`
    (non-zero processes) every method is a no-op and nothing is created. `workdir` may be a
    URL (`gs://...`): object stores cannot append, so both files are then written in a local
    staging directory and uploaded whole at most every `sync_every` seconds, at `sync()`
    (the trainer calls it at each checkpoint) and at `close()`; an existing remote
    metrics.jsonl is downloaded first, so a resumed run still appends. A write that the
    storage refuses raises `StorageError` naming the file and the free space. `sinks` (e.g.
    `tracking.WandbSink`) get every record too: `sink.log(kind, step, values)`, `sink.close()`.
    """

    def __init__(self, workdir: Any, enabled: bool = True, tensorboard: bool = True,
                 sync_every: float = 60.0, sinks: Sequence[Any] = ()) -> None:
        self.enabled = enabled
        self._file = None
        self._tb: EventWriter | None = None
        self._sinks = list(sinks) if enabled else []
        if not enabled:
            return
        workdir = as_path(workdir)
        self.path = workdir / "metrics.jsonl"
        self._remote = is_url(workdir)
        self._workdir, self._sync_every, self._last_sync = workdir, sync_every, time.time()
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            if self._remote:
                self._stage = tempfile.mkdtemp(prefix="llmjax-metrics-")
                local = os.path.join(self._stage, "metrics.jsonl")
                if self.path.exists():
                    with open(local, "wb") as f:
                        f.write(self.path.read_bytes())
            else:
                self._stage, local = os.fspath(workdir), os.fspath(self.path)
            self._local = local
            self._file = open(local, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            if _ends_mid_line(Path(local)):
                self._file.write("\n")  # a kill -9 cut the last line: keep it on a line of its own
            if tensorboard:
                # A unique suffix keeps a quick restart from overwriting the previous writer's event file.
                suffix = f".{os.getpid()}.{time.time_ns() % 10**9}"
                self._tb = EventWriter(os.path.join(self._stage, "tensorboard"), suffix)
        except OSError as e:
            reraise_storage(e, "write metrics to", workdir)
            raise

    def write(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        """Append a `kind` record for `step`; adds `"time"` (unix seconds).

        Train records must contain `loss`, eval records `eval_loss` (ValueError otherwise).
        """
        if not self.enabled or self._file is None:
            return
        required = REQUIRED_KEYS.get(kind)
        if required is not None and required not in metrics:
            raise ValueError(f"{kind} metrics must contain '{required}', got {sorted(metrics)}")
        values = {k: _to_python(v) for k, v in metrics.items()}
        record = {"kind": kind, **values, "step": int(step), "time": time.time()}
        try:
            self._file.write(json.dumps(record, default=str) + "\n")
            self._file.flush()
        except OSError as e:
            reraise_storage(e, "write metrics to", self.path)
            raise
        if self._tb is not None:
            try:
                for name, value in values.items():
                    if _is_number(value):
                        self._tb.add_scalar(f"{kind}/{name}", value, int(step))
                self._tb.flush()
            except OSError as e:
                reraise_storage(e, "write TensorBoard events to", self._workdir / "tensorboard")
                raise
        for sink in self._sinks:
            sink.log(kind, int(step), values)
        if self._remote and time.time() - self._last_sync >= self._sync_every:
            self.sync()

    def write_config(self, config: dict[str, Any], hardware: dict[str, Any]) -> None:
        """The resolved config (hparams + text) and the hardware (text) in TensorBoard."""
        if self._tb is not None:
            from llmjax.train.telemetry.tracking import tensorboard_config

            tensorboard_config(self._tb, config, hardware)

    def sync(self) -> None:
        """Upload the staged files of a remote workdir (no-op for a local one)."""
        if not self.enabled or not self._remote:
            return
        self._last_sync = time.time()
        try:
            for root, _, files in os.walk(self._stage):
                for name in files:
                    local = os.path.join(root, name)
                    rel = os.path.relpath(local, self._stage)
                    target = self._workdir / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with open(local, "rb") as f:
                        target.write_bytes(f.read())
        except OSError as e:
            reraise_storage(e, "upload metrics to", self._workdir)
            raise

    def close(self) -> None:
        """Close the files, the sinks and (remote) upload; every part is closed even when one fails, and the
        first failure is raised after (a storage refusal as StorageError naming the file)."""
        errors: list[BaseException] = []

        def attempt(fn: Any, action: str, path: Any) -> None:
            try:
                fn()
            except OSError as e:
                try:
                    reraise_storage(e, action, path)
                except BaseException as storage:  # noqa: BLE001 - kept, raised after the rest is closed
                    errors.append(storage)
                    return
                errors.append(e)
            except Exception as e:  # noqa: BLE001 - kept, raised after the rest is closed
                errors.append(e)

        if self._file is not None:
            file, self._file = self._file, None
            attempt(file.close, "write metrics to", self.path)
        if self._tb is not None:
            tb, self._tb = self._tb, None
            attempt(tb.close, "write TensorBoard events to", self._workdir / "tensorboard")
        sinks, self._sinks = self._sinks, []
        for sink in sinks:
            attempt(sink.close, "close a metrics sink of", getattr(self, "_workdir", "the run"))
        if self.enabled and self._remote:
            self._remote = False
            attempt(self._upload_once, "upload metrics to", self._workdir)
        if errors:
            raise errors[0]

    def _upload_once(self) -> None:
        self._remote = True
        try:
            self.sync()
        finally:
            self._remote = False
            shutil.rmtree(self._stage, ignore_errors=True)


def read_metrics(path: str | os.PathLike, kind: str = "train") -> dict[int, dict[str, Any]]:
    """Records of `kind` in a metrics.jsonl, by step. After a resume a step may appear twice;
    the later record wins. Lines cut short by a killed process are skipped."""
    records: dict[int, dict[str, Any]] = {}
    text = (as_path(path) if is_url(path) else Path(path)).read_bytes().decode("utf-8", errors="replace")
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("kind") == kind and "step" in record:
            records[int(record["step"])] = record
    return records
