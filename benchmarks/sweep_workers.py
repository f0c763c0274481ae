"""Sweep workers on a local Slurm cluster: points per hour with 1, 2, 4 workers, and the per-point overhead
of claiming, leasing and `sweep status`.

    python3 benchmarks/sweep_workers.py [--workers 1,2,4] [--points 8] [--out DIR]

Starts a one-node cluster (launch/slurm_local.sh, as root; or uses $SLURM_CONF), writes a sweep spec of
tiny CPU models (`--points` points of a few steps each: the time of a point is mostly the interpreter,
jax's start-up and the compile, as for any small point), submits it with `sweep submit --workers W
--gpus-per-worker 0` for each W and times submission to the last point done. Then, without Slurm, it
times the lease operations themselves (claim + heartbeat + release of one point, `point_state` and a
whole `sweep status`) on the local file system. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _spec(tmp: Path, points: int) -> Path:
    import yaml
    from helpers import small_corpus, tiny_train_overrides

    corpus = small_corpus(tmp / "corpus")
    overrides = tiny_train_overrides(corpus) + ["sample.max_new_tokens=0", "eval.batches=1",
                                                "checkpoint.every_steps=0"]
    spec = {"name": "bench", "overrides": overrides, "warmup_fraction": 0.1,
            "shapes": [{"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}],
            "grid": {"tokens": [(8 + i) * 8 * 32 for i in range(points)]}}
    path = tmp / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(spec: Path, directory: Path, workers: int, env: dict[str, str]) -> dict[str, float]:
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "llmjax.cli", "sweep", "submit", str(spec), "--executor", "slurm",
                        "--workers", str(workers), "--gpus-per-worker", "0", "--workdir", str(directory),
                        "--lease-seconds", "60"], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    r = subprocess.run([sys.executable, "-m", "llmjax.cli", "sweep", "status", str(directory), "--wait", "--every",
                        "0.5"], env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(r.stdout + r.stderr)
    events = [json.loads(line) for line in (directory / ".leases" / "journal.jsonl").read_text().splitlines()]
    gaps = []  # a worker's "done" to its next "claim": claiming and marking between two points
    last: dict[str, float] = {}
    for e in events:
        if e["event"] == "claim" and e["worker"] in last:
            gaps.append(e["time"] - last.pop(e["worker"]))
        elif e["event"] == "done":
            last[e["worker"]] = e["time"]
    n = sum(1 for e in events if e["event"] == "done")
    return {"workers": workers, "points": n, "wall_s": round(wall, 1), "points_per_hour": round(n / wall * 3600, 1),
            "done_to_next_claim_s": round(sum(gaps) / len(gaps), 4) if gaps else None}


def _lease_costs(tmp: Path, spec: Path, repeat: int = 200) -> dict[str, float]:
    from llmjax.scaling.cluster.lease import Lease, LocalLeases
    from llmjax.scaling.cluster.queue import point_state, read_queue
    from llmjax.scaling.cluster.status import sweep_status

    directory = tmp / "bench-slurm-1"  # a finished sweep: status reads every point's files
    sweep, settings = read_queue(directory)
    leases = LocalLeases(tmp / "leases-only")
    t0 = time.perf_counter()
    for i in range(repeat):
        lease = Lease(f"p{i}", "bench")
        assert leases.claim(lease) and leases.heartbeat(lease)
        leases.release(lease)
    cycle = (time.perf_counter() - t0) / repeat
    t0 = time.perf_counter()
    for _ in range(repeat // 10):
        for p in sweep.points:
            point_state(directory, p, LocalLeases(directory), settings)
    state = (time.perf_counter() - t0) / (repeat // 10 * len(sweep.points))
    t0 = time.perf_counter()
    for _ in range(10):
        sweep_status(directory)
    status = (time.perf_counter() - t0) / 10
    return {"claim_heartbeat_release_s": round(cycle, 6), "point_state_s": round(state, 6),
            "sweep_status_s": round(status, 4), "status_points": len(sweep.points)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--out", help="keep the sweeps here (default: a temporary directory)")
    args = ap.parse_args()
    tmp = Path(args.out or tempfile.mkdtemp(prefix="sweep-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cluster = None
    if "SLURM_CONF" not in env:
        cluster = tmp / "slurm"
        r = subprocess.run([str(ROOT / "launch" / "slurm_local.sh"), "up", str(cluster)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise SystemExit(r.stderr)
        env["SLURM_CONF"] = str(cluster / "slurm.conf")
    try:
        spec = _spec(tmp, args.points)
        runs = [_run(spec, tmp / f"bench-slurm-{w}", w, env) for w in (int(x) for x in args.workers.split(","))]
        print(json.dumps({"runs": runs, "lease": _lease_costs(tmp, spec), "cpus": os.cpu_count(),
                          "load": os.getloadavg()}, indent=1))
    finally:
        if cluster is not None:
            subprocess.run([str(ROOT / "launch" / "slurm_local.sh"), "down", str(cluster)], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
