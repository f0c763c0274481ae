"""Least-squares machinery of the fits: the log-space Huber fit of Hoffmann et al. and power laws.

- `fit_lse`: log L ≈ logsumexp(e, a_j - alpha_j·log X_j), i.e. L = E + sum_j A_j / X_j^alpha_j with
  A_j = e^a_j, E = e^e, by L-BFGS on the Huber loss (delta = 1e-3) of the log residuals, started
  from the best `starts` points of the grid alpha ∈ {0, 0.5, …, 2}, e ∈ {-1, -0.5, …, 1},
  a ∈ {0, 5, …, 25} (Hoffmann et al. 2022, App. D.2). `predict_lse` evaluates it.
- `power_law`: Y = coef·X^exponent by least squares in log10-log10, with a 95% interval of the
  exponent (t distribution).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np

HUBER_DELTA = 1e-3
GRID_E = np.arange(-1.0, 1.01, 0.5)
GRID_LOG_COEF = np.arange(0.0, 25.01, 5.0)
GRID_EXPONENT = np.arange(0.0, 2.01, 0.5)




def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss / delta² and its derivative (scaled so that L-BFGS's relative tolerances apply)."""
    a = np.abs(r)
    loss = np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta)) / delta**2
    grad = np.clip(r, -delta, delta) / delta**2
    return loss, grad


def _terms(theta: np.ndarray, logX: np.ndarray) -> np.ndarray:
    """[n, 1 + m] terms e, a_j - alpha_j·log X_j for theta = (e, a_1, alpha_1, ..., a_m, alpha_m)."""
    m = logX.shape[1]
    cols = [np.full(logX.shape[0], theta[0])]
    for j in range(m):
        cols.append(theta[1 + 2 * j] - theta[2 + 2 * j] * logX[:, j])
    return np.stack(cols, axis=1)


def _objective(theta: np.ndarray, logX: np.ndarray, logL: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    t = _terms(theta, logX)
    top = t.max(axis=1, keepdims=True)
    pred = (top + np.log(np.exp(t - top).sum(axis=1, keepdims=True)))[:, 0]
    w = np.exp(t - pred[:, None])  # softmax: d pred / d term
    loss, g = _huber(pred - logL, delta)
    grad = np.empty_like(theta)
    grad[0] = (g * w[:, 0]).sum()
    for j in range(logX.shape[1]):
        grad[1 + 2 * j] = (g * w[:, 1 + j]).sum()
        grad[2 + 2 * j] = -(g * w[:, 1 + j] * logX[:, j]).sum()
    return float(loss.sum()), grad


def _grid(m: int) -> np.ndarray:
    axes = [GRID_E] + [GRID_LOG_COEF, GRID_EXPONENT] * m
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([x.ravel() for x in mesh], axis=1)


def _grid_scores(grid: np.ndarray, logX: np.ndarray, logL: np.ndarray, delta: float) -> np.ndarray:
    t = [np.broadcast_to(grid[:, :1], (len(grid), len(logL)))]
    for j in range(logX.shape[1]):
        t.append(grid[:, 1 + 2 * j, None] - grid[:, 2 + 2 * j, None] * logX[None, :, j])
    pred = np.logaddexp.reduce(np.stack(t), axis=0)
    return _huber(pred - logL[None, :], delta)[0].sum(axis=1)


def _single_threaded_blas() -> Any:
    """L-BFGS-B's BLAS calls on 5-vectors: threads only add overhead (20x slower on a busy 2-core machine)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _lbfgs(theta0: np.ndarray, logX: np.ndarray, logL: np.ndarray, delta: float) -> tuple[np.ndarray, float]:
    from scipy.optimize import minimize

    res = minimize(_objective, theta0, args=(logX, logL, delta), jac=True, method="L-BFGS-B",
                   options={"maxiter": 2000, "ftol": 1e-14, "gtol": 1e-9})
    return res.x, float(res.fun)


def fit_lse(X: np.ndarray, L: np.ndarray, starts: int = 8, delta: float = HUBER_DELTA,
            extra_starts: list[np.ndarray] | None = None) -> tuple[np.ndarray, float]:
    """Fit log L ≈ logsumexp(e, a_j - alpha_j·log X_j) (Hoffmann et al. App. D.2); returns (theta, objective)."""
    X = np.asarray(X, float).reshape(len(L), -1)
    logX, logL = np.log(X), np.log(np.asarray(L, float))
    grid = _grid(X.shape[1])
    scores = _grid_scores(grid, logX, logL, delta)
    inits = [grid[i] for i in np.argsort(scores)[:starts]] + list(extra_starts or [])
    best, best_f = None, math.inf
    with _single_threaded_blas():
        for theta0 in inits:
            theta, f = _lbfgs(np.array(theta0, float), logX, logL, delta)
            if f < best_f and np.all(np.isfinite(theta)):
                best, best_f = theta, f
    assert best is not None
    return best, best_f


def predict_lse(theta: np.ndarray, X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, float).reshape(-1, (len(theta) - 1) // 2)
    return np.exp(np.logaddexp.reduce(_terms(theta, np.log(X)), axis=1))


def interval(samples: np.ndarray) -> list[float]:
    """The central 95% of bootstrap samples."""
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


def power_law(X: np.ndarray, Y: np.ndarray) -> dict[str, Any]:
    """Y = coef·X^exponent by least squares in log10-log10, with a 95% interval of the exponent."""
    from scipy import stats

    x, y = np.log10(np.asarray(X, float)), np.log10(np.asarray(Y, float))
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError("need two distinct values")
    if len(x) == 2:
        slope = (y[1] - y[0]) / (x[1] - x[0])
        return {"exponent": float(slope), "coef": float(10 ** (y[0] - slope * x[0])), "interval": None}
    r = stats.linregress(x, y)
    t = stats.t.ppf(0.975, len(x) - 2)
    return {"exponent": float(r.slope), "coef": float(10**r.intercept),
            "interval": [float(r.slope - t * r.stderr), float(r.slope + t * r.stderr)],
            "log10_coef_stderr": float(r.intercept_stderr), "r2": float(r.rvalue**2),
            "pivot": float(10 ** np.mean(x)), "n_points": len(x)}


def law_at(law: dict[str, Any], x: Any) -> Any:
    """coef·x^exponent."""
    return law["coef"] * np.asarray(x, float) ** law["exponent"]


def law_interval(law: dict[str, Any], x: Any) -> tuple[Any, Any] | None:
    """(low, high) of the law at x when its exponent ranges over its 95% interval, the line pivoting
    about the geometric mean of the fitted x (where the fit is tightest); None without an interval."""
    iv = law.get("interval")
    if not iv:
        return None
    x = np.asarray(x, float)
    pivot = law.get("pivot") or float(np.sqrt(x.min() * x.max()))
    mid = law["coef"] * pivot ** law["exponent"]
    a, b = (mid * (x / pivot) ** e for e in iv)
    return np.minimum(a, b), np.maximum(a, b)
