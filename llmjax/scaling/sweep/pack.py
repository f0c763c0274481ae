"""`llmjax sweep run --pack K`: train up to K points of one shape together (`llmjax.scaling.sweep.multipoint`).

The unfinished points of a sweep are grouped by everything but the packable hyperparameters
(`train.packed.PACKABLE`: seed, learning rate, b1, b2, weight decay) and by the step they would
resume from, in spec order; each group is cut into packs of at most K points. A pack of several
points trains in this process, one compiled program for all of them; a point alone trains as
without `--pack` (a `llmjax train` subprocess). Points of different shapes (or step counts, batch
sizes, parametrizations, ...) never share a pack. Each point's directory then looks as if it
had been trained alone (metrics.jsonl, checkpoints, run_info.json, config.yaml), its DONE marker
and WALL_TIME (its share of the pack's time: the pack's wall time / its points) are written as
by the one-at-a-time runner, and a point whose loss turns non-finite gets a FAILED marker.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from llmjax.scaling import ScalingError
from llmjax.scaling.sweep.spec import Point, Sweep, point_config


def _resume_step(run_dir: Path) -> int:
    ckpts = run_dir / "checkpoints"
    steps = [int(d.name) for d in ckpts.iterdir() if d.name.isdigit()] if ckpts.is_dir() else []
    return max(steps, default=0)


def plan_packs(sweep: Sweep, points: list[Point], k: int, workdir: Path) -> list[list[Point]]:
    """Packs of at most `k` points that can share a program (module docstring), in spec order."""
    from llmjax.scaling.sweep.multipoint import pack_key

    if k < 1:
        raise ScalingError(f"--pack must be >= 1, got {k}")
    branched = [p.name for p in points if p.trunk]
    if branched and k > 1:
        raise ScalingError(f"--pack: cooldown branches are not packed ({branched[0]} branches from {points[0].trunk});"
                           " run this spec without --pack")
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        key = (pack_key(point_config(sweep, p)), _resume_step(workdir / p.name))
        groups.setdefault(key, []).append(p)
    packs = []
    for group in groups.values():
        packs += [group[i:i + k] for i in range(0, len(group), k)]
    order = {p.name: i for i, p in enumerate(points)}
    return sorted(packs, key=lambda pack: order[pack[0].name])


def run_pack(sweep: Sweep, pack: list[Point], workdir: Path, counter: str,
             add_wall_time: Callable[[Path, float], None], mode: str = "auto") -> dict[str, int]:
    """Train the points of `pack` together in this process (`mode`: `train.packed.PACK_MODES`); {point name:
    exit status}."""
    from llmjax.runtime import setup_jax
    from llmjax.scaling.sweep.multipoint_loop import train_packed

    configs = [point_config(sweep, p) for p in pack]
    setup_jax(configs[0])
    p0 = pack[0]
    print(f"{counter} pack of {len(pack)}: {', '.join(p.name for p in pack)}: {p0.steps} steps, "
          f"{p0.tokens:,} tokens each", flush=True)
    t0 = time.time()
    statuses = train_packed(configs, [workdir / p.name for p in pack], mode=mode)
    share = (time.time() - t0) / len(pack)
    for p in pack:
        add_wall_time(workdir / p.name, share)
    return {p.name: rc for p, rc in zip(pack, statuses, strict=True)}


def describe_packs(packs: list[list[Point]]) -> list[str]:
    """One '# pack: a b c' line per pack of several points (for --dry-run)."""
    return [f"# pack of {len(pack)}: {' '.join(p.name for p in pack)}" for pack in packs if len(pack) > 1]


def failed_marker(run_dir: Path, rc: int, failed: str) -> None:
    if run_dir.is_dir():
        (run_dir / failed).write_text(json.dumps({"exit_status": rc}))


__all__ = ["describe_packs", "plan_packs", "run_pack"]

