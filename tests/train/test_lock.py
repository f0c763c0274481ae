"""One trainer per workdir (`llmjax.train.lock`): a second trainer on a live workdir is refused with exit 2 and
changes nothing; a lock left by a kill -9'd process, or one whose lease expired, is taken over with a warning."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_train_overrides

from llmjax.train.lock import LOCK_FILE, WorkdirBusy, WorkdirLock, check_free, read_holder

ROOT = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    """The id of a process of this host that has exited."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write(workdir: Path, **fields) -> None:
    record = {"pid": 1, "host": socket.gethostname(), "started": time.time(), "refreshed": time.time(),
              "lease_s": 120, "token": "other"} | fields
    (workdir / LOCK_FILE).write_text(json.dumps(record))


def test_a_held_lock_refuses_a_second_holder_and_is_released(tmp_path):
    with WorkdirLock(tmp_path, warn=pytest.fail):
        holder = read_holder(tmp_path)
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(WorkdirBusy, match=f"{tmp_path} is in use by another trainer: process {os.getpid()}"):
            WorkdirLock(tmp_path, warn=pytest.fail).acquire()
        with pytest.raises(WorkdirBusy):
            check_free(tmp_path)
    assert not (tmp_path / LOCK_FILE).exists()
    check_free(tmp_path)


def test_the_heartbeat_refreshes_the_lease(tmp_path):
    lock = WorkdirLock(tmp_path, lease_s=0.2, warn=pytest.fail).acquire()
    try:
        first = read_holder(tmp_path)["refreshed"]
        time.sleep(0.5)
        assert read_holder(tmp_path)["refreshed"] > first  # beats every lease/4: never expires while it lives
        with pytest.raises(WorkdirBusy):
            WorkdirLock(tmp_path, warn=pytest.fail).acquire()
    finally:
        lock.release()


@pytest.mark.parametrize("fields, reason", [
    ({"pid": "dead"}, "that process no longer runs"),
    ({"host": "elsewhere", "refreshed": 0.0}, "its lease of 120 s expired"),
    ({"pid": "self"}, "left by an earlier run in this process"),
], ids=["dead-process", "expired-lease", "this-process"])
def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, fields, reason):
    pid = {"dead": _dead_pid(), "self": os.getpid()}.get(fields.get("pid"), 1)
    _write(tmp_path, **(fields | {"pid": pid}))
    warnings: list[str] = []
    with WorkdirLock(tmp_path, warn=warnings.append):
        assert read_holder(tmp_path)["pid"] == os.getpid()
    assert len(warnings) == 1 and "taking over the stale lock" in warnings[0] and reason in warnings[0], warnings


def test_a_live_lock_of_another_host_is_respected(tmp_path):
    _write(tmp_path, host="elsewhere", pid=4242)
    with pytest.raises(WorkdirBusy, match="process 4242 on host elsewhere"):
        WorkdirLock(tmp_path, warn=pytest.fail).acquire()
    assert read_holder(tmp_path)["pid"] == 4242  # untouched


def _snapshot(workdir: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(workdir)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(workdir.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_second_trainer_is_refused_and_a_killed_ones_lock_does_not_block_a_resume(tmp_path, corpus):
    """Real processes: the first trainer (paused with SIGSTOP, alive) holds the workdir; a second `llmjax train`
    exits 2 naming the workdir and the holder and changes nothing; after kill -9 the resume takes the lock over."""
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "llmjax.cli", "train", "--workdir", str(workdir), *tiny_train_overrides(corpus),
           "eval.every_steps=0", "sample.max_new_tokens=0", "checkpoint.every_steps=2", "checkpoint.async_save=false"]
    first = subprocess.Popen([*cmd, "train.steps=100000"], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not any(c.name.isdigit() for c in (workdir / "checkpoints").glob("*")):
            assert first.poll() is None and time.time() < deadline, "the first trainer did not checkpoint"
            time.sleep(0.5)
        first.send_signal(signal.SIGSTOP)  # alive, but writing nothing while we compare
        time.sleep(1.0)
        before = _snapshot(workdir)
        second = subprocess.run([*cmd, "train.steps=20"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert f"{workdir} is in use by another trainer: process {first.pid} on host" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr and second.stderr.count("llmjax: error:") == 1, second.stderr
        assert _snapshot(workdir) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert read_holder(workdir)["pid"] == first.pid  # the killed trainer's lock is left behind
    newest = max(int(c.name) for c in (workdir / "checkpoints").iterdir() if c.name.isdigit())
    resumed = subprocess.run([*cmd, "train.steps=100000", f"train.stop_after={newest + 2}"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "taking over the stale lock" in resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr, resumed.stderr
    assert not (workdir / LOCK_FILE).exists()  # released at the end
