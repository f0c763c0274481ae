"""`llmjax sweep status DIR [--wait] [--json]`: what each point of a submitted sweep is doing.

One row per point: pending (with its failed tries and last error, if any), running (worker, step,
train loss, ETA from the recent step times), stale (a lease whose heartbeat is older than the lease
time: its worker is gone; the next claimer takes it over), done (final eval loss) or failed (the
trainer's last error line). Totals, the accelerator-hours spent so far (each point's WALL_TIME, plus
the time since the claim of each running point, times the accelerators per worker) and an estimate
of the hours to finish (the remaining points' FLOPs at the hours per FLOP of the finished points).

`--wait` re-reads every few seconds until every point is done or failed; the exit status is 0 only
when all are done (1 when any failed). It gives up with exit status 4 (NO_WORKER) and one line saying
so when points are still pending (or held by stale leases) and no sign of a live worker has been seen
for `--grace` seconds (default: the sweep's lease time): no live lease, no new journal entry, and no
job that `sweep submit` submitted still in Slurm's queue (squeue; DIR/jobs.json).

DIR may be a gs:// URL (queue.py): the same files, read through llmjax.storage.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from typing import Any

from llmjax.scaling.cluster.lease import LEASES, leases
from llmjax.scaling.cluster.queue import JOBS, point_state, read_queue
from llmjax.storage import any_path, is_url, read_text

STATES = ("pending", "running", "stale", "done", "failed")
NO_WORKER = 4  # `--wait`'s exit status when points are left and no worker has been alive for the grace time


def sweep_status(directory: Any) -> dict[str, Any]:
    """{name, points: [point_state...], totals: {state: n}, accelerator_hours, hours_to_finish}."""
    directory = any_path(directory)
    sweep, settings = read_queue(directory)
    store = leases(directory)
    points = [point_state(directory, p, store, settings) for p in sweep.points]
    acc = float(settings["accelerators_per_worker"])
    now = time.time()
    spent, done_flops, done_seconds = 0.0, 0.0, 0.0
    for info in points:
        try:
            wall = float(read_text(directory / info["name"] / "WALL_TIME") or 0.0)
        except (OSError, ValueError):
            wall = 0.0
        if info["state"] in ("running", "stale"):
            wall += max(0.0, now - float(info.get("claimed", now)))
        if info["state"] == "done" and wall > 0:
            done_flops += info["flops"]
            done_seconds += wall
        spent += wall
    todo = sum(info["flops"] for info in points if info["state"] in ("pending", "running", "stale"))
    to_go = todo * done_seconds / done_flops * acc / 3600 if done_flops else None
    totals = {s: sum(1 for i in points if i["state"] == s) for s in STATES}
    return {"name": sweep.name, "directory": str(directory), "points": points, "totals": totals,
            "accelerators_per_worker": acc, "accelerator_hours": round(spent * acc / 3600, 4),
            "hours_to_finish": None if to_go is None else round(to_go, 4)}


def _detail(info: dict[str, Any]) -> str:
    s = info["state"]
    retry = f"{info['failures']} failed tries, last: {info.get('error', '')}" if info.get("failures") else ""
    if s == "done":
        loss = info.get("final_loss")
        return f"final loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
    if s == "failed":
        return str(info.get("error", ""))
    if s in ("running", "stale"):
        step = f"step {info['step'] + 1}/{info['steps']}" if "step" in info else f"starting ({info['steps']} steps)"
        loss = f", loss {info['loss']:.4f}" if isinstance(info.get("loss"), (int, float)) else ""
        eta = f", ETA {info['eta_seconds']:.0f}s" if "eta_seconds" in info and s == "running" else ""
        beat = f", no heartbeat for {info['heartbeat_age']:.0f}s" if s == "stale" else ""
        return f"{info['worker']}: {step}{loss}{eta}{beat}" + (f"; {retry}" if retry else "")
    return retry


def format_status(st: dict[str, Any]) -> str:
    """The table `sweep status` prints."""
    width = max([len(i["name"]) for i in st["points"]] + [5])
    lines = [f"{'point':<{width}}  {'state':<8} detail"]
    lines += [f"{i['name']:<{width}}  {i['state']:<8} {_detail(i)}".rstrip() for i in st["points"]]
    t = st["totals"]
    lines.append(f"{len(st['points'])} points: " + ", ".join(f"{t[s]} {s}" for s in STATES if t[s]))
    to_go = st["hours_to_finish"]
    lines.append(f"accelerator-hours: {st['accelerator_hours']:.3g} spent, "
                 + (f"~{to_go:.3g} to finish" if to_go is not None else "no estimate to finish yet (no point done)")
                 + f" ({st['accelerators_per_worker']:g} per worker)")
    return "\n".join(lines)


def slurm_jobs_queued(directory: Any) -> bool:
    """Whether a Slurm job recorded in DIR/jobs.json is still in the queue (pending or running); False
    without the file, without squeue, or when squeue fails (the jobs are long gone, or no controller)."""
    try:
        jobs = [str(int(j)) for j in json.loads(read_text(any_path(directory) / JOBS) or "[]")]
    except (OSError, ValueError, TypeError):
        return False
    squeue = shutil.which("squeue")
    if not jobs or squeue is None:
        return False
    try:
        r = subprocess.run([squeue, "-h", "-o", "%i", "-j", ",".join(jobs)], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and bool(r.stdout.strip())


def _signs_of_life(directory: Any, st: dict[str, Any]) -> float:
    """The newest time a worker showed it is alive: now when a point is running (a fresh lease) or a
    submitted Slurm job is queued, else the journal's last write (claims, retries, DONE), else 0."""
    if st["totals"]["running"] or slurm_jobs_queued(directory):
        return time.time()
    journal = any_path(directory) / LEASES
    if is_url(journal):  # one object per event, named by its time (worker.py _journal)
        try:
            names = [p.name for p in (journal / "journal").iterdir()]
            return max((float(n.split("-")[0]) for n in names), default=0.0)
        except (OSError, ValueError):
            return 0.0
    try:
        return (journal / "journal.jsonl").stat().st_mtime
    except OSError:
        return 0.0


def status_main(directory: Any, wait: bool = False, as_json: bool = False, every: float = 5.0,
                grace: float | None = None) -> int:
    """Print the status (once, or until every point is done or failed); 0 when all done, 1 when some
    failed, NO_WORKER when waiting and no worker has been alive for `grace` seconds (default: the
    sweep's lease time) while points are left."""
    alive = time.time()  # the last sign of a live worker (waiting starts with the benefit of the doubt)
    while True:
        st = sweep_status(directory)
        t = st["totals"]
        left = t["pending"] + t["stale"]
        finished = left + t["running"] == 0
        if not wait or finished:
            print(json.dumps(st, indent=1) if as_json else format_status(st), flush=True)
            return 0 if t["done"] == len(st["points"]) else 1
        limit = float(read_queue(directory)[1]["lease_seconds"]) if grace is None else grace
        alive = max(alive, _signs_of_life(directory, st))
        quiet = time.time() - alive
        if quiet > limit:
            print(json.dumps(st, indent=1) if as_json else format_status(st), flush=True)
            print(f"llmjax sweep status: {left} point(s) left and no worker alive for {quiet:.0f} s (--grace "
                  f"{limit:g}: no live lease, no journal entry, no submitted Slurm job queued); exit status "
                  f"{NO_WORKER}. Start workers again: llmjax sweep submit with the same --workdir, or llmjax sweep "
                  f"work {directory}", file=sys.stderr, flush=True)
            return NO_WORKER
        print(f"{time.strftime('%H:%M:%S')} {st['name']}: " + ", ".join(f"{t[s]} {s}" for s in STATES if t[s]),
              file=sys.stderr, flush=True)
        time.sleep(every)


__all__ = ["NO_WORKER", "format_status", "slurm_jobs_queued", "status_main", "sweep_status"]
