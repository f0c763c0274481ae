"""`llmjax plot --csv runs.csv --fit fit.json --out DIR`: the scaling figures, each as PNG and SVG.

The CSV is read with the fit's options (`--params`, `--loss`, `--flops`, `--select`), so the
figures show the runs that were fitted, in the fit's units (loss in nats/token or bits/byte).

- isoflop:   loss against N per IsoFLOP budget: runs, approach 2's parabola and minimum (star),
             approach 3's prediction along the budget (dashed).
- frontier:  loss against C for every run (colour = N), the frontier (best loss per budget),
             Kaplan's L(C) and approach 3's compute-optimal loss.
- optimal:   N_opt(C), D_opt(C) and D_opt/N_opt: approach 2's minima and fitted power law with its
             95% band, approach 1's and approach 3's laws, all extended to the fit's `--budgets`
             where each approach's extrapolation is marked with its interval (approach 3:
             bootstrap; 1 and 2: the exponent's interval); a reference line at
             `TOKENS_PER_PARAM` tokens per parameter (Hoffmann et al.'s compute-optimal ratio).
- residuals: approach 3's relative error (predicted / observed - 1) against C and N.
- replicates: with several seeds per point, each point is their mean loss and carries an error bar
             from its lowest to its highest seed (isoflop, frontier).
- hparams:   (fits with hyperparameter axes) the optimal learning rate / batch size per
             configuration against N and C with the fitted power laws (`scaling/plots_hparams.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from llmjax.scaling import ScalingError
from llmjax.scaling.laws.fit import Runs, chinchilla_loss, chinchilla_optimum, frontier, runs_for_plots
from llmjax.scaling.laws.lse import law_at, law_interval

FORMATS = ("png", "svg")
TOKENS_PER_PARAM = 20.0
APPROACH_STYLE = {"approach1": (":", "tab:green", "s"), "approach2": ("-", "tab:orange", "o"),
                  "approach3": ("--", "tab:blue", "D")}
MARKER_SHIFT = {"approach1": 0.92, "approach2": 1.0, "approach3": 1.08}  # side by side at one budget

def log_scale(ax: Any, which: str) -> None:
    """A log axis labelled at 1, 2 and 5 times powers of ten on ranges of up to 2.5 decades (every minor
    label collides on short ranges), at powers of ten only on longer ones."""
    from matplotlib.ticker import FuncFormatter

    def label(value: float, _: int) -> str:
        lo, hi = sorted(getattr(ax, f"get_{which}lim")())
        if lo > 0 and np.log10(hi / lo) > 2.5:
            return ""
        exponent = int(np.floor(np.log10(value) + 1e-9))
        mantissa = value / 10.0**exponent
        return f"${mantissa:.0f}\\times10^{{{exponent}}}$" if round(mantissa) in (2, 5) else ""

    getattr(ax, f"set_{which}scale")("log")
    getattr(ax, f"{which}axis").set_minor_formatter(FuncFormatter(label))


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, SVG text kept as text (searchable, editable)."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"
    import matplotlib.pyplot as plt

    return plt


def loss_label(runs: Runs, what: str = "final validation loss") -> str:
    """`final validation loss (nats/token)`, or bits/byte for a bpb column."""
    return f"{what} ({runs.loss_unit})"


def save(fig: Any, out: Path, stem: str) -> list[Path]:
    paths = []
    for ext in FORMATS:
        path = out / f"{stem}.{ext}"
        fig.savefig(path, dpi=130, bbox_inches="tight")
        paths.append(path)
    return paths


def _p3(fit: dict[str, Any]) -> dict[str, float] | None:
    a3 = fit.get("approach3") or {}
    return {k: a3[k] for k in ("E", "A", "B", "alpha", "beta")} if "E" in a3 else None


def _law_line(ax: Any, law: dict[str, Any], C: np.ndarray, label: str, style: str, color: str, band: bool) -> None:
    ax.plot(C, law["coef"] * C ** law["exponent"], style, color=color, label=f"{label}: ∝ C^{law['exponent']:.3f}")
    iv, limits = law.get("interval"), law_interval(law, C)
    if band and iv and limits is not None:
        ax.fill_between(C, limits[0], limits[1], color=color, alpha=0.15,
                        label=f"{label}: 95% interval of the exponent [{iv[0]:.3f}, {iv[1]:.3f}]")


def _spread_bars(ax: Any, runs: Runs, sel: np.ndarray, color: Any, x: np.ndarray | None = None,
                 label: str | None = None) -> None:
    """Error bars from each selected point's lowest to its highest replicate loss (runs with several
    seeds per point; nothing otherwise). x: N unless given."""
    if runs.replicate_losses is None:
        return
    idx = np.flatnonzero(sel)
    low = [runs.L[i] - runs.replicate_losses[i].min() for i in idx]
    high = [runs.replicate_losses[i].max() - runs.L[i] for i in idx]
    ax.errorbar((runs.N if x is None else x)[idx], runs.L[idx], yerr=[low, high], fmt="none", ecolor=color,
                elinewidth=1, capsize=2, zorder=2, label=label)


def plot_isoflop(plt: Any, runs: Runs, fit: dict[str, Any], out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(7, 5), layout="constrained")
    cmap = plt.get_cmap("viridis")
    minima = {round(np.log10(m["C"]), 3): m for m in fit.get("approach2", {}).get("minima", [])}
    p3, k = _p3(fit), fit.get("flops_per_param_token", 6.0)
    for g, c in enumerate(runs.budgets):
        color = cmap(g / max(len(runs.budgets) - 1, 1))
        sel = runs.budget == g
        ax.scatter(runs.N[sel], runs.L[sel], color=color, s=25, zorder=3, label=f"C = {c:.2g} FLOPs")
        _spread_bars(ax, runs, sel, color)
        n_grid = np.geomspace(runs.N[sel].min() / 1.3, runs.N[sel].max() * 1.3, 100)
        m = minima.get(round(np.log10(c), 3))
        if m:
            p0, p1, p2 = m["parabola"]
            x = np.log10(n_grid)
            ax.plot(n_grid, p0 + p1 * x + p2 * x**2, "-", color=color, lw=1.2)
            ax.scatter([m["N_opt"]], [m["loss"]], marker="*", s=160, color=color, edgecolor="black", zorder=4)
        if p3:
            ax.plot(n_grid, chinchilla_loss(p3, n_grid, c / (k * n_grid)), "--", color=color, lw=0.8, alpha=0.7)
    if runs.replicate_losses is not None:
        ax.errorbar([], [], yerr=[[0], [0]], fmt="none", ecolor="gray", capsize=2,
                    label="lowest to highest seed (the point is their mean)")
    ax.plot([], [], "k-", label="approach 2: parabola in log N")
    ax.scatter([], [], marker="*", s=100, color="white", edgecolor="black", label="approach 2: minimum")
    if p3:
        ax.plot([], [], "k--", lw=0.8, label="approach 3: L(N, C/(kN))")
    log_scale(ax, "x")
    ax.set_xlabel(f"parameters N ({runs.options.get('params', 'total')})")
    ax.set_ylabel(loss_label(runs))
    ax.set_title("IsoFLOP curves")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    paths = save(fig, out, "isoflop")
    plt.close(fig)
    return paths


def plot_frontier(plt: Any, runs: Runs, fit: dict[str, Any], out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(7, 5), layout="constrained")
    sc = ax.scatter(runs.C, runs.L, c=np.log10(runs.N), cmap="viridis", s=25, label="runs")
    _spread_bars(ax, runs, np.ones(len(runs.L), bool), "gray", x=runs.C, label="lowest to highest seed")
    fig.colorbar(sc, ax=ax, label="log10 parameters N")
    C, L = frontier(runs)
    ax.plot(C, L, "o-", color="black", mfc="none", label="frontier: best loss per budget")
    grid = np.geomspace(runs.C.min() / 2, runs.C.max() * 2, 100)
    kp = fit.get("kaplan", {}).get("L_C", {})
    if "E" in kp:
        ax.plot(grid, kp["E"] + kp["A"] / grid ** kp["alpha"], "-", color="tab:red",
                label=f"Kaplan L(C) = {kp['E']:.3g} + {kp['A']:.3g}/C^{kp['alpha']:.3f}")
    p3, k = _p3(fit), fit.get("flops_per_param_token", 6.0)
    if p3:
        ax.plot(grid, [chinchilla_optimum(p3, c, k)["loss"] for c in grid], "--", color="tab:blue",
                label="approach 3: compute-optimal loss")
    log_scale(ax, "x")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel(loss_label(runs))
    ax.set_title("Loss-compute frontier")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    paths = save(fig, out, "frontier")
    plt.close(fig)
    return paths


def _extrapolations(ax: Any, fit: dict[str, Any], key: str) -> None:
    """Each approach's N_opt or D_opt at the fit's --budgets, with its interval as an error bar."""
    for row in fit.get("compute_optimal", []):
        for name, (_, color, marker) in APPROACH_STYLE.items():
            r = row.get(name)
            if not r or key not in r:
                continue
            iv = r.get(f"{key}_interval")
            yerr = None if not iv else [[max(r[key] - iv[0], 0.0)], [max(iv[1] - r[key], 0.0)]]
            ax.errorbar([row["C"] * MARKER_SHIFT[name]], [r[key]], yerr=yerr, fmt=marker, color=color, mfc="white",
                        capsize=4, zorder=4)
    if fit.get("compute_optimal"):
        ax.errorbar([], [], yerr=[[0], [0]], fmt="o", color="gray", mfc="white", capsize=4,
                    label="extrapolation to --budgets (95% interval)")


def _compute_range(runs: Runs, fit: dict[str, Any]) -> np.ndarray:
    budgets = [row["C"] for row in fit.get("compute_optimal", [])]
    return np.geomspace(min([runs.C.min()] + budgets) / 2, max([runs.C.max()] + budgets) * 2, 200)


def plot_optimal(plt: Any, runs: Runs, fit: dict[str, Any], out: Path) -> list[Path]:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), layout="constrained")
    C = _compute_range(runs, fit)
    a2, a1 = fit.get("approach2", {}), fit.get("approach1", {})
    p3, k = _p3(fit), fit.get("flops_per_param_token", 6.0)
    r = TOKENS_PER_PARAM
    reference = {"N_opt": np.sqrt(C / (k * r)), "D_opt": np.sqrt(r * C / k)}  # D = r·N and C = k·N·D
    n_label = f"parameters N_opt ({runs.options.get('params', 'total')})"
    for ax, key, law_key, what in ((axes[0], "N_opt", "N_law", n_label), (axes[1], "D_opt", "D_law", "tokens D_opt")):
        minima = a2.get("minima", [])
        if minima:
            ax.scatter([m["C"] for m in minima], [m[key] for m in minima], color="tab:orange", zorder=3,
                       label="approach 2: IsoFLOP minima")
        if law_key in a2:
            _law_line(ax, a2[law_key], C, "approach 2", "-", "tab:orange", band=True)
        if law_key in a1:
            _law_line(ax, a1[law_key], C, "approach 1", ":", "tab:green", band=False)
        if p3:
            ax.plot(C, [chinchilla_optimum(p3, c, k)[key] for c in C], "--", color="tab:blue",
                    label=f"approach 3: ∝ C^{fit['approach3']['a' if key == 'N_opt' else 'b']:.3f}")
        ax.plot(C, reference[key], "-", color="gray", lw=0.8, alpha=0.7,
                label=f"{r:.0f} tokens/parameter (Hoffmann et al.)")
        _extrapolations(ax, fit, key)
        log_scale(ax, "x")
        log_scale(ax, "y")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel(what)
        ax.set_title(f"{key}(C)")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    ax = axes[2]
    for name, a in (("approach1", a1), ("approach2", a2)):
        if "N_law" in a:
            style, color, _ = APPROACH_STYLE[name]
            ratio = law_at(a["D_law"], C) / law_at(a["N_law"], C)
            ax.plot(C, ratio, style, color=color, label=name.replace("approach", "approach "))
    if p3:
        ax.plot(C, [chinchilla_optimum(p3, c, k)["tokens_per_param"] for c in C], "--", color="tab:blue",
                label="approach 3")
    for row in fit.get("compute_optimal", []):
        for name, (_, color, marker) in APPROACH_STYLE.items():
            if row.get(name):
                ax.scatter([row["C"]], [row[name]["tokens_per_param"]], marker=marker, color=color, facecolor="white",
                           zorder=4)
    ax.axhline(r, color="gray", lw=0.8, alpha=0.7, label=f"{r:.0f} tokens/parameter (Hoffmann et al.)")
    log_scale(ax, "x")
    log_scale(ax, "y")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("compute-optimal tokens per parameter D_opt / N_opt")
    ax.set_title("tokens per parameter")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    paths = save(fig, out, "optimal")
    plt.close(fig)
    return paths


def plot_residuals(plt: Any, runs: Runs, fit: dict[str, Any], out: Path) -> list[Path]:
    p3 = _p3(fit)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True, layout="constrained")
    if p3:
        rel = 100 * (chinchilla_loss(p3, runs.N, runs.D) / runs.L - 1)
        for ax, x, label in ((axes[0], runs.C, "training compute C (FLOPs)"), (axes[1], runs.N, "parameters N")):
            sc = ax.scatter(x, rel, c=np.log10(runs.C), cmap="viridis", s=25, label="runs")
            ax.axhline(0, color="black", lw=0.8)
            log_scale(ax, "x")
            ax.set_xlabel(label)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_ylabel(f"approach 3: predicted / observed - 1 (% of the loss in {runs.loss_unit})")
        axes[0].legend(fontsize=8)
        fig.colorbar(sc, ax=axes, label="log10 compute C")
        fig.suptitle(f"Approach 3 residuals (RMS {np.sqrt(np.mean(rel**2)):.2f}%)")
    paths = save(fig, out, "residuals")
    plt.close(fig)
    return paths


def write_plots(csv_path: str | Path, fit_path: str | Path, out_dir: str | Path) -> list[Path]:
    from llmjax.scaling.plots_hparams import plot_hparam_laws

    plt = pyplot()

    try:
        fit = json.loads(Path(fit_path).read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ScalingError(f"--fit {fit_path}: cannot read the fit: {type(e).__name__}: {e}") from None
    if not isinstance(fit, dict):
        raise ScalingError(f"--fit {fit_path}: expected the JSON object `llmjax fit` writes, got a "
                           f"{type(fit).__name__}")
    paths: list[Path] = []
    try:
        runs = runs_for_plots(csv_path, fit)
        if runs.progress:
            from llmjax.scaling.sweep.collect import partial_line

            print(partial_line(runs.progress))
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for fn in (plot_isoflop, plot_frontier, plot_optimal, plot_residuals):
            paths += fn(plt, runs, fit, out)
        if any("vs_N" in e for e in (fit.get("hyperparameters") or {}).values()):
            paths += plot_hparam_laws(plt, fit, out)
    except (KeyError, TypeError, AttributeError) as e:  # a hand-edited or foreign JSON object
        raise ScalingError(f"--fit {fit_path}: not a fit written by `llmjax fit` ({type(e).__name__}: {e})") from None
    return paths
