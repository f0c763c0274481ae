"""A runs CSV -> `Runs`: the (N, D, L, C) of every run, with the fit options that choose them.

Columns: `params`, `tokens` and a loss are required; the rest are optional (`sweep collect`
writes all of them, see `scaling/sweep/collect.py`). The options (`llmjax fit --params/--loss/--flops`):

- `params`: `total` (column `params`), `non_embedding` (`non_embedding_params`, Kaplan et al.'s N)
  or `active` (`active_params`: what one token uses, for MoE).
- `loss`: a column name; default `loss`, else `final_loss`. `final_bpb`/`best_bpb` are the
  same losses in bits per byte of the validation text (comparable across tokenizers).
- `flops`: `formula` (the `flops` column, the project's flops_per_token x tokens; 6·N·D when the
  column is absent), `xla` (`flops_xla`: XLA's cost analysis of the compiled step) or `6nd`
  (6·N·D with the chosen N).

Rows whose `status` is not `done` (failed or unfinished runs of `sweep run --keep-going`) are left
out. IsoFLOP budgets: the `budget` column, else flops that agree within 1%.

Replicates (`replicates: R` in a sweep spec): rows that share a `point` value are runs of one point
with different seeds; they become one row whose loss is their mean, `replicate_losses` keeping each
replicate's loss (for the replicate bootstrap of `scaling/laws/replicates.py` and the plots' error
bars) and `replicate_workdirs` their run directories (approach 1 averages their curves). They must
agree in N and tokens. A CSV without a `point` column, or where every point has one row, is
read exactly as before.

Partial sweeps: `progress` counts the points not done, from the CSV's `status` and the `sweep.json`
beside the CSV (points it lists that have no row are `pending`): `partial_line` of
`scaling/sweep/collect.py` words it.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llmjax.scaling import ScalingError
from llmjax.scaling.sweep.collect import listed_points, partial_line, sweep_progress

BUDGET_TOLERANCE = 0.01
PARAMS_COLUMNS = {"total": "params", "non_embedding": "non_embedding_params", "active": "active_params"}
FLOPS_CHOICES = ("formula", "xla", "6nd")


def loss_unit(column: str) -> str:
    """The unit of a loss column, for axis labels."""
    return "bits/byte" if column.endswith("bpb") else "nats/token"


@dataclass
class Runs:
    names: list[str]
    N: np.ndarray
    D: np.ndarray
    L: np.ndarray
    C: np.ndarray
    budget: np.ndarray  # group id (an index into `budgets`) per row, -1: in no budget
    budgets: np.ndarray  # nominal C of each budget
    workdirs: list[str] | None
    base_dir: Path
    flops_given: bool
    columns: dict[str, list[str]] = field(default_factory=dict)  # every CSV column, raw text per row
    options: dict[str, str] = field(default_factory=dict)  # params, loss, flops as chosen
    notes: list[str] = field(default_factory=list)  # rows left out and why
    replicate_losses: list[np.ndarray] | None = None  # per row: the loss of each replicate (L is their mean)
    replicate_workdirs: list[list[str]] | None = None  # per row: each replicate's run directory
    progress: dict | None = None  # a partial sweep's {total, done, missing: {name: status}} (None: complete)

    def subset(self, mask: np.ndarray) -> Runs:
        idx = np.flatnonzero(mask)
        used = sorted({int(self.budget[i]) for i in idx if self.budget[i] >= 0})
        remap = {old: new for new, old in enumerate(used)}
        return Runs([self.names[i] for i in idx], self.N[idx], self.D[idx], self.L[idx], self.C[idx],
                    np.array([remap.get(int(b), -1) for b in self.budget[idx]], int), self.budgets[used],
                    [self.workdirs[i] for i in idx] if self.workdirs is not None else None, self.base_dir,
                    self.flops_given, {k: [v[i] for i in idx] for k, v in self.columns.items()}, self.options,
                    list(self.notes),
                    [self.replicate_losses[i] for i in idx] if self.replicate_losses is not None else None,
                    [self.replicate_workdirs[i] for i in idx] if self.replicate_workdirs is not None else None,
                    self.progress)

    @property
    def k(self) -> float:
        """FLOPs per parameter per token: median of C / (N·D)."""
        return float(np.median(self.C / (self.N * self.D)))

    @property
    def loss_unit(self) -> str:
        return loss_unit(self.options.get("loss", "loss"))

    def numeric(self, column: str) -> np.ndarray | None:
        """A column as floats (NaN where empty or not a number), or None when the CSV lacks it."""
        if column not in self.columns:
            return None
        out = np.full(len(self.names), np.nan)
        for i, text in enumerate(self.columns[column]):
            try:
                out[i] = float(text)
            except ValueError:
                pass
        return out


def _float(value: str, row: int, column: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ScalingError(f"runs CSV: row {row}: column '{column}' is not a number: {value!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise ScalingError(f"runs CSV: row {row}: column '{column}' must be positive and finite, got {value!r}")
    return x


def group_budgets(C: np.ndarray, tolerance: float = BUDGET_TOLERANCE) -> tuple[np.ndarray, np.ndarray]:
    """Group ids of flops values that agree within `tolerance` (relative to the group's smallest)."""
    order = np.argsort(C)
    ids = np.empty(len(C), int)
    nominal: list[float] = []
    start = None
    for i in order:
        if start is None or C[i] > start * (1 + tolerance):
            start = C[i]
            nominal.append(C[i])
        ids[i] = len(nominal) - 1
    for g in range(len(nominal)):  # nominal C: the geometric mean of the group
        nominal[g] = float(np.exp(np.mean(np.log(C[ids == g]))))
    return ids, np.array(nominal)


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    if not path.is_file():
        raise ScalingError(f"runs CSV not found: {path}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = list(reader)
    except UnicodeDecodeError as e:
        raise ScalingError(f"runs CSV {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except (OSError, csv.Error) as e:
        raise ScalingError(f"runs CSV {path}: cannot read it ({e})") from None
    for i, r in enumerate(rows):
        if None in r:  # DictReader puts the values past the header under the key None
            raise ScalingError(f"runs CSV {path}: row {i + 2} has {len(header) + len(r[None])} fields, the header "
                               f"{len(header)}")
    return header, [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in rows]


def _choose_columns(path: Path, header: list[str], params: str, loss: str | None, flops: str) -> tuple[str, str]:
    if params not in PARAMS_COLUMNS:
        raise ScalingError(f"--params: expected one of {', '.join(PARAMS_COLUMNS)}, got {params!r}")
    if flops not in FLOPS_CHOICES:
        raise ScalingError(f"--flops: expected one of {', '.join(FLOPS_CHOICES)}, got {flops!r}")
    n_col = PARAMS_COLUMNS[params]
    if params != "total" and n_col not in header:
        raise ScalingError(f"runs CSV {path}: --params {params} needs the column '{n_col}', which it lacks (have "
                           f"{header}; `llmjax sweep collect` writes it)")
    loss_col = loss or ("loss" if "loss" in header else "final_loss" if "final_loss" in header else None)
    if loss and loss not in header:
        raise ScalingError(f"runs CSV {path}: --loss {loss}: no such column (have {header})")
    missing = [c for c in ("params", "tokens") if c not in header and not (c == "params" and params != "total")]
    missing += [] if loss_col else ["loss"]
    if missing:
        raise ScalingError(f"runs CSV {path}: missing column(s) {missing} (have {header}; 'final_loss' is "
                           "accepted as 'loss')")
    if flops == "xla" and "flops_xla" not in header:
        raise ScalingError(f"runs CSV {path}: --flops xla needs the column 'flops_xla', which it lacks (runs "
                           "collected from a trainer that records run_info.json have it)")
    assert loss_col is not None
    return n_col, loss_col


def load_runs(path: str | Path, params: str = "total", loss: str | None = None, flops: str = "formula") -> Runs:
    """Read and check a runs CSV, or DIR/runs.csv for a directory (see the module docstring for the columns and
    options)."""
    path = Path(path)
    if path.is_dir():  # a sweep directory: the runs.csv that `sweep collect DIR` wrote there
        if not (path / "runs.csv").is_file():
            raise ScalingError(f"runs CSV not found: {path / 'runs.csv'} (run `llmjax sweep collect {path}` first)")
        path = path / "runs.csv"
    header, rows = _read(path)
    n_col, loss_col = _choose_columns(path, header, params, loss, flops)
    notes = []
    progress = _progress(path, rows)
    if "status" in header:
        bad = [r.get("name") or "?" for r in rows if r.get("status", "done") not in ("done", "")]
        if bad:
            notes.append(f"left out {len(bad)} runs whose status is not 'done': {', '.join(bad)}")
        rows = [r for r in rows if r.get("status", "done") in ("done", "")]
    if not rows:
        raise ScalingError(f"runs CSV {path}: no rows" + (f" ({notes[0]})" if notes else "")
                           + (f"; {partial_line(progress)}" if progress else ""))
    n = [_float(r[n_col], i + 2, n_col) for i, r in enumerate(rows)]
    d = [_float(r["tokens"], i + 2, "tokens") for i, r in enumerate(rows)]
    losses = [_float(r[loss_col], i + 2, loss_col) for i, r in enumerate(rows)]
    flops_given = flops == "xla" or (flops == "formula" and "flops" in header)
    if flops == "xla":
        empty = [r.get("name") or f"row {i + 2}" for i, r in enumerate(rows) if not r.get("flops_xla")]
        if empty:
            raise ScalingError(f"runs CSV {path}: --flops xla: 'flops_xla' is empty for {', '.join(empty[:5])}"
                               f"{' ...' if len(empty) > 5 else ''} (scanned layers or gradient accumulation, "
                               "where XLA's figure undercounts, or runs from before run_info.json)")
        c = [_float(r["flops_xla"], i + 2, "flops_xla") for i, r in enumerate(rows)]
    elif flops_given:
        c = [_float(r["flops"], i + 2, "flops") for i, r in enumerate(rows)]
    else:
        c = [6 * n[i] * d[i] for i in range(len(rows))]
        for i, x in enumerate(c):
            if not math.isfinite(x):
                raise ScalingError(f"runs CSV {path}: row {i + 2}: 6 x params x tokens = {x} overflows (give a "
                                   "'flops' column, or check the values)")
    N, D, L, C = (np.array(x, float) for x in (n, d, losses, c))
    if "budget" in header and all(r.get("budget") for r in rows):
        given = np.array([_float(r["budget"], i + 2, "budget") for i, r in enumerate(rows)])
        values = np.unique(given)
        budget = np.searchsorted(values, given)
        budgets = values.astype(float)
        if flops != "formula":  # the budgets are in formula FLOPs: restate them in the chosen FLOPs
            budgets = np.array([float(np.exp(np.mean(np.log(C[budget == g])))) for g in range(len(values))])
    else:
        budget, budgets = group_budgets(C)
    names = [r.get("name") or f"row{i + 2}" for i, r in enumerate(rows)]
    workdirs = [r.get("workdir", "") for r in rows] if "workdir" in header else None
    columns = {h: [r.get(h, "") for r in rows] for h in header}
    options = {"params": params, "loss": loss_col, "flops": flops}
    runs = Runs(names, N, D, L, C, budget, budgets, workdirs, path.parent, flops_given, columns, options, notes,
                progress=progress)
    return average_replicates(runs, path)


def _progress(path: Path, rows: list[dict[str, str]]) -> dict | None:
    """The points not done (module docstring), or None when every point is."""
    statuses = {r.get("name") or f"row{i + 2}": r.get("status") or "done" for i, r in enumerate(rows)}
    try:
        listed = list(listed_points(path.parent))
    except ScalingError:  # an unreadable sweep.json: the CSV alone says what is missing
        listed = []
    return sweep_progress(listed, statuses)


def average_replicates(runs: Runs, path: Path) -> Runs:
    """One row per `point` (module docstring): the mean loss of its replicates; `runs` itself when no
    point has more than one row."""
    points = runs.columns.get("point")
    if points is None:
        return runs
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(points):
        groups.setdefault(p or runs.names[i], []).append(i)
    if all(len(g) == 1 for g in groups.values()):
        return runs
    for p, g in groups.items():
        if len(set(runs.N[g])) > 1 or len(set(runs.D[g])) > 1:
            raise ScalingError(f"runs CSV {path}: the replicates of point {p!r} differ in params or tokens "
                               f"({', '.join(runs.names[i] for i in g)}): a replicate differs only in its seed")
    first = np.zeros(len(runs.L), bool)
    first[[g[0] for g in groups.values()]] = True
    out = runs.subset(first)  # keeps the rows' order: the groups are in order of their first row
    out.names = list(groups)
    out.replicate_losses = [runs.L[g] for g in groups.values()]
    out.L = np.array([float(np.mean(x)) for x in out.replicate_losses])
    if runs.workdirs is not None:
        out.replicate_workdirs = [[runs.workdirs[i] for i in g] for g in groups.values()]
    counts = sorted(len(g) for g in groups.values())
    out.notes.append(f"averaged {len(runs.L)} runs into {len(groups)} points ({counts[0]} to {counts[-1]} "
                     "replicates each)")
    return out


def describe_flops(runs: Runs) -> str:
    flops = runs.options.get("flops", "formula")
    if flops == "xla":
        return "flops_xla column (XLA cost analysis of the compiled train step)"
    if flops == "6nd":
        return f"6*N*D (N = {PARAMS_COLUMNS[runs.options['params']]})"
    return "flops column" if runs.flops_given else "6*N*D (no flops column)"


__all__ = ["BUDGET_TOLERANCE", "FLOPS_CHOICES", "PARAMS_COLUMNS", "Runs", "average_replicates", "describe_flops",
           "group_budgets", "load_runs", "loss_unit"]

