"""`llmjax sweep collect DIR`: one `runs.csv` row per run directory.

A run directory is a sub-directory with `config.yaml` and `metrics.jsonl`. Columns (`CSV_COLUMNS`,
then one column per hyperparameter):
  params, non_embedding_params  `param_counts` of the model's abstract parameters;
  active_params                 parameters one token uses (= params for dense models, top_k/num_experts
                                of the routed experts for MoE);
  tokens                        last train step + 1 times batch_size x seq_len;
  flops                         flops_per_token(model, seq_len) x tokens (the project's formula);
  flops_xla                     XLA's cost analysis of the compiled train step (run_info.json) per
                                token x tokens; empty where that figure undercounts (scanned layers,
                                gradient accumulation, pipeline: see llmjax/train/telemetry/run_info.py) or is
                                missing;
  final_loss, best_loss         the last and the lowest eval_loss (nats per token);
  final_bpb, best_bpb           the same in bits per UTF-8 byte of the validation text:
                                loss / ln 2 / eval_bytes_per_token (run_info.json; empty for runs
                                from before the trainer wrote it);
  wall_time                     seconds spent in `llmjax train` for the point, summed over every
                                attempt (WALL_TIME, copied to DONE), else the sum of the train
                                records' step_time (a run not started by `sweep run`);
  budget                        the point's IsoFLOP budget from sweep.json or its DONE marker (empty
                                otherwise);
  status                        done (the last step and the final eval are recorded), failed (a
                                FAILED marker from `sweep run --keep-going`, e.g. a diverged
                                learning rate) or unfinished (`point_status`); `llmjax fit` uses `done`
                                rows only;
  d_model, n_layers             the model's shape;
  replicate, seed, point        which of the spec's `replicates` (0 with one), the run's `seed`, and the
                                name its replicates share (the run's own name with one replicate):
                                `llmjax fit` averages the loss over the rows of one `point`;
  <hyperparameters>             `HPARAM_COLUMNS` (optim.lr, train.batch_size, optim.warmup_steps,
                                optim.b2, from each run's config) and every other axis of the
                                sweep (sweep.json), named by their config keys;
  workdir                       the run directory, relative to the CSV (for approach 1's curves).

A partial sweep (some points of `sweep.json` not done: unfinished, failed or not started) is
collected all the same: the line `partial sweep: K of M points done; missing ...` names the others
(`partial_line`), and `llmjax fit` / `llmjax plot` say the same from the CSV and the sweep.json
beside it (`scaling/laws/runs.py`).

DIR may be a gs:// URL (a sweep whose workers wrote there, `scaling/cluster`): the run directories are
read through llmjax.storage (DIR/<point>/config.yaml: one level, as the workers write them; an object
store has no cheap recursive listing), `workdir` is then the run's URL, and `--out` may be local.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from llmjax.scaling import ScalingError
from llmjax.storage import any_path, is_url, read_text, relative

CSV_COLUMNS = ("name", "params", "non_embedding_params", "active_params", "tokens", "flops", "flops_xla",
               "final_loss", "best_loss", "final_bpb", "best_bpb", "wall_time", "budget", "status", "d_model",
               "n_layers", "replicate", "seed", "point")
HPARAM_COLUMNS = ("optim.lr", "train.batch_size", "optim.warmup_steps", "optim.b2")
DONE, FAILED = "DONE", "FAILED"


def read_metrics(path: Any, kind: str) -> dict[int, dict[str, Any]]:
    """`kind` records of a metrics.jsonl by step ({} when the file is absent)."""
    from llmjax.train.telemetry.metrics import read_metrics as read

    return read(path, kind) if path.is_file() else {}


def marker(run_dir: Any, name: str) -> dict[str, Any]:
    """The JSON of a DONE or FAILED marker ({} when absent or unreadable)."""
    try:
        data = json.loads((run_dir / name).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def point_status(run_dir: Any, steps: int, train: dict[int, Any] | None = None,
                 evals: dict[int, Any] | None = None) -> str:
    """A point's state from its run directory: `done` (a DONE marker, or the train record of the last
    step and the final eval record), `failed` (a FAILED marker), `unfinished` (a directory without
    either) or `pending` (no directory). `train`/`evals`: the metrics' records when already read."""
    if (run_dir / DONE).is_file():
        return "done"
    metrics = run_dir / "metrics.jsonl"
    train = read_metrics(metrics, "train") if train is None else train
    if (steps - 1) in train and steps in (read_metrics(metrics, "eval") if evals is None else evals):
        return "done"
    if (run_dir / FAILED).is_file():
        return "failed"
    return "unfinished" if run_dir.is_dir() else "pending"


def is_finished(run_dir: Any, steps: int) -> bool:
    return point_status(run_dir, steps) == "done"


def sweep_progress(listed: list[str], statuses: dict[str, str]) -> dict[str, Any] | None:
    """{total, done, missing: {name: status}} over the points a sweep lists (`listed`, from sweep.json)
    and the runs seen (`statuses`: name -> status; a listed point not seen is `pending`); None when
    every point is done."""
    names = list(dict.fromkeys([*listed, *statuses]))
    missing = {n: statuses.get(n, "pending") for n in names if statuses.get(n) != "done"}
    if not missing:
        return None
    return {"total": len(names), "done": len(names) - len(missing), "missing": missing}


def partial_line(progress: dict[str, Any], limit: int = 20) -> str:
    """One line: `partial sweep: K of M points done; missing J: a (unfinished), b (pending), ...`."""
    missing = progress["missing"]
    shown = ", ".join(f"{n} ({s})" for n, s in list(missing.items())[:limit])
    more = f", ... ({len(missing) - limit} more)" if len(missing) > limit else ""
    return (f"partial sweep: {progress['done']} of {progress['total']} points done; missing {len(missing)}: "
            f"{shown}{more}")


def config_value(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def collect_row(run_dir: Any, points: dict[str, dict[str, Any]], relative_to: Any) -> dict[str, Any] | None:
    """The runs.csv row of one run directory, or None if it has no eval record yet."""
    from llmjax.config import load_config
    from llmjax.models.families import build_family
    from llmjax.scaling.sweep.spec import model_param_counts
    from llmjax.train.telemetry.metrics import flops_per_token
    from llmjax.train.telemetry.run_info import read_run_info

    cfg = load_config(run_dir / "config.yaml")
    metrics = run_dir / "metrics.jsonl"
    train = read_metrics(metrics, "train")
    evals = read_metrics(metrics, "eval")
    if not train or not evals:
        return None
    last_step = max(train)
    tokens = (last_step + 1) * cfg.train.batch_size * build_family(cfg.model).tokens_per_example(cfg.data.seq_len)
    losses = [float(evals[s]["eval_loss"]) for s in sorted(evals)]
    finite = [x for x in losses if math.isfinite(x)]
    counts = model_param_counts(cfg)
    wall = marker(run_dir, DONE).get("wall_time")
    if wall is None:
        wall = sum(float(r.get("step_time", 0.0)) for r in train.values())
    point = points.get(run_dir.name) or marker(run_dir, DONE)  # sweep.json, else the DONE marker
    info = read_run_info(run_dir)
    xla = info.get("xla_flops_per_token") if info.get("xla_flops_exact") else None
    bpt = info.get("eval_bytes_per_token")
    bpb = (lambda loss: loss / math.log(2) / bpt) if bpt else (lambda loss: "")
    status = point_status(run_dir, cfg.train.steps, train, evals)
    best = min(finite) if finite else float("nan")
    row = {
        "name": run_dir.name,
        "params": counts["total"],
        "non_embedding_params": counts["non_embedding"],
        "active_params": counts["active"],
        "tokens": tokens,
        "flops": flops_per_token(cfg.model, cfg.data.seq_len) * tokens,
        "flops_xla": "" if xla is None else float(xla) * tokens,
        "final_loss": losses[-1],
        "best_loss": best,
        "final_bpb": bpb(losses[-1]),
        "best_bpb": bpb(best),
        "wall_time": round(float(wall), 3),
        "budget": "" if point.get("budget") is None else float(point["budget"]),
        "status": status,
        "d_model": cfg.model.d_model,
        "n_layers": cfg.model.n_layers,
        "replicate": int(point.get("replicate") or 0),
        "seed": cfg.seed,
        "point": point.get("point") or run_dir.name,
        "workdir": relative(run_dir, relative_to),
    }
    for key in HPARAM_COLUMNS:
        row[key] = config_value(cfg, key)
    for key, value in (point.get("hyperparameters") or {}).items():
        row[key] = config_value(cfg, key) if "." in key or hasattr(cfg, key) else value
    return row


def listed_points(directory: Any) -> dict[str, dict[str, Any]]:
    """The points DIR/sweep.json lists, by name ({} without one)."""
    listing = any_path(directory) / "sweep.json"
    text = read_text(listing)
    if text is None:
        return {}
    try:
        return {p["name"]: p for p in json.loads(text).get("points", []) if "name" in p}
    except (ValueError, TypeError, KeyError) as e:
        raise ScalingError(f"sweep collect: cannot read {listing}: {e}") from None


def collect(dir_or_url: Any, out: Any = None, export: str | Path | None = None) -> Any:
    """Write `out` (default DIR/runs.csv) from the run directories under `directory`.

    With `export`, write EXPORT/runs.csv instead, and copy each run's config.yaml, run_info.json and a
    trimmed metrics.jsonl (evals, and train losses averaged over at most 250 bins of steps) to
    EXPORT/runs/<name>/, the CSV's `workdir` column pointing there: a small, self-contained copy of
    the sweep's results (approach 1 included). DIR and `out` may be gs:// URLs (module docstring)."""
    directory: Any = any_path(dir_or_url)  # a pathlib.Path, or an etils.epath.Path for gs://
    if not directory.is_dir():
        raise ScalingError(f"sweep collect: {directory} is not a directory")
    if export is not None:
        out = Path(export) / "runs.csv"
    out = any_path(out) if out else directory / "runs.csv"
    points = listed_points(directory)
    configs = directory.glob("*/config.yaml") if is_url(directory) else directory.rglob("config.yaml")
    run_dirs = sorted(d for d in configs if (d.parent / "metrics.jsonl").is_file())
    if export is not None and not is_url(directory):  # an earlier export inside the sweep directory is not a run
        run_dirs = [d for d in run_dirs if Path(export).resolve() not in d.resolve().parents]
    rows, skipped = [], []
    for cfg_path in run_dirs:
        row = collect_row(cfg_path.parent, points, out.parent)
        if row and export is not None:
            row["workdir"] = _export_run(cfg_path.parent, Path(export) / "runs" / row["name"], out.parent)
        (rows.append(row) if row else skipped.append(cfg_path.parent.name))
    if not rows:
        raise ScalingError(f"sweep collect: no finished run under {directory} (directories with config.yaml, "
                           "metrics.jsonl and an eval record)")
    extra = [k for r in rows for k in r if k not in CSV_COLUMNS and k != "workdir"]
    columns = [*CSV_COLUMNS, *dict.fromkeys(extra), "workdir"]
    out.parent.mkdir(parents=True, exist_ok=True)
    f = io.StringIO(newline="")
    w = csv.DictWriter(f, fieldnames=columns, restval="")
    w.writeheader()
    w.writerows(rows)
    out.write_text(f.getvalue())
    note = f" (skipped, no eval record: {', '.join(skipped)})" if skipped else ""
    bad = [r["name"] for r in rows if r["status"] != "done"]
    if bad:
        note += f"; not done (status failed/unfinished, left out by `llmjax fit`): {', '.join(bad)}"
    print(f"wrote {out}: {len(rows)} runs{note}")
    progress = sweep_progress(list(points), {**{n: "unfinished" for n in skipped}, **{r["name"]: r["status"]
                                                                                      for r in rows}})
    if progress and points:
        print(partial_line(progress))
    return out


def _export_run(run_dir: Any, dest: Path, relative_to: Any, max_points: int = 250) -> str:
    """Copy a run's config.yaml, run_info.json, its eval records and its train losses averaged over bins
    of consecutive steps (at most `max_points` bins, each recorded at its last step, so the curve keeps
    its averaging and its final step) to `dest`; -> dest relative to the CSV."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "run_info.json", DONE, FAILED):
        if name == "config.yaml" or (run_dir / name).is_file():
            (dest / name).write_bytes((run_dir / name).read_bytes())
    train = read_metrics(run_dir / "metrics.jsonl", "train")
    evals = read_metrics(run_dir / "metrics.jsonl", "eval")
    losses = [(s, float(r["loss"])) for s, r in sorted(train.items()) if "loss" in r]
    stride = max(1, math.ceil(len(losses) / max_points))
    records = [{"kind": "eval", "step": s, "eval_loss": r["eval_loss"]} for s, r in sorted(evals.items())]
    for i in range(0, len(losses), stride):
        chunk = losses[i:i + stride]
        records.append({"kind": "train", "step": chunk[-1][0], "loss": sum(v for _, v in chunk) / len(chunk)})
    (dest / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return relative(dest, relative_to)


__all__ = ["CSV_COLUMNS", "HPARAM_COLUMNS", "collect", "collect_row", "is_finished", "listed_points", "marker",
           "partial_line", "point_status", "read_metrics", "sweep_progress"]
