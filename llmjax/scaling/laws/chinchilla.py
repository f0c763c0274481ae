"""Hoffmann et al. 2022, approaches 2 and 3, compute-optimal allocations and held-out checks.

- Approach 2 (§3.2): rows of one IsoFLOP budget with >= 3 sizes: a parabola L = p0 + p1·x + p2·x²,
  x = log10 N, gives N_opt = 10^(-p1 / 2p2) and L_min; D_opt = C / (k_C·N_opt). Power laws
  N_opt ∝ C^a, D_opt ∝ C^b; 95% intervals of the exponents from the slope's standard error.
- Approach 3 (§3.3 and App. D.2): L(N, D) = E + A/N^alpha + B/D^beta by the log-space Huber fit
  (`lse.fit_lse`); 95% intervals: percentiles of `bootstrap` refits on rows resampled with
  replacement. The compute-optimal allocation under C = k·N·D: N_opt = G·(C/k)^a,
  D_opt = (C/k)^b / G, a = beta/(alpha+beta), b = alpha/(alpha+beta),
  G = (alpha·A / (beta·B))^(1/(alpha+beta)).
- `allocations`: N_opt, D_opt and tokens per parameter at given budgets from each approach, with
  intervals (approach 3: bootstrap; approaches 1 and 2: the exponent's interval, pivoting about
  the fitted compute range).
- `holdout_check`: refit without some budget's runs and predict them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from llmjax.scaling import ScalingError
from llmjax.scaling.laws.kaplan import kaplan
from llmjax.scaling.laws.lse import HUBER_DELTA, fit_lse, interval, law_at, law_interval, power_law
from llmjax.scaling.laws.runs import BUDGET_TOLERANCE, Runs


def chinchilla_params(theta: np.ndarray) -> dict[str, float]:
    e, a, alpha, b, beta = theta
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": float(alpha), "beta": float(beta)}


def chinchilla_loss(p: dict[str, float], N: Any, D: Any) -> np.ndarray:
    return p["E"] + p["A"] / np.asarray(N, float) ** p["alpha"] + p["B"] / np.asarray(D, float) ** p["beta"]


def chinchilla_optimum(p: dict[str, float], C: float, k: float = 6.0) -> dict[str, float]:
    """argmin_N L(N, C/(k·N)) in closed form."""
    s = p["alpha"] + p["beta"]
    G = (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1 / s)
    N = G * (C / k) ** (p["beta"] / s)
    D = C / (k * N)
    return {"N_opt": N, "D_opt": D, "tokens_per_param": D / N, "loss": float(chinchilla_loss(p, N, D))}


def approach3(runs: Runs, bootstrap: int = 100, starts: int = 8, seed: int = 0) -> dict[str, Any]:
    if len(runs.L) < 6 or len(np.unique(runs.N)) < 2 or len(np.unique(runs.D)) < 2:
        raise ScalingError(f"too few runs for approach 3: {len(runs.L)} rows, {len(np.unique(runs.N))} model sizes, "
                           f"{len(np.unique(runs.D))} token counts (need >= 6 rows, >= 2 sizes, >= 2 token counts)")
    X = np.stack([runs.N, runs.D], axis=1)
    theta, f = fit_lse(X, runs.L, starts)
    p = chinchilla_params(theta)
    s = p["alpha"] + p["beta"]
    out: dict[str, Any] = {**p, "a": p["beta"] / s, "b": p["alpha"] / s, "huber_objective": f * HUBER_DELTA**2,
                           "n_runs": len(runs.L)}
    pred = chinchilla_loss(p, runs.N, runs.D)
    out["rmse_log"] = float(np.sqrt(np.mean((np.log(pred) - np.log(runs.L)) ** 2)))
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(bootstrap):
            idx = rng.integers(0, len(runs.L), len(runs.L))
            if len(np.unique(runs.N[idx])) < 2 or len(np.unique(runs.D[idx])) < 2:
                continue
            t, _ = fit_lse(X[idx], runs.L[idx], starts=1, extra_starts=[theta])
            q = chinchilla_params(t)
            samples.append([q["E"], q["A"], q["B"], q["alpha"], q["beta"], q["beta"] / (q["alpha"] + q["beta"]),
                            q["alpha"] / (q["alpha"] + q["beta"])])
        if not samples:
            return out
        arr = np.array(samples)
        out["intervals"] = {k: interval(arr[:, i]) for i, k in enumerate(("E", "A", "B", "alpha", "beta", "a", "b"))}
        out["bootstrap"] = len(samples)
        out["_samples"] = arr
    return out


def approach2(runs: Runs) -> dict[str, Any]:
    minima, notes = [], []
    for g, c in enumerate(runs.budgets):
        sel = runs.budget == g
        sizes = np.unique(runs.N[sel])
        if len(sizes) < 3:
            notes.append(f"budget {c:.3g}: {len(sizes)} model sizes, need >= 3")
            continue
        x, y = np.log10(runs.N[sel]), runs.L[sel]
        p2, p1, p0 = np.polyfit(x, y, 2)
        if p2 <= 0:
            notes.append(f"budget {c:.3g}: the parabola opens downwards (no minimum)")
            continue
        x_opt = -p1 / (2 * p2)
        inside = bool(x.min() <= x_opt <= x.max())
        if not inside:
            notes.append(f"budget {c:.3g}: the minimum lies outside the sizes tried (extrapolated)")
        k = float(np.median(runs.C[sel] / (runs.N[sel] * runs.D[sel])))
        n_opt = 10**x_opt
        minima.append({"C": float(c), "N_opt": float(n_opt), "D_opt": float(c / (k * n_opt)),
                       "loss": float(p0 + p1 * x_opt + p2 * x_opt**2), "parabola": [float(p0), float(p1), float(p2)],
                       "n_runs": int(sel.sum()), "inside": inside, "best_observed_loss": float(y.min())})
    out: dict[str, Any] = {"minima": minima, "notes": notes}
    if len(minima) < 2:
        out["skipped"] = f"needs >= 2 IsoFLOP budgets with >= 3 sizes each, got {len(minima)}"
        return out
    C = np.array([m["C"] for m in minima])
    n_law = power_law(C, np.array([m["N_opt"] for m in minima]))
    d_law = power_law(C, np.array([m["D_opt"] for m in minima]))
    out.update(a=n_law["exponent"], b=d_law["exponent"], N_law=n_law, D_law=d_law)
    return out


def allocations(fit: dict[str, Any], budgets: list[float], k: float) -> list[dict[str, Any]]:
    out = []
    for C in budgets:
        row: dict[str, Any] = {"C": C}
        a3 = fit.get("approach3")
        if a3 and "E" in a3:
            row["approach3"] = chinchilla_optimum(a3, C, k)
            samples = a3.get("_samples")
            if samples is not None and len(samples):
                ns = [chinchilla_optimum(dict(zip(("E", "A", "B", "alpha", "beta"), s[:5], strict=True)), C, k)["N_opt"]
                      for s in samples]
                row["approach3"]["N_opt_interval"] = interval(np.array(ns))
                row["approach3"]["D_opt_interval"] = [C / (k * x) for x in reversed(row["approach3"]["N_opt_interval"])]
        for name in ("approach1", "approach2"):
            a = fit.get(name) or {}
            if "N_law" in a:
                n, d = float(law_at(a["N_law"], C)), float(law_at(a["D_law"], C))
                row[name] = {"N_opt": n, "D_opt": d, "tokens_per_param": d / n}
                for key, law in (("N_opt", a["N_law"]), ("D_opt", a["D_law"])):
                    band = law_interval(law, C)
                    if band is not None:
                        row[name][f"{key}_interval"] = [float(band[0]), float(band[1])]
        out.append(row)
    return out


def _budget_mask(runs: Runs, holdout: str) -> np.ndarray:
    if holdout == "largest":
        g = int(np.argmax(runs.budgets))
        return runs.budget == g
    try:
        C = float(holdout)
    except ValueError:
        raise ScalingError(f"--holdout: expected 'largest' or a FLOPs value, got {holdout!r}") from None
    mask = np.abs(runs.C / C - 1) <= BUDGET_TOLERANCE
    if not mask.any():
        raise ScalingError(f"--holdout {holdout}: no run has flops within 1% of {C:.3g}")
    return mask


def holdout_check(runs: Runs, holdout: str, bootstrap: int, seed: int) -> dict[str, Any]:
    """Refit on the other rows; predict the held-out rows' losses (approach 3) and their best
    size (approach 2's power law), and the best held-out loss (Kaplan L(C))."""
    mask = _budget_mask(runs, holdout)
    train, test = runs.subset(~mask), runs.subset(mask)
    out: dict[str, Any] = {"holdout": holdout, "n_train": int((~mask).sum()), "n_test": int(mask.sum())}
    a3 = approach3(train, bootstrap=0)
    p = {k: a3[k] for k in ("E", "A", "B", "alpha", "beta")}
    out["approach3_fit"] = p
    pred = chinchilla_loss(p, test.N, test.D)
    out["predictions"] = [{"name": n, "params": float(N), "tokens": float(D), "flops": float(C), "loss": float(L),
                           "predicted": float(q), "error": float(q - L), "relative_error": float(q / L - 1)}
                          for n, N, D, C, L, q in zip(test.names, test.N, test.D, test.C, test.L, pred, strict=True)]
    best = int(np.argmin(test.L))
    out["best_run"] = {"name": test.names[best], "params": float(test.N[best]), "loss": float(test.L[best]),
                       "predicted": float(pred[best]), "relative_error": float(pred[best] / test.L[best] - 1)}
    out["mean_abs_relative_error"] = float(np.mean(np.abs(pred / test.L - 1)))
    a2 = approach2(train)
    if "N_law" in a2:
        C = float(np.exp(np.mean(np.log(test.C))))
        n = float(law_at(a2["N_law"], C))
        out["approach2_N_opt_predicted"] = n
        out["approach2_N_opt_vs_best_observed"] = n / float(test.N[best])
    kp = kaplan(train)["L_C"]
    if "E" in kp:
        C = float(test.C[best])
        q = kp["E"] + kp["A"] / C ** kp["alpha"]
        out["kaplan_L_C"] = {"predicted": q, "relative_error": q / float(test.L[best]) - 1}
    return out
