"""`llmjax sweep work DIR`: one of a submitted sweep's identical workers.

A worker claims the first unfinished point of DIR/queue.json in spec order (`lease.py`: the lease
is created exclusively, or taken over when its heartbeat is older than `lease_seconds`), trains
it with the same `llmjax train` command `sweep run` uses (so a point resumes from its own newest
checkpoint when an earlier worker was stopped or lost), refreshes the lease every quarter of the
lease time while it trains, writes DONE (or, after `retries` failed retries, FAILED with the
trainer's last error line) and claims the next. While other workers hold the remaining points it
waits (their leases may go stale); it exits 0 when every point is done or failed.

With `pack` K > 1 it claims up to K unfinished points that `sweep run --pack` would pack with the
first one and trains them in one program (`scaling/sweep/pack.py`), in a subprocess like a lone
point. A worker of several processes (a multi-node Slurm job step, a multi-host TPU slice): process
0 claims and announces the points in DIR/.leases/<worker>.announce (the shared file system is the
broadcast), every process runs the same `llmjax train` (which joins them with jax.distributed);
only process 0 heartbeats and writes markers.

SIGTERM (scancel, preemption, the sbatch script before the time limit) is passed to the trainer,
which saves a checkpoint and exits; the worker then releases its lease so that the next worker
(or this one, requeued) resumes the point at once. A worker killed outright (kill -9, a lost node)
takes its trainer with it (PR_SET_PDEATHSIG) and its lease goes stale. Every claim, takeover and
result is appended to DIR/.leases/journal.jsonl.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmjax.scaling.cluster.lease import Lease, LocalLeases
from llmjax.scaling.cluster.queue import point_state, read_queue
from llmjax.scaling.sweep.collect import FAILED
from llmjax.scaling.sweep.runner import _add_wall_time, _run_point, write_done
from llmjax.scaling.sweep.spec import Point, Sweep

WAIT = "wait"


def worker_id() -> str:
    """This worker's name: the Slurm array task, the TPU slice (LLMJAX_WORKER), else host:pid."""
    env = os.environ
    if env.get("LLMJAX_WORKER"):
        return env["LLMJAX_WORKER"]
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{env['SLURM_JOB_ID']}"
    return f"{socket.gethostname()}-{os.getpid()}"


def process_index() -> tuple[int, bool]:
    """(this process's index within its worker, whether the worker has several processes): a Slurm job
    step's task (SLURM_PROCID), launch/local.sh's LLMJAX_PROCESS_ID, a TPU slice's host (its hostname
    ends in -w-<index>; a slice worker always announces, its host count is not in the environment)."""
    env = os.environ
    if env.get("SLURM_STEP_ID") is not None and env.get("SLURM_PROCID"):
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1) > 1
    if env.get("LLMJAX_NUM_PROCESSES"):
        return int(env.get("LLMJAX_PROCESS_ID", "0")), int(env["LLMJAX_NUM_PROCESSES"]) > 1
    if env.get("LLMJAX_WORKER"):  # launch/tpu_pod.sh --workers
        m = re.search(r"-w-(\d+)$", socket.gethostname())
        return (int(m.group(1)) if m else 0), True
    return 0, False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """The trainer gets SIGKILL when the worker dies (Linux prctl PR_SET_PDEATHSIG), so that a killed
    worker leaves no trainer writing into a point another worker takes over."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except Exception:
        pass


class Trainer:
    """Runs trainer commands for the leased points, heartbeating the leases while each runs."""

    def __init__(self, leases: LocalLeases, lease_seconds: float):
        self.leases = leases
        self.beat = max(0.2, min(30.0, lease_seconds / 4))
        self.held: list[Lease] = []
        self.child: subprocess.Popen[str] | None = None
        self.stopping = False
        self.lost = False
        self.error = ""

    def on_signal(self, signum: int, _frame: Any) -> None:
        self.stopping = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def call(self, cmd: list[str]) -> int:
        """Run `cmd` (output passed through), heartbeating; its exit status. Remembers its error line."""
        if self.stopping or self.lost:
            return 143
        self.child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                      preexec_fn=_die_with_parent)
        import threading

        lines: list[str] = []
        t = threading.Thread(target=_forward, args=(self.child, lines), daemon=True)
        t.start()
        next_beat = time.time() + self.beat
        while True:
            try:
                rc = self.child.wait(timeout=max(0.05, next_beat - time.time()))
                break
            except subprocess.TimeoutExpired:
                next_beat = time.time() + self.beat
                if not all(self.leases.heartbeat(lease) for lease in self.held) and not self.lost:
                    self.lost = True  # taken over (our heartbeat was late): stop, the new holder trains it
                    print(f"llmjax sweep work: lost the lease of {[x.point for x in self.held]}; stopping it",
                          file=sys.stderr, flush=True)
                    self.child.send_signal(signal.SIGTERM)
        t.join(timeout=10)
        self.error = _error_line(lines)
        return rc


def _forward(child: subprocess.Popen[str], lines: list[str]) -> None:
    assert child.stdout is not None
    for line in child.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if line.strip():
            lines.append(line.strip())
            del lines[:-50]


def _error_line(lines: list[str]) -> str:
    """The trainer's error: its last `llmjax: ...` or `...Error...` line, else its last line."""
    for line in reversed(lines):
        if line.startswith("llmjax:") or "Error" in line:
            return line[:500]
    return lines[-1][:500] if lines else ""


def _journal(leases: LocalLeases, event: str, **info: Any) -> None:
    line = json.dumps({"time": round(time.time(), 3), "event": event, **info}) + "\n"
    fd = os.open(leases.dir / "journal.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one write with O_APPEND: lines from several workers do not mix
    finally:
        os.close(fd)


def _claimable(directory: Path, p: Point, leases: LocalLeases, settings: dict[str, Any]) -> tuple[str, Any]:
    """('skip', None) | ('busy', None) | ('free', None) | ('stale', lease) | ('mark', None): finished, DONE
    marker missing."""
    info = point_state(directory, p, leases, settings)
    state = info["state"]
    if state == "done" and not info["marked"]:
        return "mark", None
    if state == "done" or (state == "failed" and leases.failures(p.name)[0] > settings["retries"]):
        return "skip", None
    if state in ("pending", "failed"):  # failed with retries left: a FAILED marker of `sweep run --keep-going`
        return "free", None
    if state == "stale":
        held = leases.read(p.name)
        return ("stale", held[0]) if held else ("free", None)
    return "busy", None


def claim(directory: Path, sweep: Sweep, leases: LocalLeases, settings: dict[str, Any], worker: str,
          k: int = 1) -> list[tuple[Point, Lease]] | str | None:
    """Claim the first claimable point (and, with k > 1, up to k - 1 more that pack with it): the claimed
    [(point, lease)], WAIT when every unfinished point is held by a live worker, None when none is left."""
    got: list[tuple[Point, Lease]] = []
    busy = False
    key = None
    for p in sweep.points:
        if len(got) >= k:
            break
        what, stale = _claimable(directory, p, leases, settings)
        if what == "skip":
            continue
        if what == "busy":
            busy = True
            continue
        if got and key is not None and _pack_key(sweep, p, directory) != key:
            continue
        lease = Lease(p.name, worker)
        ok = leases.claim(lease) if what != "stale" else leases.take_over(stale, lease, settings["lease_seconds"])
        if not ok:
            busy = True
            continue
        if what == "mark":  # its trainer finished but its worker was stopped before writing DONE
            write_done(directory / p.name, p, timed=False)
            _journal(leases, "done", point=p.name, worker=worker, note="finished before its worker stopped")
            leases.release(lease)
            continue
        if _claimable(directory, p, leases, settings)[0] == "skip":  # finished just before we claimed it
            leases.release(lease)
            continue
        _journal(leases, "claim" if what == "free" else "takeover", point=p.name, worker=worker,
                 **({"from": stale.worker} if stale else {}))
        got.append((p, lease))
        if k > 1 and key is None:
            key = _pack_key(sweep, p, directory)
    return got or (WAIT if busy else None)


def _pack_key(sweep: Sweep, p: Point, directory: Path) -> Any:
    from llmjax.scaling.sweep.multipoint import pack_key
    from llmjax.scaling.sweep.pack import _resume_step
    from llmjax.scaling.sweep.spec import point_config

    return pack_key(point_config(sweep, p)), _resume_step(directory / p.name)


def work(directory: str | Path, worker: str | None = None, resources: str | None = None) -> int:
    """Claim and train points until none is left (module docstring); 0, or 143 when stopped by a signal.
    `resources`: only the points of that resource shape (`sweep submit`'s arrays, e.g. '1x8')."""
    directory = Path(directory)
    sweep, settings = read_queue(directory)
    if resources:
        shapes = settings.get("resources") or {}
        sweep.points = [p for p in sweep.points if shapes.get(p.name, resources) == resources]
    leases = LocalLeases(directory)
    worker = worker or worker_id()
    rank, several = process_index()
    if rank > 0:
        return _follow(directory, sweep, leases, worker)
    trainer = Trainer(leases, float(settings["lease_seconds"]))
    signal.signal(signal.SIGTERM, trainer.on_signal)
    signal.signal(signal.SIGINT, trainer.on_signal)
    by_name = {p.name: p for p in sweep.points}
    poll = max(0.2, min(5.0, float(settings["lease_seconds"]) / 4))
    seq, trained = 0, 0
    print(f"llmjax sweep work: worker {worker} on {directory} ({len(sweep.points)} points)", flush=True)
    while not trainer.stopping:
        got = claim(directory, sweep, leases, settings, worker, int(settings["pack"]))
        if got is None:
            break
        if got == WAIT:
            time.sleep(poll)
            continue
        assert isinstance(got, list)
        points = [p for p, _ in got]
        trainer.held, trainer.lost = [lease for _, lease in got], False
        if several:
            seq += 1
            _announce(leases, worker, seq, [p.name for p in points])
        statuses = _train_points(directory, sweep, points, by_name, trainer)
        for p, lease in got:
            _finish(directory, p, lease, statuses[p.name], trainer, leases, settings, worker)
        trained += len(points)
    if several:
        _announce(leases, worker, seq + 1, [], end=True)
    print(f"llmjax sweep work: worker {worker} {'stopped' if trainer.stopping else 'done'} after training "
          f"{trained} points", flush=True)
    return 143 if trainer.stopping else 0


def _train_points(directory: Path, sweep: Sweep, points: list[Point], by_name: dict[str, Point],
                  trainer: Trainer) -> dict[str, int]:
    """Train one point (as `sweep run` does) or a pack of them (in a subprocess); {name: exit status}."""
    if len(points) == 1:
        return {points[0].name: _run_point(sweep, points[0], by_name, directory, f"[{points[0].name}]", trainer.call)}
    out = directory / ".leases" / f"pack-{trainer.held[0].token}.json"
    cmd = [sys.executable, "-m", "llmjax.scaling.cluster.worker", "pack", str(directory), str(out),
           *(p.name for p in points)]
    rc = trainer.call(cmd)
    try:
        statuses = json.loads(out.read_text())
        out.unlink()
    except (OSError, ValueError):
        statuses = {p.name: rc or 1 for p in points}
    return {p.name: int(statuses.get(p.name, rc or 1)) for p in points}


def _finish(directory: Path, p: Point, lease: Lease, rc: int, trainer: Trainer, leases: LocalLeases,
            settings: dict[str, Any], worker: str) -> None:
    """Mark the point (DONE, a failure, or nothing when stopped or taken over) and release its lease."""
    run_dir = directory / p.name
    if trainer.lost:
        _journal(leases, "lost", point=p.name, worker=worker)
        return
    if rc == 0:
        (run_dir / FAILED).unlink(missing_ok=True)
        write_done(run_dir, p, timed=True)
        _journal(leases, "done", point=p.name, worker=worker)
    elif trainer.stopping:
        _journal(leases, "stopped", point=p.name, worker=worker, exit_status=rc)
    else:
        n = leases.failures(p.name)[0] + 1
        leases.set_failures(p.name, n, trainer.error)
        final = n > settings["retries"]
        if final:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / FAILED).write_text(json.dumps({"exit_status": rc, "error": trainer.error, "failures": n}))
        _journal(leases, "failed" if final else "retry", point=p.name, worker=worker, exit_status=rc,
                 error=trainer.error, failures=n)
        print(f"llmjax sweep work: {p.name} exited with status {rc} (failure {n} of at most "
              f"{settings['retries'] + 1}): {trainer.error}", file=sys.stderr, flush=True)
    leases.release(lease)


def _announce(leases: LocalLeases, worker: str, seq: int, names: list[str], end: bool = False) -> None:
    path = leases.dir / f"{worker}.announce"
    tmp = leases.dir / f".{worker}.announce.tmp"
    tmp.write_text(json.dumps({"seq": seq, "points": names, "end": end}))
    os.replace(tmp, path)


def _follow(directory: Path, sweep: Sweep, leases: LocalLeases, worker: str) -> int:
    """Process > 0 of a worker: train what process 0 announces, until it announces the end."""
    by_name = {p.name: p for p in sweep.points}
    seen = 0
    while True:
        try:
            msg = json.loads((leases.dir / f"{worker}.announce").read_text())
        except (OSError, ValueError):
            msg = {"seq": 0}
        if msg.get("seq", 0) > seen:
            seen = msg["seq"]
            if msg.get("end"):
                return 0
            for name in msg["points"]:  # a pack's points train one by one here: packs are for one process
                p = by_name[name]
                cmd = [sys.executable, "-m", "llmjax.cli", "train", *(["--config", sweep.base] if sweep.base else []),
                       "--workdir", str(directory / p.name), *p.overrides]
                subprocess.call(cmd, preexec_fn=_die_with_parent)
        time.sleep(0.5)


def _pack_main(argv: list[str]) -> int:
    """`python -m llmjax.scaling.cluster.worker pack DIR OUT NAME...`: train the named points as one pack."""
    from llmjax.scaling.sweep.pack import run_pack

    directory, out, names = Path(argv[0]), Path(argv[1]), argv[2:]
    sweep, _ = read_queue(directory)
    by_name = {p.name: p for p in sweep.points}
    statuses = run_pack(sweep, [by_name[n] for n in names], directory, f"[pack {names[0]}]", _add_wall_time)
    out.write_text(json.dumps(statuses))
    return 0 if all(rc == 0 for rc in statuses.values()) else 1


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "pack":
    sys.exit(_pack_main(sys.argv[2:]))
