"""`llmjax sweep run` and `llmjax sweep collect`.

Run: every point of a spec is trained in order, each by a `llmjax train` subprocess (the same
command `--dry-run` prints) in `WORKDIR/<point name>`. A point is finished when its `DONE`
marker exists, or when its metrics.jsonl has the train record of the last step and the final
eval record (a DONE marker is then written). An interrupted point is simply run again: the
trainer resumes from its newest checkpoint. `WORKDIR/sweep.json` lists the points (budget,
steps, tokens, flops) for `collect`.

Collect: one `runs.csv` row per run directory (a sub-directory with `config.yaml` and
`metrics.jsonl`), columns `CSV_COLUMNS`:
  params, non_embedding_params  `param_counts` of the model's abstract parameters;
  active_params                 parameters one token uses (`param_counts(..., model)["active"]`:
                                = params for dense models, top_k/num_experts of the experts for MoE);
  tokens                        last train step + 1 times batch_size x seq_len;
  flops                         flops_per_token(model, seq_len) x tokens;
  final_loss, best_loss         the last and the lowest eval_loss;
  wall_time                     seconds spent in `llmjax train` for the point, summed over every
                                attempt (WALL_TIME, copied to DONE), else the sum of the train
                                records' step_time (a run not started by `sweep run`);
  budget                        the point's IsoFLOP budget from sweep.json (empty otherwise);
  workdir                       the run directory, relative to the CSV (for approach 1's curves).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmjax.scaling import ScalingError
from llmjax.scaling.spec import Sweep, launch_command, point_config

CSV_COLUMNS = ("name", "params", "non_embedding_params", "active_params", "tokens", "flops", "final_loss",
               "best_loss", "wall_time", "budget", "workdir")


def _read_metrics(path: Path, kind: str) -> dict[int, dict[str, Any]]:
    from llmjax.train.metrics import read_metrics

    return read_metrics(path, kind) if path.is_file() else {}


def is_finished(run_dir: Path, steps: int) -> bool:
    if (run_dir / "DONE").is_file():
        return True
    metrics = run_dir / "metrics.jsonl"
    return (steps - 1) in _read_metrics(metrics, "train") and steps in _read_metrics(metrics, "eval")


def _done_info(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / "DONE").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def run_sweep(sweep: Sweep, workdir: str | Path, dry_run: bool = False, prefix: str = "") -> int:
    """Train every point in order; returns 0, or the first failing point's exit status.

    A cooldown branch (`point.trunk`) first advances its trunk to the branch step (`train.stop_after`)
    and copies the trunk's run directory as its own, then trains its decay from there."""
    workdir = Path(workdir)
    by_name = {p.name: p for p in sweep.points}
    if dry_run:
        for p in sweep.points:
            if p.trunk:
                trunk = by_name[p.trunk]
                stop = dataclasses.replace(trunk, overrides=[*trunk.overrides, f"train.stop_after={p.branch_at}"])
                print(launch_command(sweep, stop, workdir, prefix))
                print(shlex.join(["cp", "-a", str(workdir / p.trunk), str(workdir / p.name)]))
            print(launch_command(sweep, p, workdir, prefix))
        return 0
    workdir.mkdir(parents=True, exist_ok=True)
    listing = [{"name": p.name, "budget": p.budget, "steps": p.steps, "tokens": p.tokens, "flops": p.flops,
                "shape": p.shape, "overrides": p.overrides} for p in sweep.points]
    (workdir / "sweep.json").write_text(json.dumps({"name": sweep.name, "base": sweep.base, "points": listing},
                                                   indent=1))
    n = len(sweep.points)
    for i, p in enumerate(sweep.points, 1):
        run_dir = workdir / p.name
        if is_finished(run_dir, p.steps):
            print(f"[{i}/{n}] {p.name}: finished, skipped", flush=True)
            _write_done(run_dir, p, timed=False)
            continue
        if p.trunk and not (run_dir / "checkpoints").is_dir():
            print(f"[{i}/{n}] {p.name}: branching from {p.trunk} at step {p.branch_at}", flush=True)
            rc = _branch(sweep, by_name[p.trunk], p, workdir)
            if rc != 0:
                print(f"llmjax sweep: trunk {p.trunk} exited with status {rc}; run the same command to resume",
                      file=sys.stderr)
                return rc
        resume = (run_dir / "checkpoints").is_dir()
        print(f"[{i}/{n}] {p.name}: {'resuming' if resume else 'training'} {p.steps} steps, "
              f"{p.tokens:,} tokens, {p.flops:.3g} FLOPs", flush=True)
        rc = _train(sweep, p.overrides, run_dir)
        if rc != 0:
            print(f"llmjax sweep: {p.name} exited with status {rc}; run the same command to resume", file=sys.stderr)
            return rc
        _write_done(run_dir, p, timed=True)
    print(f"sweep {sweep.name}: {n} points done in {workdir}; next: llmjax sweep collect {workdir}")
    return 0


def _train(sweep: Sweep, overrides: list[str], run_dir: Path) -> int:
    """One `llmjax train` subprocess in `run_dir`, its time added to the directory's WALL_TIME."""
    cmd = [sys.executable, "-m", "llmjax.cli", "train"]
    if sweep.base:
        cmd += ["--config", sweep.base]
    cmd += ["--workdir", str(run_dir), *overrides]
    t0 = time.time()
    rc = subprocess.call(cmd)
    _add_wall_time(run_dir, time.time() - t0)
    return rc


def _checkpoint_steps(run_dir: Path) -> list[int]:
    ckpts = run_dir / "checkpoints"
    return sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit()) if ckpts.is_dir() else []


def _branch(sweep: Sweep, trunk: Any, point: Any, workdir: Path) -> int:
    """Advance the trunk to `point.branch_at` and copy its run directory to the point's (atomically)."""
    trunk_dir, run_dir = workdir / trunk.name, workdir / point.name
    rc = _train(sweep, [*trunk.overrides, f"train.stop_after={point.branch_at}"], trunk_dir)
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


def _write_done(run_dir: Path, point: Any, timed: bool) -> None:
    """Mark a point finished (with its accumulated wall time when the runner timed it)."""
    if not run_dir.is_dir() or (not timed and (run_dir / "DONE").is_file()):
        return
    info: dict[str, Any] = {"budget": point.budget, "steps": point.steps}
    try:
        info["wall_time"] = float((run_dir / "WALL_TIME").read_text())
    except (OSError, ValueError):
        pass  # not trained by `sweep run`: collect falls back to the step times
    (run_dir / "DONE").write_text(json.dumps(info))


# ----------------------------------------------------------------------------- collect


def _model_params(cfg: Any) -> dict[str, int]:
    from llmjax.train.metrics import param_counts
    from llmjax.train.setup import model_abstract_params

    params = model_abstract_params(cfg.model)
    return param_counts(params.shapes, params.logical, cfg.model)


def collect_row(run_dir: Path, budgets: dict[str, float], relative_to: Path) -> dict[str, Any] | None:
    """The runs.csv row of one run directory, or None if it has no eval record yet."""
    from llmjax.config import load_config
    from llmjax.train.metrics import flops_per_token

    cfg = load_config(run_dir / "config.yaml")
    metrics = run_dir / "metrics.jsonl"
    train = _read_metrics(metrics, "train")
    evals = _read_metrics(metrics, "eval")
    if not train or not evals:
        return None
    last_step = max(train)
    tokens = (last_step + 1) * cfg.train.batch_size * cfg.data.seq_len
    losses = [float(evals[s]["eval_loss"]) for s in sorted(evals)]
    finite = [x for x in losses if math.isfinite(x)]
    counts = _model_params(cfg)
    wall = _done_info(run_dir).get("wall_time")
    if wall is None:
        wall = sum(float(r.get("step_time", 0.0)) for r in train.values())
    budget = budgets.get(run_dir.name)
    return {
        "name": run_dir.name,
        "params": counts["total"],
        "non_embedding_params": counts["non_embedding"],
        "active_params": counts["active"],
        "tokens": tokens,
        "flops": flops_per_token(cfg.model, cfg.data.seq_len) * tokens,
        "final_loss": losses[-1],
        "best_loss": min(finite) if finite else float("nan"),
        "wall_time": round(float(wall), 3),
        "budget": "" if budget is None else budget,
        "workdir": os.path.relpath(run_dir, relative_to),
    }


def collect(directory: str | Path, out: str | Path | None = None, export: str | Path | None = None) -> Path:
    """Write `out` (default DIR/runs.csv) from the run directories under `directory`.

    With `export`, write EXPORT/runs.csv instead, and copy each run's config.yaml and a trimmed
    metrics.jsonl (evals, and train losses averaged over at most 250 bins of steps) to
    EXPORT/runs/<name>/, the CSV's `workdir` column pointing there: a small, self-contained copy of
    the sweep's results (approach 1 included)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ScalingError(f"sweep collect: {directory} is not a directory")
    if export is not None:
        out = Path(export) / "runs.csv"
    out = Path(out) if out else directory / "runs.csv"
    budgets: dict[str, float] = {}
    listing = directory / "sweep.json"
    if listing.is_file():
        for p in json.loads(listing.read_text()).get("points", []):
            if p.get("budget") is not None:
                budgets[p["name"]] = float(p["budget"])
    run_dirs = sorted(d for d in directory.rglob("config.yaml") if (d.parent / "metrics.jsonl").is_file())
    rows, skipped = [], []
    for cfg_path in run_dirs:
        row = collect_row(cfg_path.parent, budgets, out.parent)
        if row and export is not None:
            row["workdir"] = _export_run(cfg_path.parent, Path(export) / "runs" / row["name"], out.parent)
        (rows.append(row) if row else skipped.append(cfg_path.parent.name))
    if not rows:
        raise ScalingError(f"sweep collect: no finished run under {directory} (directories with config.yaml, "
                           "metrics.jsonl and an eval record)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    note = f" (skipped, no eval record: {', '.join(skipped)})" if skipped else ""
    print(f"wrote {out}: {len(rows)} runs{note}")
    return out


def _export_run(run_dir: Path, dest: Path, relative_to: Path, max_points: int = 250) -> str:
    """Copy a run's config.yaml, its eval records and its train losses averaged over bins of
    consecutive steps (at most `max_points` bins, each recorded at its last step, so the curve keeps
    its averaging and its final step) to `dest`; -> dest relative to the CSV."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run_dir / "config.yaml", dest / "config.yaml")
    train = _read_metrics(run_dir / "metrics.jsonl", "train")
    evals = _read_metrics(run_dir / "metrics.jsonl", "eval")
    losses = [(s, float(r["loss"])) for s, r in sorted(train.items()) if "loss" in r]
    stride = max(1, math.ceil(len(losses) / max_points))
    records = [{"kind": "eval", "step": s, "eval_loss": r["eval_loss"]} for s, r in sorted(evals.items())]
    for i in range(0, len(losses), stride):
        chunk = losses[i:i + stride]
        records.append({"kind": "train", "step": chunk[-1][0], "loss": sum(v for _, v in chunk) / len(chunk)})
    (dest / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return os.path.relpath(dest, relative_to)


__all__ = ["CSV_COLUMNS", "collect", "is_finished", "run_sweep", "point_config"]
