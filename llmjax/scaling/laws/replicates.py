"""The exponents' intervals from the replicate spread: a bootstrap over each point's seeds.

A sweep with `replicates: R` trains every point with R seeds; `load_runs` fits their mean loss
(`scaling/laws/runs.py`). The fit's own intervals (approach 3: a bootstrap over the rows;
approach 2: the slope's standard error) measure how well a law fits the means. This module asks
how much the exponents move with run-to-run noise: each refit draws, for every point, R of its
replicates with replacement and averages them, then refits approach 3 (from the full fit's
parameters, as approach 3's own bootstrap does) and approach 2; the 95% interval is the 2.5 and
97.5 percentiles of the refits (`lse.interval`). A fixed `seed` makes it deterministic. Identical
replicates give intervals of (nearly) zero width; noisier replicates, wider ones.

`loss_sd` is the mean over points of the replicates' standard deviation (ddof = 1), in the loss
column's unit. Points with one replicate contribute their single loss to every refit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from llmjax.scaling.laws.chinchilla import approach2, chinchilla_params
from llmjax.scaling.laws.lse import fit_lse, interval
from llmjax.scaling.laws.runs import Runs

A3_KEYS = ("alpha", "beta", "a", "b")
A2_KEYS = ("a", "b")


def replicate_spread(runs: Runs) -> dict[str, Any] | None:
    """Counts and loss spread of the replicates, or None when no point has two."""
    reps = runs.replicate_losses
    if reps is None or max(len(r) for r in reps) < 2:
        return None
    counts = [len(r) for r in reps]
    sds = [float(np.std(r, ddof=1)) for r in reps if len(r) > 1]
    return {"points": len(reps), "runs": int(sum(counts)), "replicates": [min(counts), max(counts)],
            "loss_sd": float(np.mean(sds)), "loss_sd_max": float(np.max(sds))}


def resampled_losses(runs: Runs, rng: np.random.Generator) -> np.ndarray:
    """One bootstrap draw: per point, the mean of len(replicates) replicates drawn with replacement."""
    assert runs.replicate_losses is not None
    return np.array([float(np.mean(r[rng.integers(0, len(r), len(r))])) for r in runs.replicate_losses])


def replicate_intervals(runs: Runs, a3: dict[str, Any], a2: dict[str, Any], bootstrap: int = 100,
                        seed: int = 0) -> dict[str, Any] | None:
    """The module docstring's bootstrap: {points, runs, replicates, loss_sd, bootstrap, seed, approach3:
    {alpha, beta, a, b: [lo, hi]}, approach2: {a, b: [lo, hi]}}; None without replicates. `a3`, `a2`:
    the fits of the mean losses (approach 3's parameters start every refit)."""
    out = replicate_spread(runs)
    if out is None:
        return None
    out.update(bootstrap=bootstrap, seed=seed)
    if bootstrap <= 0:
        return out
    rng = np.random.default_rng(seed)
    X = np.stack([runs.N, runs.D], axis=1)
    theta = np.array([math.log(a3["E"]), math.log(a3["A"]), a3["alpha"], math.log(a3["B"]), a3["beta"]])
    s3, s2 = [], []
    for _ in range(bootstrap):
        L = resampled_losses(runs, rng)
        t, _ = fit_lse(X, L, starts=1, extra_starts=[theta])
        q = chinchilla_params(t)
        s = q["alpha"] + q["beta"]
        s3.append([q["alpha"], q["beta"], q["beta"] / s, q["alpha"] / s])
        if "a" in a2:
            b2 = approach2(dataclasses.replace(runs, L=L))
            if "a" in b2:
                s2.append([b2["a"], b2["b"]])
    arr3 = np.array(s3)
    out["approach3"] = {k: interval(arr3[:, i]) for i, k in enumerate(A3_KEYS)}
    if s2:
        arr2 = np.array(s2)
        out["approach2"] = {k: interval(arr2[:, i]) for i, k in enumerate(A2_KEYS)}
        out["approach2_refits"] = len(s2)
    return out


def fit_intervals(fit: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """The fit's own 95% intervals of the same exponents, for comparison: approach 3's bootstrap over
    rows, approach 2's slope standard errors."""
    out: dict[str, dict[str, list[float]]] = {}
    a3 = (fit.get("approach3") or {}).get("intervals") or {}
    if a3:
        out["approach3"] = {k: a3[k] for k in A3_KEYS if k in a3}
    a2 = fit.get("approach2") or {}
    laws = {"a": (a2.get("N_law") or {}).get("interval"), "b": (a2.get("D_law") or {}).get("interval")}
    if any(laws.values()):
        out["approach2"] = {k: v for k, v in laws.items() if v}
    return out


def summary_lines(fit: dict[str, Any]) -> list[str]:
    """`llmjax fit`'s lines on the replicates: their spread, and each exponent's two intervals."""
    rep = fit.get("replicates")
    if not rep:
        return []
    unit = fit.get("loss_unit", "nats/token")
    lo, hi = rep["replicates"]
    lines = [f"replicates: {rep['runs']} runs of {rep['points']} points ({lo} to {hi} seeds each); loss s.d. "
             f"between seeds {rep['loss_sd']:.4f} {unit} (mean over points), {rep['loss_sd_max']:.4f} at most"]
    own = fit_intervals(fit)
    for name in ("approach3", "approach2"):
        spread = rep.get(name) or {}
        parts = []
        for k, iv in spread.items():
            mine = own.get(name, {}).get(k)
            theirs = f" (fit: [{mine[0]:.3f}, {mine[1]:.3f}])" if mine else ""
            parts.append(f"{k} [{iv[0]:.3f}, {iv[1]:.3f}]{theirs}")
        if parts:
            lines.append(f"{name.replace('approach', 'approach ')} exponents, 95% interval from the replicate spread "
                         f"({rep['bootstrap']} refits): {', '.join(parts)}")
    return lines


__all__ = ["fit_intervals", "replicate_intervals", "replicate_spread", "resampled_losses", "summary_lines"]
