"""One trainer per workdir: `WORKDIR/.llmjax.lock`.

A run (process 0 of a multi-process run) takes the lock after the workdir is created and before
anything else is written into it, and releases it when it ends. The lock file is JSON:
`{"pid", "host", "started", "process_start", "refreshed", "lease_s", "token"}`; a heartbeat thread
rewrites `refreshed` every `lease_s / 4` seconds while the run lives.

A second trainer finds the lock and is refused (`WorkdirBusy`, a ConfigError: exit status 2) with
the holder named, before it writes or changes anything. A lock is *stale*, and taken over with a
warning, when its holder ran on this host and its process is gone (a kill -9: the process id no
longer exists, or now belongs to a process that started later), or when its lease expired
(`refreshed` older than `lease_s`: the holder's host died, or its heartbeat stopped).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from llmjax.errors import ConfigError, StorageError
from llmjax.storage import as_path, is_url, reraise_storage

LOCK_FILE = ".llmjax.lock"
LEASE_S = 120.0  # a holder whose heartbeat is older than this is presumed dead


class WorkdirBusy(ConfigError):
    """Another live trainer holds the workdir's lock."""


def _process_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (/proc/PID/stat field 22), or None where
    unknown (no /proc, or no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: split after its last ')'
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _alive(pid: int, process_start: int | None) -> bool:
    """Whether process `pid` of this host exists and is the one that took the lock (not a reused id)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    if process_start is None:
        return True
    now = _process_start(pid)
    return now is None or now == process_start


def describe(holder: dict[str, Any]) -> str:
    """'process 123 on host h since 2026-12-06 20:01:02 UTC (heartbeat 3 s ago)'."""
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(holder.get("started", 0))))
    age = time.time() - float(holder.get("refreshed", 0))
    return f"process {holder.get('pid')} on host {holder.get('host')} since {started} (heartbeat {age:.0f} s ago)"


def stale_reason(holder: dict[str, Any], now: float | None = None) -> str | None:
    """Why a lock's holder is presumed dead (a phrase), or None while it lives."""
    now = time.time() if now is None else now
    lease = float(holder.get("lease_s", LEASE_S))
    if now - float(holder.get("refreshed", 0)) > lease:
        return f"its lease of {lease:.0f} s expired"
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", -1))
        if pid == os.getpid() and holder.get("token") not in _HELD:
            return "it was left by an earlier run in this process"
        if pid != os.getpid() and not _alive(pid, holder.get("process_start")):
            return "that process no longer runs"
    return None


_HELD: set[str] = set()  # tokens of the locks this process holds


def read_holder(workdir: Any) -> dict[str, Any] | None:
    """The lock record of `workdir` (None when there is none; an unreadable record counts as expired)."""
    path = as_path(workdir) / LOCK_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        reraise_storage(e, "read the lock", path)
        raise
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None
    return holder if isinstance(holder, dict) else {"pid": -1, "host": "?", "started": 0, "refreshed": 0}


def check_free(workdir: Any, warn: Callable[[str], None] | None = None) -> None:
    """WorkdirBusy when a live trainer holds `workdir` (read only: `train --check`)."""
    holder = read_holder(workdir)
    if holder is None:
        return
    reason = stale_reason(holder)
    if reason is None:
        raise WorkdirBusy(f"--workdir {workdir} is in use by another trainer: {describe(holder)}; wait for it to "
                          f"end or use another --workdir (its lock: {as_path(workdir) / LOCK_FILE})")
    if warn is not None:
        warn(f"llmjax: warning: {as_path(workdir) / LOCK_FILE} is stale ({describe(holder)}: {reason}); "
             "a run would take it over")


class WorkdirLock:
    """The lock on one workdir, held from `acquire()` to `release()` (also a context manager)."""

    def __init__(self, workdir: Any, lease_s: float = LEASE_S, warn: Callable[[str], None] = print) -> None:
        self.workdir = as_path(workdir)
        self.path = self.workdir / LOCK_FILE
        self.lease_s = lease_s
        self.warn = warn
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> str:
        return json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": self.started,
                           "process_start": _process_start(os.getpid()), "refreshed": time.time(),
                           "lease_s": self.lease_s, "token": self.token}) + "\n"

    def _create(self) -> bool:
        """Write the lock if there is none; False when one exists."""
        if is_url(self.path):  # object stores have no exclusive create: check, then write
            if self.path.exists():
                return False
            self.path.write_text(self._record())
            return True
        try:
            fd = os.open(os.fspath(self.path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._record())
        return True

    def acquire(self) -> WorkdirLock:
        """Take the lock (WorkdirBusy while a live trainer holds it; a stale one is taken over with a warning)
        and start the heartbeat. StorageError when the lock cannot be written."""
        try:
            for _ in range(3):
                if self._create():
                    break
                holder = read_holder(self.workdir)
                if holder is None:
                    continue  # released meanwhile: try again
                reason = stale_reason(holder)
                if reason is None:
                    raise WorkdirBusy(f"--workdir {self.workdir} is in use by another trainer: {describe(holder)}; "
                                      f"wait for it to end or use another --workdir (its lock: {self.path})")
                self.warn(f"llmjax: warning: taking over the stale lock {self.path} ({describe(holder)}: {reason})")
                self._remove_if(holder.get("token"))
            else:
                raise WorkdirBusy(f"--workdir {self.workdir}: could not take its lock {self.path} (another trainer "
                                  "is starting?)")
        except OSError as e:
            reraise_storage(e, "write the lock", self.path)
            raise StorageError("write the lock", self.path, e.strerror or str(e)) from e
        _HELD.add(self.token)
        self._thread = threading.Thread(target=self._beat, name="llmjax-workdir-lock", daemon=True)
        self._thread.start()
        return self

    def _remove_if(self, token: Any) -> None:
        """Remove the lock file when it still holds `token` (a takeover or a release never removes another's)."""
        holder = read_holder(self.workdir)
        if holder is not None and holder.get("token") == token:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            self.refresh()

    def refresh(self) -> None:
        """Rewrite the heartbeat (through a temporary file). A failure is left for the run's own writes to report."""
        tmp = self.workdir / f".llmjax.lock.{self.token}.tmp"
        try:
            holder = read_holder(self.workdir)
            if holder is None or holder.get("token") != self.token:
                return  # taken over (our lease expired): never overwrite the new holder's lock
            tmp.write_text(self._record())
            tmp.replace(self.path)
        except OSError:
            pass

    def release(self) -> None:
        """Stop the heartbeat and remove the lock (if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.token in _HELD:
            _HELD.discard(self.token)
            try:
                self._remove_if(self.token)
            except OSError:
                pass

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
