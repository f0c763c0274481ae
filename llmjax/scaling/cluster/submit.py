"""`llmjax sweep submit SPEC --executor slurm|tpu --workers N`: start a sweep's workers on a cluster.

Slurm: one job array of N identical workers (at most one per point) through launch/slurm_submit.sh,
which wraps launch/slurm_gpu.sbatch: the workers get its environment hook (--venv, --env-setup,
container), its jax.distributed wiring for multi-node workers and its requeue after a preemption
or the time limit (a requeued worker simply starts claiming again). Each task runs
`llmjax sweep work DIR --resources SHAPE`. Plain `sbatch` through our script rather than
submitit: submitit pickles a Python callable into a job per call, needs the same Python
environment on the submitting machine, and its own requeue/checkpointing duplicates what the
sbatch script already does; a job array of a shell command keeps the submission inspectable
(`--dry-run` prints it) and runnable by hand.

Resource shapes: a point that sets explicit mesh sizes needs their product of devices; a point
whose mesh takes "the remaining devices" (-1) fits any worker. Points are grouped by the devices
they need (the worker's full `--nodes-per-worker` x `--gpus-per-worker`, or fewer GPUs on one node),
one array per group. A point needing more devices than a worker has is an error, as are a missing
Slurm, an unknown partition and a sweep directory of another spec: one line, exit status 2,
nothing submitted.

TPU VMs: `--executor tpu` starts N workers through launch/tpu_pod.sh --workers N (one queued-resource
slice each, every host of a slice running the worker; process 0 claims, tpu_pod.sh tells each host
the slice's host count). The sweep directory is a gs:// URL (`--workdir gs://bucket/sweep`: queue,
leases, markers and the points' run directories all on GCS; TPU VMs share no file system) or a file
system every slice mounts (e.g. Filestore via tpu_pod.sh --setup). Slurm workers take a gs:// sweep
directory too; their logs then go to ./logs/sweep-<name>/ on the submitting machine's file system
(Slurm writes them; it cannot write to gs://).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from llmjax.scaling import ScalingError
from llmjax.scaling.cluster.queue import JOBS, check_directory, write_queue
from llmjax.scaling.sweep.spec import Point, Sweep, point_config
from llmjax.storage import any_path, check_backend, is_url, read_text, write_atomic

ROOT = Path(__file__).resolve().parents[3]
MESH_AXES = ("pipeline", "data", "fsdp", "expert", "tensor")


def devices_needed(sweep: Sweep, p: Point) -> int | None:
    """The devices a point's mesh asks for (product of its explicit sizes and dcn sizes), None when an
    axis takes the remaining devices (-1: the point fits any worker)."""
    mesh = point_config(sweep, p).mesh
    sizes = [getattr(mesh, a) for a in MESH_AXES]
    if any(s == -1 for s in sizes):
        return None
    return math.prod(sizes) * math.prod(getattr(mesh, f"dcn_{a}") for a in MESH_AXES)


def resource_groups(sweep: Sweep, nodes: int, gpus: int) -> dict[str, list[Point]]:
    """{'<nodes>x<gpus per node>': points} (module docstring); ScalingError when a point needs more."""
    groups: dict[str, list[Point]] = {}
    for p in sweep.points:
        n = devices_needed(sweep, p) if gpus > 0 else None
        if n is not None and n > nodes * gpus:
            raise ScalingError(f"sweep submit: point {p.name} needs {n} GPUs (its mesh), a worker has {nodes * gpus} "
                               f"(--nodes-per-worker {nodes} x --gpus-per-worker {gpus})")
        if n is None or n > gpus:
            key = f"{nodes if n is None else math.ceil(n / gpus)}x{gpus}"
        else:
            key = f"1x{n}"
        groups.setdefault(key, []).append(p)
    return groups


def _slurm_checks(partition: str | None) -> None:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise ScalingError("sweep submit --executor slurm: Slurm's sbatch/sinfo are not on this machine's PATH")
    r = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise ScalingError(f"sweep submit --executor slurm: sinfo cannot reach a Slurm controller ({last})")
    partitions = {line.strip().rstrip("*") for line in r.stdout.splitlines() if line.strip()}
    if partition and partition not in partitions:
        raise ScalingError(f"sweep submit: unknown --partition {partition!r} (this cluster has: "
                           f"{', '.join(sorted(partitions))})")


def _logs(directory: Any, name: str) -> Path:
    """Where the Slurm workers' logs go: DIR/logs, or ./logs/sweep-NAME for a gs:// DIR (module docstring)."""
    return Path("logs").resolve() / f"sweep-{name}" if is_url(directory) else Path(os.fspath(directory)) / "logs"


def slurm_commands(args: Any, directory: Any, groups: dict[str, list[Point]]) -> list[list[str]]:
    """One launch/slurm_submit.sh command per resource group."""
    cmds = []
    for key, points in groups.items():
        nodes, gpus = (int(x) for x in key.split("x"))
        workers = min(args.workers, len(points) if args.pack <= 1 else math.ceil(len(points) / args.pack))
        cmd = [str(ROOT / "launch" / "slurm_submit.sh"), "--nodes", str(nodes), "--gpus-per-node", str(gpus),
               "--per-node" if gpus == 0 else "--per-gpu", "--array", f"0-{workers - 1}",
               "--job-name", f"sweep-{args.sweep_name}", "--time", args.time,
               "--output", str(_logs(directory, args.sweep_name) / "worker-%A_%a.out")]
        for flag, value in (("--partition", args.partition), ("--account", args.account), ("--venv", args.venv),
                            ("--env-setup", args.env_setup), ("--container-image", args.container),
                            ("--container-mounts", args.container_mounts), ("--cpus-per-task", args.cpus_per_task)):
            if value:
                cmd += [flag, str(value)]
        cmd += ["--", *args.python, "-m", "llmjax.cli", "sweep", "work", str(directory), "--resources", key]
        cmds.append(cmd)
    return cmds


def tpu_command(args: Any, directory: Any) -> list[str]:
    """The launch/tpu_pod.sh command that starts `--workers` slices, one worker each."""
    cmd = [str(ROOT / "launch" / "tpu_pod.sh"), "--name", args.tpu_name or f"sweep-{args.sweep_name}".lower()
           .replace("_", "-"), "--workers", str(args.workers), "--type", args.tpu_type, "--detach"]
    for flag, value in (("--zone", args.zone), ("--project", args.project), ("--setup", args.env_setup)):
        if value:
            cmd += [flag, value]
    return [*cmd, "run", "--", "llmjax", "sweep", "work", str(directory)]


def _record_jobs(directory: Any, jobs: list[str]) -> None:
    """Append the submitted Slurm job ids to DIR/jobs.json, for `sweep status --wait` to ask squeue whether
    a worker is still queued or running."""
    if not jobs:
        return
    path = any_path(directory) / JOBS
    try:
        before = [str(j) for j in json.loads(read_text(path) or "[]")]
    except (OSError, ValueError, TypeError):
        before = []
    write_atomic(path, json.dumps(before + jobs))


def submit(args: Any, sweep: Sweep) -> int:
    """Check everything, write DIR/queue.json, submit (or print, --dry-run); 0."""
    if args.workers < 1:
        raise ScalingError(f"sweep submit: --workers must be >= 1, got {args.workers}")
    if args.lease_seconds <= 0 or args.retries < 0 or args.pack < 1:
        raise ScalingError("sweep submit: --lease-seconds must be > 0, --retries >= 0, --pack >= 1")
    if args.gpus_per_worker < 0 or args.nodes_per_worker < 1:
        raise ScalingError("sweep submit: --gpus-per-worker must be >= 0 and --nodes-per-worker >= 1")
    branched = [p.name for p in sweep.points if p.trunk]
    if branched:
        raise ScalingError(f"sweep submit: cooldown branches ({branched[0]}, ...) share their trunk's directory and "
                           "are not claimed by workers; train this spec with `llmjax sweep run`")
    directory = any_path(args.workdir or Path("runs") / "sweeps" / sweep.name)
    if not is_url(directory):
        directory = directory.resolve()
    args.sweep_name = sweep.name
    check_backend(directory)  # ConfigError (exit 2) for gs:// without gcsfs
    check_directory(sweep, directory)
    gpus = args.gpus_per_worker
    groups = resource_groups(sweep, args.nodes_per_worker, gpus)
    if args.executor == "slurm":
        if not args.dry_run:
            _slurm_checks(args.partition)
        cmds = slurm_commands(args, directory, groups)
    else:
        cmds = [tpu_command(args, directory)]
    accelerators = max(1, args.nodes_per_worker * gpus)
    settings = {"lease_seconds": args.lease_seconds, "retries": args.retries, "pack": args.pack,
                "accelerators_per_worker": accelerators, "resources": {p.name: k for k, ps in groups.items()
                                                                         for p in ps}}
    if args.dry_run:
        print("\n".join(shlex.join(c) for c in cmds))
        return 0
    write_queue(sweep, directory, settings)
    if args.executor == "slurm":
        _logs(directory, sweep.name).mkdir(parents=True, exist_ok=True)
    for cmd in cmds:
        r = subprocess.run(cmd, text=True, capture_output=True)
        sys.stdout.write(r.stdout)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise ScalingError(f"sweep submit: {Path(cmd[0]).name} failed (exit status {r.returncode}): {last}")
        _record_jobs(directory, re.findall(r"Submitted batch job (\d+)", r.stdout))
    print(f"sweep {sweep.name}: {len(sweep.points)} points queued in {directory} for {args.workers} workers; "
          f"watch with: llmjax sweep status {directory}")
    return 0


__all__ = ["devices_needed", "resource_groups", "submit"]
