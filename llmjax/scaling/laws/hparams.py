"""The best run over the hyperparameters, per (N, D), and power laws of the optimal hyperparameters.

A sweep with hyperparameter axes (`scaling/sweep/axes.py`) trains every (N, D) point several times.
`llmjax fit --select best` (the default) fits the scaling laws to the best run of each point, as
Hoffmann et al. and Porian et al. 2024 do (a law fitted to runs at one learning rate for every size
measures that learning rate as much as the models).

- Configurations: rows with the same N and tokens within 1% (a batch-size axis rounds each run to
  whole steps).
- Axes: the hyperparameter columns (dotted config keys such as `optim.lr`, and `warmup_fraction`)
  that vary within some configuration, in `PRIORITY` order; a column that is a function of an
  earlier axis within every configuration is derived, not an axis (optim.warmup_steps follows
  train.batch_size when the warmup is a fraction of the steps). `--hparams a,b` names them instead.
- The optimum of an axis at a configuration: the best run's value, refined by a parabola in log10
  of the value through the best run and its two neighbours along the axis (the other axes held at
  the best run's values), its vertex kept within those neighbours. When the best run is at an end of
  the values tried, the optimum is only a bound (`at_edge`) and is left out of the laws.
- Laws (`LAW_AXES`: learning rate and batch size, as DeepSeek-AI 2024 and Porian et al. report
  them): optimum = coef·N^exponent (`vs_N`, N the fit's --params column) and coef·C^exponent
  (`vs_C`, C the training FLOPs; needs >= 2 distinct budgets), with 95% intervals of the exponent.
  A sweep spec can train with them: `law: fit.json` in `hyperparameters` (scaling/sweep/axes.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llmjax.scaling import ScalingError
from llmjax.scaling.laws.lse import power_law
from llmjax.scaling.laws.runs import BUDGET_TOLERANCE, PARAMS_COLUMNS, Runs, group_budgets

PRIORITY = ("optim.lr", "train.batch_size", "optim.b2", "optim.b1", "optim.weight_decay", "warmup_fraction",
            "optim.warmup_steps")
LAW_AXES = ("optim.lr", "train.batch_size")
SELECT_CHOICES = ("best", "all")


def configurations(runs: Runs) -> np.ndarray:
    """A configuration id per row: same N, tokens within 1%."""
    ids = np.full(len(runs.N), -1)
    next_id = 0
    for n in np.unique(runs.N):
        rows = np.flatnonzero(runs.N == n)
        sub, nominal = group_budgets(runs.D[rows], BUDGET_TOLERANCE)
        ids[rows] = next_id + sub
        next_id += len(nominal)
    return ids


def _candidates(runs: Runs) -> list[str]:
    cols = [c for c in runs.columns if ("." in c or c == "warmup_fraction") and c != "model.d_model"]
    return sorted(cols, key=lambda c: (PRIORITY.index(c) if c in PRIORITY else len(PRIORITY), c))


def _is_function_of(runs: Runs, groups: np.ndarray, y: str, x: str) -> bool:
    """Whether column y is determined by column x within every configuration."""
    seen: dict[tuple[int, str], str] = {}
    for g, xv, yv in zip(groups, runs.columns[x], runs.columns[y], strict=True):
        if seen.setdefault((int(g), xv), yv) != yv:
            return False
    return True


def detect_axes(runs: Runs, groups: np.ndarray, explicit: list[str] | None = None) -> list[str]:
    """The hyperparameter axes of the runs (module docstring), or the `explicit` ones, checked."""
    if explicit:
        missing = [c for c in explicit if c not in runs.columns]
        if missing:
            raise ScalingError(f"--hparams: no column(s) {missing} in the runs CSV (have {sorted(runs.columns)})")
        return list(explicit)
    axes: list[str] = []
    for col in _candidates(runs):
        values = runs.columns[col]
        varies = any(len({values[i] for i in np.flatnonzero(groups == g)}) > 1 for g in np.unique(groups))
        if varies and not any(_is_function_of(runs, groups, col, a) for a in axes):
            axes.append(col)
    return axes


def select_best(runs: Runs, groups: np.ndarray) -> np.ndarray:
    """Mask of the lowest-loss row of every configuration."""
    mask = np.zeros(len(runs.L), bool)
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        mask[rows[np.argmin(runs.L[rows])]] = True
    return mask


def refine_optimum(values: np.ndarray, losses: np.ndarray) -> tuple[float, bool]:
    """(optimum, at_edge) of one axis from (value, loss) pairs: the best value, refined by a parabola in
    log10(value) through it and its two neighbours (vertex kept between them)."""
    order = np.argsort(values)
    v, y = np.asarray(values, float)[order], np.asarray(losses, float)[order]
    x = np.log10(v)
    i = int(np.argmin(y))
    if i == 0 or i == len(x) - 1:
        return float(v[i]), True
    c2, c1, _ = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
    if c2 <= 0:
        return float(v[i]), False
    vertex = float(np.clip(-c1 / (2 * c2), x[i - 1], x[i + 1]))
    return float(10**vertex), False


def axis_optima(runs: Runs, groups: np.ndarray, axes: list[str], axis: str) -> list[dict[str, Any]]:
    """The optimum of `axis` at every configuration that tried >= 2 of its values."""
    values = runs.numeric(axis)
    if values is None or np.isnan(values).any() or (values <= 0).any():
        return []
    out = []
    others = [a for a in axes if a != axis]
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        best = rows[np.argmin(runs.L[rows])]
        line = [r for r in rows if all(runs.columns[a][r] == runs.columns[a][best] for a in others)]
        tried = np.unique(values[line])
        if len(tried) < 2:
            continue
        # one loss per value along the line (the best, should a value repeat)
        losses = np.array([min(runs.L[r] for r in line if values[r] == v) for v in tried])
        optimum, at_edge = refine_optimum(tried, losses)
        out.append({"N": float(runs.N[best]), "D": float(runs.D[best]), "C": float(runs.C[best]),
                    "best": float(values[best]), "optimum": optimum, "at_edge": at_edge,
                    "values_tried": len(tried), "best_run": runs.names[best], "loss": float(runs.L[best])})
    return out


def _law(x: np.ndarray, y: np.ndarray, of: str, what: str) -> dict[str, Any]:
    if len(np.unique(x)) < 2:
        return {"skipped": f"{what}: fewer than 2 distinct values"}
    return {**power_law(x, y), "of": of}


def hyperparameter_laws(runs: Runs, groups: np.ndarray, axes: list[str]) -> dict[str, Any]:
    """Per axis: the optima per configuration, and for `LAW_AXES` power laws vs N and vs C."""
    out: dict[str, Any] = {}
    n_of = PARAMS_COLUMNS[runs.options.get("params", "total")]
    flops = runs.options.get("flops", "formula")
    c_of = "flops" if flops == "formula" else f"flops_{flops}"
    for axis in axes:
        optima = axis_optima(runs, groups, axes, axis)
        entry: dict[str, Any] = {"optima": optima}
        if axis in LAW_AXES and optima:
            inner = [o for o in optima if not o["at_edge"]]
            edges = len(optima) - len(inner)
            if edges:
                entry["note"] = (f"{edges} of {len(optima)} optima at the end of the values tried (bounds, left out "
                                 "of the laws): widen the grid there")
            if len(inner) >= 2:
                y = np.array([o["optimum"] for o in inner])
                entry["vs_N"] = _law(np.array([o["N"] for o in inner]), y, n_of, "N")
                C = np.array([o["C"] for o in inner])
                _, budgets = group_budgets(C)
                entry["vs_C"] = (_law(C, y, c_of, "C") if len(budgets) >= 2 else
                                 {"skipped": "all optima at one compute budget: no law in C"})
            else:
                entry["skipped"] = f"{len(inner)} optima inside the values tried, need >= 2"
        out[axis] = entry
    return out


def apply_selection(runs: Runs, select: str, explicit: list[str] | None = None
                    ) -> tuple[Runs, dict[str, Any], dict[str, Any]]:
    """(runs to fit, the selection's summary, the hyperparameter laws) for `--select best|all`."""
    if select not in SELECT_CHOICES:
        raise ScalingError(f"--select: expected one of {', '.join(SELECT_CHOICES)}, got {select!r}")
    groups = configurations(runs)
    axes = detect_axes(runs, groups, explicit)
    summary: dict[str, Any] = {"select": select, "axes": axes, "configurations": int(len(np.unique(groups))),
                               "rows": len(runs.L)}
    laws = hyperparameter_laws(runs, groups, axes) if axes else {}
    if select == "best" and len(np.unique(groups)) < len(groups):
        mask = select_best(runs, groups)
        summary["kept"] = int(mask.sum())
        summary["note"] = f"per (N, D) the lowest-loss of {len(runs.L)} runs over {', '.join(axes) or 'repeats'}"
        return runs.subset(mask), summary, laws
    summary["kept"] = len(runs.L)
    return runs, summary, laws


__all__ = ["LAW_AXES", "SELECT_CHOICES", "apply_selection", "axis_optima", "configurations", "detect_axes",
           "hyperparameter_laws", "refine_optimum", "select_best"]
