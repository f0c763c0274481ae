"""Hyperparameter figures: the fitted optimal-hyperparameter laws and the learning-rate transfer plot.

- `plot_hparam_laws` (`hparams.png`, from `llmjax plot --fit`): for the learning rate and the batch
  size, the optimum at each (N, D) configuration (filled; hollow where it is only a bound, at the end
  of the values tried) against N and (when the optima span several budgets) against C, with the
  fitted power laws and their 95% bands.
- `lr_transfer_table` / `plot_lr_transfer` (`lr_transfer.png`, `llmjax plot --kind lr-transfer`):
  loss against learning rate, one curve per width (`d_model`), one panel per parametrization
  (`model.parametrization`, "standard" where the CSV has no such column), each width's best
  learning rate starred. Under a parametrization whose optimum transfers across widths (μP) the
  stars line up; under standard parametrization they drift. Failed runs (status not `done`,
  e.g. diverged) are drawn as crosses at the top of their panel, which shows losses up to the 90th
  percentile (the worst learning rates run off the top).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from llmjax.scaling import ScalingError
from llmjax.scaling.laws.hparams import LAW_AXES
from llmjax.scaling.laws.lse import law_at, law_interval
from llmjax.scaling.laws.runs import group_budgets, loss_unit

LABELS = {"optim.lr": "learning rate", "train.batch_size": "batch size (sequences)"}


def _save(fig: Any, out: Path, stem: str) -> list[Path]:
    from llmjax.scaling.plots import save

    return save(fig, out, stem)


def log_scale(ax: Any, which: str) -> None:
    from llmjax.scaling.plots import log_scale as scale

    scale(ax, which)


def plot_hparam_laws(plt: Any, fit: dict[str, Any], out: Path) -> list[Path]:
    laws = fit.get("hyperparameters") or {}
    keys = [k for k in LAW_AXES if (laws.get(k) or {}).get("optima")]
    if not keys:
        return []
    # against C only when the optima span several budgets (one budget: C is constant to 1%)
    spans = any(len(group_budgets(np.array([o["C"] for o in laws[k]["optima"]]))[1]) > 1 for k in keys)
    panels = [("vs_N", "N", f"parameters N ({(fit.get('options') or {}).get('params', 'total')})")]
    if spans:
        panels.append(("vs_C", "C", "training compute C (FLOPs)"))
    fig, axes = plt.subplots(len(keys), len(panels), figsize=(5.5 * len(panels) + 0.5, 4.2 * len(keys)),
                             layout="constrained", squeeze=False)
    for row, key in zip(axes, keys, strict=True):
        entry = laws[key]
        optima = entry["optima"]
        for ax, (vs, x_key, x_label) in zip(row, panels, strict=True):
            x = np.array([o[x_key] for o in optima])
            y = np.array([o["optimum"] for o in optima])
            edge = np.array([o["at_edge"] for o in optima])
            ax.scatter(x[~edge], y[~edge], color="tab:purple", zorder=3, label="optimum (parabola through the best "
                                                                              "and its neighbours)")
            if edge.any():
                ax.scatter(x[edge], y[edge], facecolor="white", edgecolor="tab:purple", zorder=3,
                           label="best at the end of the values tried (a bound)")
            ax.scatter(x, [o["best"] for o in optima], marker="x", color="gray", s=18, zorder=2,
                       label="best value tried")
            law = entry.get(vs) or {}
            if "exponent" in law:
                grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 100)
                ax.plot(grid, law_at(law, grid), "-", color="tab:purple",
                        label=f"{law['coef']:.3g}·{x_key}^{law['exponent']:.3f}")
                band = law_interval(law, grid)
                if band is not None:
                    iv = law["interval"]
                    ax.fill_between(grid, band[0], band[1], color="tab:purple", alpha=0.15,
                                    label=f"95% interval of the exponent [{iv[0]:.3f}, {iv[1]:.3f}]")
            elif "skipped" in law:
                ax.set_title(f"no law: {law['skipped']}", fontsize=8)
            log_scale(ax, "x")
            log_scale(ax, "y")
            ax.set_xlabel(x_label)
            ax.set_ylabel(f"optimal {LABELS.get(key, key)}")
            ax.legend(fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
    paths = _save(fig, out, "hparams")
    plt.close(fig)
    return paths


def lr_transfer_table(csv_path: str | Path, loss: str | None = None, width: str = "d_model", lr: str = "optim.lr",
                      parametrization: str = "model.parametrization") -> dict[str, Any]:
    """{"loss", "unit", "panels": {parametrization: {width: [(lr, loss or None if failed), ...] sorted}},
    "best": {parametrization: {width: {"lr", "loss", "index"}}}, "drift": {parametrization: max - min
    index of the best learning rate in the sorted grid of learning rates}} from a runs CSV."""
    path = Path(csv_path)
    if not path.is_file():
        raise ScalingError(f"runs CSV not found: {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    loss = loss or "final_loss"
    missing = [c for c in (width, lr, loss) if c not in header]
    if missing:
        raise ScalingError(f"runs CSV {path}: the learning-rate transfer plot needs column(s) {missing} (have "
                           f"{header})")
    panels: dict[str, dict[int, list[tuple[float, float | None]]]] = {}
    for i, r in enumerate(rows):
        try:
            w, x = int(float(r[width])), float(r[lr])
        except ValueError:
            raise ScalingError(f"runs CSV {path}: row {i + 2}: '{width}' and '{lr}' must be numbers") from None
        value: float | None = None
        if r.get("status", "done") in ("done", ""):
            try:
                value = float(r[loss])
            except ValueError:
                value = None
            if value is not None and not math.isfinite(value):
                value = None
        panels.setdefault(r.get(parametrization) or "standard", {}).setdefault(w, []).append((x, value))
    best: dict[str, dict[int, dict[str, float]]] = {}
    drift: dict[str, int] = {}
    for name, widths in panels.items():
        grid = sorted({x for points in widths.values() for x, _ in points})
        best[name] = {}
        for w, points in widths.items():
            points.sort()
            ok = [(x, v) for x, v in points if v is not None]
            if ok:
                x, v = min(ok, key=lambda p: p[1])
                best[name][w] = {"lr": x, "loss": v, "index": grid.index(x)}
        indices = [int(b["index"]) for b in best[name].values()]  # ints (stored among the floats)
        drift[name] = max(indices) - min(indices) if indices else 0
    order = sorted(panels, key=lambda n: (n != "standard", n))
    return {"loss": loss, "unit": loss_unit(loss), "panels": {n: panels[n] for n in order}, "best": best,
            "drift": drift}


def plot_lr_transfer(plt: Any, table: dict[str, Any], out: Path) -> list[Path]:
    names = list(table["panels"])
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.6), layout="constrained", squeeze=False,
                             sharey=True)
    cmap = plt.get_cmap("viridis")
    finite = [v for widths in table["panels"].values() for pts in widths.values() for _, v in pts if v is not None]
    if not finite:
        raise ScalingError("learning-rate transfer plot: no finished run")
    low, high = min(finite), float(np.percentile(finite, 90))
    top = high + 0.1 * max(high - low, 1e-3)
    for ax, name in zip(axes[0], names, strict=True):
        widths = table["panels"][name]
        for j, w in enumerate(sorted(widths)):
            color = cmap(j / max(len(widths) - 1, 1))
            pts = widths[w]
            ok = [(x, v) for x, v in pts if v is not None]
            ax.plot([x for x, _ in ok], [v for _, v in ok], "o-", color=color, ms=4, label=f"width {w}")
            failed = [x for x, v in pts if v is None]
            if failed:
                ax.scatter(failed, [top] * len(failed), marker="x", color=color, zorder=3)
            b = table["best"][name].get(w)
            if b:
                ax.scatter([b["lr"]], [b["loss"]], marker="*", s=150, color=color, edgecolor="black", zorder=4)
        log_scale(ax, "x")
        ax.set_ylim(low - 0.05 * (top - low), top + 0.03 * (top - low))
        ax.set_xlabel("learning rate")
        ax.set_title(f"{name}: best learning rate drifts by {table['drift'][name]} grid points across widths")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"{table['loss'].replace('_', ' ')} ({table['unit']})")
    paths = _save(fig, out, "lr_transfer")
    plt.close(fig)
    return paths


def write_lr_transfer(csv_path: str | Path, out_dir: str | Path, loss: str | None = None) -> list[Path]:
    from llmjax.scaling.plots import pyplot

    plt = pyplot()
    table = lr_transfer_table(csv_path, loss)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return plot_lr_transfer(plt, table, out)


__all__ = ["lr_transfer_table", "plot_hparam_laws", "plot_lr_transfer", "write_lr_transfer"]
