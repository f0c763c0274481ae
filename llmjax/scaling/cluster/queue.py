"""A submitted sweep's queue (`DIR/queue.json`) and the state of each of its points.

`sweep submit` writes the queue: the spec's points in order (every override resolved, so the
workers need neither the spec file nor its base path to be where they were) and the settings the
workers share (lease time, retries, pack size, accelerators per worker). `point_state` tells what a
point is doing from the files alone (markers, lease, metrics), for the workers and `sweep status`.

The directory is local (a shared file system) or a gs:// URL: every file here is read and written
through `llmjax.storage` (etils.epath; queue.json replaced whole, `write_atomic`), and the points'
run directories are DIR/<point> on the same storage, where the trainer writes them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from llmjax.scaling import ScalingError
from llmjax.scaling.cluster.lease import Leases
from llmjax.scaling.sweep.collect import DONE, FAILED, is_finished, marker
from llmjax.scaling.sweep.spec import Point, Sweep
from llmjax.storage import any_path, read_text, write_atomic

QUEUE = "queue.json"
JOBS = "jobs.json"  # the Slurm job ids `sweep submit` submitted (a list, appended to on resubmission)
SETTINGS = {"lease_seconds": 600.0, "retries": 2, "pack": 1, "accelerators_per_worker": 1}


def fingerprint(sweep: Sweep) -> str:
    """What makes two submissions the same sweep: the base config and every point's name and overrides."""
    text = json.dumps([sweep.base, [(p.name, p.overrides) for p in sweep.points]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_directory(sweep: Sweep, directory: Any) -> None:
    """ScalingError unless `directory` (local or gs://) is new, or already holds this very sweep (a
    resubmission)."""
    directory = any_path(directory)
    queue = directory / QUEUE
    text = read_text(queue)
    if text is not None:
        try:
            before = json.loads(text)
        except ValueError as e:
            raise ScalingError(f"sweep submit: cannot read {queue}: {e}") from None
        if before.get("fingerprint") != fingerprint(sweep):
            raise ScalingError(f"sweep submit: {directory} holds another sweep ({before.get('name')!r}, queue "
                               f"{before.get('fingerprint')}; this spec is {sweep.name!r}, {fingerprint(sweep)}): "
                               "choose another --workdir")
        return
    listing = read_text(directory / "sweep.json")
    if listing is not None:
        try:
            name = json.loads(listing).get("name")
        except (ValueError, AttributeError):
            name = None
        if name != sweep.name:
            raise ScalingError(f"sweep submit: {directory} holds sweep {name!r}, not {sweep.name!r}: choose "
                               "another --workdir")


def write_queue(sweep: Sweep, directory: Any, settings: dict[str, Any]) -> Any:
    """Write DIR/queue.json (atomically) and DIR/sweep.json (for `sweep collect`); local or gs://."""
    from llmjax.scaling.sweep.runner import write_listing

    directory = any_path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = {"name": sweep.name, "base": sweep.base, "spec": str(sweep.path), "fingerprint": fingerprint(sweep),
            "settings": {**SETTINGS, **settings}, "points": [dataclasses.asdict(p) for p in sweep.points]}
    write_atomic(directory / QUEUE, json.dumps(data, indent=1))
    write_listing(directory, sweep)
    return directory / QUEUE


def read_queue(directory: Any) -> tuple[Sweep, dict[str, Any]]:
    """(the sweep, its settings) from DIR/queue.json (local or gs://); ScalingError when there is none."""
    from llmjax.errors import ConfigError
    from llmjax.storage import check_backend

    try:
        check_backend(directory)
    except ConfigError as e:  # gs:// without gcsfs
        raise ScalingError(str(e)) from None
    path = any_path(directory) / QUEUE
    try:
        text = read_text(path)
        if text is None:
            raise ScalingError(f"{path} not found: not a submitted sweep (llmjax sweep submit SPEC --workdir "
                               f"{directory})")
        data = json.loads(text)
        points = [Point(**p) for p in data["points"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ScalingError(f"cannot read {path}: {e}") from None
    sweep = Sweep(data["name"], data.get("base"), points, Path(str(data.get("spec") or path)))
    return sweep, {**SETTINGS, **data.get("settings", {})}


def metric_records(run_dir: Any) -> list[dict[str, Any]]:
    """The train and eval records of a point's metrics.jsonl, tolerant of a line being written."""
    out: list[dict[str, Any]] = []
    try:
        lines = (run_dir / "metrics.jsonl").read_bytes().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("kind") in ("train", "eval"):
            out.append(rec)
    return out


def point_state(directory: Any, p: Point, leases: Leases, settings: dict[str, Any]) -> dict[str, Any]:
    """{state: done|failed|running|stale|pending, ...}: what `sweep status` shows of point `p`.

    done: a DONE marker, or the last step and final eval recorded and no lease (`marked` False: a worker
    stopped between its trainer's end and the marker; the next claimer writes it); a point whose
    trainer has finished while its worker still holds the lease is running until the worker marks it.

    failed: a FAILED marker and no lease (a worker gave up after `retries` retries, or `sweep run
    --keep-going`); a point whose earlier tries failed with retries left is pending or running, with
    `failures` and the last `error` line."""
    run_dir = directory / p.name
    info: dict[str, Any] = {"name": p.name, "steps": p.steps, "flops": p.flops}
    held = leases.read(p.name)
    marked = (run_dir / DONE).is_file()
    if marked or (held is None and is_finished(run_dir, p.steps)):  # finished, its worker gone before marking
        evals = [r for r in metric_records(run_dir) if r["kind"] == "eval" and "eval_loss" in r]
        info.update(state="done", final_loss=evals[-1]["eval_loss"] if evals else None, marked=marked)
        return info
    failures, error = leases.failures(p.name)
    if failures:
        info.update(failures=failures, error=error)
    if held is None and (run_dir / FAILED).is_file():
        failed = marker(run_dir, FAILED)
        info.update(state="failed", error=failed.get("error") or error or f"exit status {failed.get('exit_status')}")
        return info
    if held is None:
        info["state"] = "pending"
        return info
    lease, age = held
    records = [r for r in metric_records(run_dir) if r["kind"] == "train"]
    info.update(state="stale" if age > settings["lease_seconds"] else "running", worker=lease.worker,
                host=lease.host, heartbeat_age=round(age, 1), claimed=lease.claimed)
    if records:
        last = records[-1]
        times = [float(r["step_time"]) for r in records[-20:] if "step_time" in r]
        info.update(step=int(last["step"]), loss=last.get("loss"))
        if times:
            info["eta_seconds"] = round(sum(times) / len(times) * max(0, p.steps - 1 - int(last["step"])), 1)
    return info


__all__ = ["JOBS", "QUEUE", "SETTINGS", "check_directory", "fingerprint", "point_state", "read_queue", "write_queue"]
