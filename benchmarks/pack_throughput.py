"""Throughput of `llmjax sweep run --pack K` against one point at a time, in points per hour.

    python3 benchmarks/pack_throughput.py [SPEC] [WORKDIR] [ROUNDS]

Trains SPEC (default experiments/sweeps/pack_bench.yaml: 8 points of one small shape) from scratch
with --pack 1 (one `llmjax train` subprocess per point, as without --pack), --pack 4 and --pack 8
(the default mode: `map` on CPU) and --pack 8 --pack-mode vmap,
ROUNDS times (default 1) in alternation, each into a fresh directory, and prints each mode's wall
time (the whole `sweep run` command: process start-up, data, compilation, training, evaluation,
checkpoints) and points per hour. A benchmark, not a test: report it with the machine's load
(`uptime`, printed before and after).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    spec = sys.argv[1] if len(sys.argv) > 1 else "experiments/sweeps/pack_bench.yaml"
    root = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/pack_bench")
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    modes = [("1", []), ("4", []), ("8", []), ("8", ["--pack-mode", "vmap"])]
    times: dict[str, list[float]] = {" ".join([k, *extra]): [] for k, extra in modes}
    points = 0
    for r in range(rounds):
        for k, extra in modes:
            label = " ".join([k, *extra])
            workdir = root / f"round{r}_pack{k}{'_'.join(['', *extra[1:]])}"
            shutil.rmtree(workdir, ignore_errors=True)
            t0 = time.time()
            subprocess.run([sys.executable, "-m", "llmjax.cli", "sweep", "run", spec, "--workdir", str(workdir),
                            "--pack", k, *extra], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[label].append(time.time() - t0)
            points = sum(1 for d in workdir.iterdir() if (d / "DONE").is_file())
            print(f"round {r} --pack {label}: {points} points in {times[label][-1]:.1f}s", flush=True)
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    base = sum(times["1"]) / len(times["1"])
    for k, ts in times.items():
        mean = sum(ts) / len(ts)
        print(f"--pack {k}: {mean:.1f}s for {points} points = {points * 3600 / mean:.0f} points/hour "
              f"({base / mean:.2f}x one at a time)")


if __name__ == "__main__":
    main()
