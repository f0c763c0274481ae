"""`llmjax sweep run`: train every point of a sweep spec.

Every point of a spec is trained in order, each by a `llmjax train` subprocess (the same
command `--dry-run` prints) in `WORKDIR/<point name>`. A point is finished when its `DONE`
marker exists, or when its metrics.jsonl has the train record of the last step and the final
eval record (a DONE marker is then written). An interrupted point is simply run again: the
trainer resumes from its newest checkpoint. `WORKDIR/sweep.json` lists the points (budget,
steps, tokens, flops, hyperparameters, replicate and the point it replicates) for `collect`
(`scaling/sweep/collect.py`), keeping the points that other specs trained into the same directory
listed; each point's DONE marker repeats its budget, hyperparameters and replicate. The replicates
of a point (`replicates: R` in the spec, `scaling/sweep/replicates.py`) are points of their own.

With `--pack K` (`scaling/sweep/pack.py`) up to K unfinished points of one shape that differ only in
their seed or optimizer hyperparameters train together in one compiled program, each point's
directory written as if it had been trained alone.

A failing point stops the sweep (its exit status is returned), unless `keep_going`
(`--keep-going`, for hyperparameter grids where some learning rates diverge): the point then gets
a `FAILED` marker with its exit status and the sweep moves on; `collect` reports such points with
status `failed` (and `llmjax fit` leaves them out). Running the sweep again retries them.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmjax.scaling import ScalingError
from llmjax.scaling.sweep.axes import describe as describe_axes
from llmjax.scaling.sweep.collect import CSV_COLUMNS, FAILED, collect, is_finished
from llmjax.scaling.sweep.pack import describe_packs, plan_packs, run_pack
from llmjax.scaling.sweep.spec import Sweep, launch_command, point_config


def run_sweep(sweep: Sweep, workdir: str | Path, dry_run: bool = False, prefix: str = "",
              keep_going: bool = False, pack: int = 1, pack_mode: str = "auto") -> int:
    """Train every point in order; returns 0, or the first failing point's exit status (with
    `keep_going`: 1 if any point failed, after trying every point).

    A cooldown branch (`point.trunk`) first advances its trunk to the branch step (`train.stop_after`)
    and copies the trunk's run directory as its own, then trains its decay from there. `pack` > 1:
    up to that many points of one shape train together in one program (`scaling/sweep/pack.py`)."""
    workdir = Path(workdir)
    by_name = {p.name: p for p in sweep.points}
    if pack != 1:
        packs = plan_packs(sweep, sweep.points, pack, workdir)  # checks --pack before anything runs
    if dry_run:
        if pack != 1:
            print("\n".join(describe_packs(packs)))
        for p in sweep.points:
            if p.trunk:
                trunk = by_name[p.trunk]
                stop = dataclasses.replace(trunk, overrides=[*trunk.overrides, f"train.stop_after={p.branch_at}"])
                print(launch_command(sweep, stop, workdir, prefix))
                print(shlex.join(["cp", "-a", str(workdir / p.trunk), str(workdir / p.name)]))
            print(launch_command(sweep, p, workdir, prefix))
        return 0
    workdir.mkdir(parents=True, exist_ok=True)
    write_listing(workdir, sweep)
    if pack != 1:
        return _run_packed(sweep, workdir, pack, keep_going, by_name, pack_mode)
    n, failed = len(sweep.points), []
    for i, p in enumerate(sweep.points, 1):
        run_dir = workdir / p.name
        if is_finished(run_dir, p.steps):
            print(f"[{i}/{n}] {p.name}: finished, skipped", flush=True)
            write_done(run_dir, p, timed=False)
            continue
        rc = _run_point(sweep, p, by_name, workdir, f"[{i}/{n}]")
        if rc == 0:
            (run_dir / FAILED).unlink(missing_ok=True)
            continue
        if not keep_going:
            print(f"llmjax sweep: {p.name} exited with status {rc}; run the same command to resume", file=sys.stderr)
            return rc
        if run_dir.is_dir():
            (run_dir / FAILED).write_text(json.dumps({"exit_status": rc}))
        print(f"llmjax sweep: {p.name} exited with status {rc} (--keep-going: next point)", file=sys.stderr)
        failed.append(p.name)
    if failed:
        print(f"sweep {sweep.name}: {n - len(failed)} of {n} points done in {workdir}; failed: {', '.join(failed)}")
        return 1
    print(f"sweep {sweep.name}: {n} points done in {workdir}; next: llmjax sweep collect {workdir}")
    return 0


def _run_packed(sweep: Sweep, workdir: Path, k: int, keep_going: bool, by_name: dict[str, Any], mode: str) -> int:
    """`run_sweep` with `--pack k`: the unfinished points in packs (`scaling/sweep/pack.py`), a lone one as usual."""
    todo = []
    for p in sweep.points:
        if is_finished(workdir / p.name, p.steps):
            print(f"{p.name}: finished, skipped", flush=True)
            write_done(workdir / p.name, p, timed=False)
        else:
            todo.append(p)
    packs = plan_packs(sweep, todo, k, workdir)
    failed: list[str] = []
    for i, group in enumerate(packs, 1):
        counter = f"[{i}/{len(packs)}]"
        if len(group) == 1:
            statuses = {group[0].name: _run_point(sweep, group[0], by_name, workdir, counter)}
        else:
            statuses = run_pack(sweep, group, workdir, counter, _add_wall_time, mode)
        bad = []
        for p in group:
            rc, run_dir = statuses[p.name], workdir / p.name
            if rc == 0:
                (run_dir / FAILED).unlink(missing_ok=True)
                if len(group) > 1:
                    write_done(run_dir, p, timed=True)
                continue
            bad.append((p.name, rc))
            if keep_going and run_dir.is_dir():
                (run_dir / FAILED).write_text(json.dumps({"exit_status": rc}))
        for name, rc in bad:
            print(f"llmjax sweep: {name} exited with status {rc}" + (" (--keep-going: next point)" if keep_going
                  else "; run the same command to resume"), file=sys.stderr)
        if bad and not keep_going:
            return bad[0][1]
        failed += [name for name, _ in bad]
    n = len(sweep.points)
    if failed:
        print(f"sweep {sweep.name}: {n - len(failed)} of {n} points done in {workdir}; failed: {', '.join(failed)}")
        return 1
    print(f"sweep {sweep.name}: {n} points done in {workdir} ({len(todo)} trained in {len(packs)} packs of up to "
          f"{k}); next: llmjax sweep collect {workdir}")
    return 0


def _run_point(sweep: Sweep, p: Any, by_name: dict[str, Any], workdir: Path, counter: str,
               call: Callable[[list[str]], int] = subprocess.call, mark: bool = True) -> int:
    """Train (or resume, or branch and train) one point; its trainer's exit status. `call` runs a command
    (the sweep workers' runs it with a heartbeat, scaling/cluster/worker.py); `mark`: write DONE after a
    successful run (the workers write it themselves, once they have checked that the lease is still theirs)."""
    run_dir = workdir / p.name
    if p.trunk and not (run_dir / "checkpoints").is_dir():
        print(f"{counter} {p.name}: branching from {p.trunk} at step {p.branch_at}", flush=True)
        rc = _branch(sweep, by_name[p.trunk], p, workdir, call)
        if rc != 0:
            print(f"llmjax sweep: trunk {p.trunk} exited with status {rc}", file=sys.stderr)
            return rc
    resume = (run_dir / "checkpoints").is_dir()
    print(f"{counter} {p.name}: {'resuming' if resume else 'training'} {p.steps} steps, "
          f"{p.tokens:,} tokens, {p.flops:.3g} FLOPs", flush=True)
    rc = _train(sweep, p.overrides, run_dir, call)
    if rc == 0 and mark:
        write_done(run_dir, p, timed=True)
    return rc


def _train(sweep: Sweep, overrides: list[str], run_dir: Path,
           call: Callable[[list[str]], int] = subprocess.call) -> int:
    """One `llmjax train` subprocess in `run_dir`, its time added to the directory's WALL_TIME."""
    cmd = [sys.executable, "-m", "llmjax.cli", "train"]
    if sweep.base:
        cmd += ["--config", sweep.base]
    cmd += ["--workdir", str(run_dir), *overrides]
    t0 = time.time()
    rc = call(cmd)
    _add_wall_time(run_dir, time.time() - t0)
    return rc


def _checkpoint_steps(run_dir: Path) -> list[int]:
    ckpts = run_dir / "checkpoints"
    return sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit()) if ckpts.is_dir() else []


def _branch(sweep: Sweep, trunk: Any, point: Any, workdir: Path,
            call: Callable[[list[str]], int] = subprocess.call) -> int:
    """Advance the trunk to `point.branch_at` and copy its run directory to the point's (atomically)."""
    trunk_dir, run_dir = workdir / trunk.name, workdir / point.name
    rc = _train(sweep, [*trunk.overrides, f"train.stop_after={point.branch_at}"], trunk_dir, call)
    if rc != 0:
        return rc
    if point.branch_at not in _checkpoint_steps(trunk_dir):
        raise ScalingError(f"{trunk_dir} has no checkpoint at step {point.branch_at} to branch {point.name} from "
                           f"(it has {_checkpoint_steps(trunk_dir)}): the trunk went past the branch point; "
                           f"train {point.name} on its own or delete {trunk_dir}")
    tmp = workdir / f".{point.name}.copy"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(trunk_dir, tmp, ignore=shutil.ignore_patterns("DONE", "WALL_TIME", "tensorboard"))
    for step in _checkpoint_steps(tmp):  # the branch starts from the branch point, not a later step
        if step > point.branch_at:
            shutil.rmtree(tmp / "checkpoints" / str(step))
    shutil.rmtree(run_dir, ignore_errors=True)
    tmp.rename(run_dir)
    return 0


def _add_wall_time(run_dir: Path, seconds: float) -> None:
    """Accumulate the seconds spent in `llmjax train` for a point (every attempt) in WALL_TIME."""
    if run_dir.is_dir():
        path = run_dir / "WALL_TIME"
        try:
            before = float(path.read_text())
        except (OSError, ValueError):
            before = 0.0
        path.write_text(f"{before + seconds:.3f}\n")


def write_listing(workdir: Path, sweep: Sweep) -> None:
    """Write WORKDIR/sweep.json listing the sweep's points (`_write_listing`)."""
    _write_listing(workdir, sweep, [{"name": p.name, "budget": p.budget, "steps": p.steps, "tokens": p.tokens,
                                     "flops": p.flops, "shape": p.shape, "hyperparameters": p.hyperparameters,
                                     "overrides": p.overrides, "replicate": p.replicate,
                                     "point": p.replicate_of or p.name} for p in sweep.points])


def _write_listing(workdir: Path, sweep: Sweep, listing: list[dict[str, Any]]) -> None:
    """Write WORKDIR/sweep.json, keeping the points another spec listed there before (several specs may
    train into one directory, e.g. a grid widened where its optima fell on an edge)."""
    path = workdir / "sweep.json"
    names = {p["name"] for p in listing}
    try:
        before = json.loads(path.read_text()).get("points", [])
    except (OSError, ValueError, AttributeError):
        before = []
    kept = [p for p in before if isinstance(p, dict) and p.get("name") not in names]
    path.write_text(json.dumps({"name": sweep.name, "base": sweep.base, "axes": describe_axes(sweep.axes),
                                "points": kept + listing}, indent=1))


def write_done(run_dir: Path, point: Any, timed: bool) -> None:
    """Mark a point finished (with its accumulated wall time when the runner timed it)."""
    if not run_dir.is_dir() or (not timed and (run_dir / "DONE").is_file()):
        return
    info: dict[str, Any] = {"budget": point.budget, "steps": point.steps, "hyperparameters": point.hyperparameters,
                            "replicate": point.replicate, "point": point.replicate_of or point.name}
    try:
        info["wall_time"] = float((run_dir / "WALL_TIME").read_text())
    except (OSError, ValueError):
        pass  # not trained by `sweep run`: collect falls back to the step times
    (run_dir / "DONE").write_text(json.dumps(info))


__all__ = ["CSV_COLUMNS", "FAILED", "collect", "is_finished", "point_config", "run_sweep", "write_done",
           "write_listing"]
