"""Metrics sinks: `WORKDIR/metrics.jsonl` (one JSON object per line) and TensorBoard."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

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


class MetricsWriter:
    """Appends one JSON object per line to `workdir/metrics.jsonl` and scalars to TensorBoard.

    Never truncates an existing metrics file (resumed runs append). With `enabled=False`
    (non-zero processes) every method is a no-op and nothing is created.
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if _ends_mid_line(self.path):
            self._file.write("\n")  # a kill -9 cut the last line: keep it on a line of its own
        if tensorboard:
            from tensorboardX import SummaryWriter

            # tensorboardX names files by second and host; a unique suffix keeps a quick restart
            # from overwriting the previous writer's event file.
            suffix = f".{os.getpid()}.{time.time_ns() % 10**9}"
            self._tb = SummaryWriter(logdir=str(workdir / "tensorboard"), filename_suffix=suffix)

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
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                if _is_number(value):
                    self._tb.add_scalar(f"{kind}/{name}", value, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | os.PathLike, kind: str = "train") -> dict[int, dict[str, Any]]:
    """Records of `kind` in a metrics.jsonl, by step. After a resume a step may appear twice;
    the later record wins. Lines cut short by a killed process are skipped."""
    records: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("kind") == kind and "step" in record:
            records[int(record["step"])] = record
    return records
