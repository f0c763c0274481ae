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
point. A worker of several processes (a multi-node Slurm job step, `launch/local.sh N`, a multi-host
TPU slice): process 0 claims, heartbeats and writes the markers, and broadcasts each trainer
command, which every other process runs too (`broadcast.py`): they join one jax.distributed run.

SIGTERM (scancel, preemption, the sbatch script before the time limit) is passed to the trainer,
which saves a checkpoint and exits; the worker then releases its lease so that the next worker
(or this one, requeued) resumes the point at once. A worker killed outright (kill -9, a lost node)
takes its trainer with it (PR_SET_PDEATHSIG) and its lease goes stale. Every claim, takeover and
result is appended to DIR/.leases/journal.jsonl (on gs://, which cannot append, one object per
event in DIR/.leases/journal/, named by time).

DIR is a shared file system or a gs:// URL (queue.py): on gs:// the leases are generation-conditional
writes (lease.py GCSLeases), the markers and the points' run directories go through llmjax.storage,
and the trainer writes DIR/<point> on gs:// itself. Before a worker writes a point's DONE or FAILED
or counts a failed try it heartbeats the lease once more (a conditional write on gs://): a worker
whose lease was taken over writes nothing, and the write lands well within the lease time of a
heartbeat that proved the point still its own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from llmjax.scaling import ScalingError
from llmjax.scaling.cluster.broadcast import Broadcast, channel, follow, process_index
from llmjax.scaling.cluster.lease import Lease, Leases
from llmjax.scaling.cluster.lease import leases as lease_store
from llmjax.scaling.cluster.queue import point_state, read_queue
from llmjax.scaling.sweep.collect import FAILED
from llmjax.scaling.sweep.runner import _add_wall_time, _run_point, write_done
from llmjax.scaling.sweep.spec import Point, Sweep
from llmjax.storage import any_path, is_url

WAIT = "wait"
ACK_SECONDS = 600.0  # how long process 0 waits for the others to finish a command it finished


def worker_id() -> str:
    """This worker's name: the Slurm array task, the TPU slice (LLMJAX_WORKER), launch/local.sh's
    coordinator port, else host-pid; the same in every process of a worker."""
    env = os.environ
    if env.get("LLMJAX_WORKER"):
        return env["LLMJAX_WORKER"]
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '0')}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{env['SLURM_JOB_ID']}"
    if int(env.get("LLMJAX_NUM_PROCESSES") or 1) > 1:  # launch/local.sh: one name for all its processes
        return f"{socket.gethostname()}-{env.get('LLMJAX_COORDINATOR', '').rpartition(':')[2]}"
    return f"{socket.gethostname()}-{os.getpid()}"


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

    def __init__(self, leases: Leases, lease_seconds: float, broadcast: Broadcast | None = None):
        self.leases = leases
        self.broadcast = broadcast  # a worker of several processes: each command goes to all of them
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
        seq = self.broadcast.announce(cmd) if self.broadcast is not None else 0
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
                self._heartbeat()
        t.join(timeout=10)
        self.error = _error_line(lines)
        deadline = time.time() + ACK_SECONDS
        while self.broadcast is not None and not self.broadcast.acked(seq):  # the other processes' command
            if time.time() > deadline:
                print(f"llmjax sweep work: the other processes of this worker did not finish "
                      f"`{' '.join(cmd[2:])[:200]}` within {ACK_SECONDS:.0f} s of process 0; stopping",
                      file=sys.stderr, flush=True)
                self.stopping = True
                return rc or 1
            time.sleep(0.5 if is_url(self.leases.dir) else 0.05)  # gs://: fewer reads
            if time.time() > next_beat:
                next_beat = time.time() + self.beat
                self._heartbeat()
        return rc

    def _heartbeat(self) -> None:
        if not all(self.leases.heartbeat(lease) for lease in self.held) and not self.lost:
            self.lost = True  # taken over (our heartbeat was late): stop, the new holder trains it
            print(f"llmjax sweep work: lost the lease of {[x.point for x in self.held]}; stopping it",
                  file=sys.stderr, flush=True)
            if self.child is not None and self.child.poll() is None:
                self.child.send_signal(signal.SIGTERM)


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


def _journal(leases: Leases, event: str, **info: Any) -> None:
    now = time.time()
    line = json.dumps({"time": round(now, 3), "event": event, **info}) + "\n"
    if is_url(leases.dir):  # an object store cannot append: one object per event, names sorting by time
        (leases.dir / "journal" / f"{now:017.6f}-{os.urandom(4).hex()}.json").write_text(line)
        return
    fd = os.open(leases.dir / "journal.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one write with O_APPEND: lines from several workers do not mix
    finally:
        os.close(fd)


def _claimable(directory: Any, p: Point, leases: Leases, settings: dict[str, Any]) -> tuple[str, Any]:
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


def claim(directory: Any, sweep: Sweep, leases: Leases, settings: dict[str, Any], worker: str,
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


def _pack_key(sweep: Sweep, p: Point, directory: Any) -> Any:
    from llmjax.scaling.sweep.multipoint import pack_key
    from llmjax.scaling.sweep.pack import _resume_step
    from llmjax.scaling.sweep.spec import point_config

    return pack_key(point_config(sweep, p)), _resume_step(directory / p.name)


def work(directory: Any, worker: str | None = None, resources: str | None = None) -> int:
    """Claim and train points until none is left (module docstring); 0, or 143 when stopped by a signal.
    `resources`: only the points of that resource shape (`sweep submit`'s arrays, e.g. '1x8')."""
    directory = any_path(directory)
    sweep, settings = read_queue(directory)
    if resources:
        shapes = settings.get("resources") or {}
        sweep.points = [p for p in sweep.points if shapes.get(p.name, resources) == resources]
    leases = lease_store(directory)
    worker = worker or worker_id()
    rank, count = process_index()
    if count != 1 and int(settings["pack"]) > 1:
        raise ScalingError(f"sweep work: --pack {settings['pack']} needs a worker of one process (a pack trains on "
                           f"one process's devices); this worker has {count or 'several'}: submit with --pack 1")
    if rank > 0:
        return follow(leases.dir, channel(worker), rank, _die_with_parent)
    broadcast = Broadcast(leases.dir, channel(worker), count) if count != 1 else None
    trainer = Trainer(leases, float(settings["lease_seconds"]), broadcast)
    signal.signal(signal.SIGTERM, trainer.on_signal)
    signal.signal(signal.SIGINT, trainer.on_signal)
    trained = 0
    print(f"llmjax sweep work: worker {worker} on {directory} ({len(sweep.points)} points"
          f"{f', {count} processes' if broadcast else ''})", flush=True)
    try:
        trained = _work(directory, sweep, leases, settings, worker, trainer)
    finally:
        if broadcast is not None:
            broadcast.announce(None)  # the end, also when process 0 fails: the others must not wait forever
    print(f"llmjax sweep work: worker {worker} {'stopped' if trainer.stopping else 'done'} after training "
          f"{trained} points", flush=True)
    return 143 if trainer.stopping else 0


def _work(directory: Any, sweep: Sweep, leases: Leases, settings: dict[str, Any], worker: str,
          trainer: Trainer) -> int:
    """The claim-train-mark loop of `work`; the number of points trained."""
    by_name = {p.name: p for p in sweep.points}
    poll = max(0.2, min(5.0, float(settings["lease_seconds"]) / 4))
    trained = 0
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
        statuses = _train_points(directory, sweep, points, by_name, trainer)
        for p, lease in got:
            _finish(directory, p, lease, statuses[p.name], trainer, leases, settings, worker)
        trained += len(points)
    return trained


def _train_points(directory: Any, sweep: Sweep, points: list[Point], by_name: dict[str, Point],
                  trainer: Trainer) -> dict[str, int]:
    """Train one point (as `sweep run` does) or a pack of them (in a subprocess); {name: exit status}."""
    if len(points) == 1:
        return {points[0].name: _run_point(sweep, points[0], by_name, directory, f"[{points[0].name}]", trainer.call,
                                           mark=False)}  # DONE: written by _finish, under the lease
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


def _finish(directory: Any, p: Point, lease: Lease, rc: int, trainer: Trainer, leases: Leases,
            settings: dict[str, Any], worker: str) -> None:
    """Mark the point (DONE, a failure, or nothing when stopped or taken over) and release its lease."""
    run_dir = directory / p.name
    if trainer.lost or not leases.heartbeat(lease):  # taken over: the new holder marks the point
        _journal(leases, "lost", point=p.name, worker=worker)
        return
    if rc == 0:
        (run_dir / FAILED).unlink(missing_ok=True)
        write_done(run_dir, p, timed=True)
        _journal(leases, "done", point=p.name, worker=worker)
    elif trainer.stopping:
        _journal(leases, "stopped", point=p.name, worker=worker, exit_status=rc)
    else:
        n = leases.add_failure(p.name, trainer.error)
        final = n > settings["retries"]
        if final:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / FAILED).write_text(json.dumps({"exit_status": rc, "error": trainer.error, "failures": n}))
        _journal(leases, "failed" if final else "retry", point=p.name, worker=worker, exit_status=rc,
                 error=trainer.error, failures=n)
        print(f"llmjax sweep work: {p.name} exited with status {rc} (failure {n} of at most "
              f"{settings['retries'] + 1}): {trainer.error}", file=sys.stderr, flush=True)
    leases.release(lease)


def _pack_main(argv: list[str]) -> int:
    """`python -m llmjax.scaling.cluster.worker pack DIR OUT NAME...`: train the named points as one pack."""
    from llmjax.scaling.sweep.pack import run_pack

    directory, out, names = any_path(argv[0]), any_path(argv[1]), argv[2:]
    sweep, _ = read_queue(directory)
    by_name = {p.name: p for p in sweep.points}
    statuses = run_pack(sweep, [by_name[n] for n in names], directory, f"[pack {names[0]}]", _add_wall_time)
    out.write_text(json.dumps(statuses))
    return 0 if all(rc == 0 for rc in statuses.values()) else 1


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "pack":
    sys.exit(_pack_main(sys.argv[2:]))
