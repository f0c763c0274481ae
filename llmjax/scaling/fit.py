"""Scaling-law fits: `llmjax fit --csv runs.csv --out DIR` -> DIR/fit.json.

Notation: N = `params` (total parameters), D = `tokens`, L = `loss` (or `final_loss`),
C = `flops` (6·N·D when the column is absent). k = median of C / (N·D) over the rows is the
FLOPs-per-parameter-per-token factor used to turn C into N·D for the compute-optimal
allocations (6 for the classic 6ND; the project's `flops_per_token` counts matmul weights and
attention, so k differs a little from 6 and varies with size: the allocations are then
approximate in proportion).

- Approach 1 (Hoffmann et al. 2022, §3.1): every training curve gives (C_t, L_t) at each
  logged step t (C_t = C·(t+1)/steps, curves smoothed by a centred moving average over 5% of
  the steps). On a log grid of C, the run with the lowest interpolated loss gives N_opt(C), and
  D_opt = C / (k·N_opt). Power laws N_opt ∝ C^a, D_opt ∝ C^b by least squares in log-log,
  over the "trusted" envelope points: those where the next smaller and the next larger model
  both reach C too (at the ends of the C range, or of the sizes, the true optimum may be a
  model whose curve does not cover C).
  Needs the run directories (the CSV's `workdir` column, relative to the CSV); skipped with
  a note otherwise. With a decaying LR schedule, intermediate points of a curve are not
  compute-optimal runs of that length (Hoffmann et al. use cosine cycles matched to each
  length), so approach 1 is indicative.
- Approach 2 (§3.2): rows with the same `budget` (or, without that column, whose flops agree
  within 1%) form an IsoFLOP budget; with >= 3 sizes a parabola L = p0 + p1·x + p2·x²,
  x = log10 N, gives N_opt = 10^(-p1 / 2p2) and L_min; D_opt = C / (k_C·N_opt). Power laws
  as above; 95% intervals of the exponents from the slope's standard error (t distribution).
- Approach 3 (§3.3 and App. D.2): L(N, D) = E + A/N^alpha + B/D^beta with parameters
  (a, b, e, alpha, beta), A = e^a, B = e^b, E = e^e; the prediction
  log L̂ = logsumexp(a - alpha·log N, b - beta·log D, e); the Huber loss (delta = 1e-3) of
  log L̂ - log L, minimised by L-BFGS from the best `starts` points of the grid
  alpha, beta ∈ {0, 0.5, …, 2}, e ∈ {-1, -0.5, …, 1}, a, b ∈ {0, 5, …, 25} (the grid is
  scored first and only the best starts are optimised; the best optimum is kept). 95%
  intervals: percentiles of `bootstrap` refits on rows resampled with replacement. The
  compute-optimal allocation under C = k·N·D: N_opt = G·(C/k)^a, D_opt = (C/k)^b / G,
  a = beta/(alpha+beta), b = alpha/(alpha+beta), G = (alpha·A / (beta·B))^(1/(alpha+beta)).
- Kaplan et al. 2020 style laws with an irreducible term, fitted the same way with one term:
  L(N) = E + A/N^alpha over the best loss of each size, L(D) over the best loss of each token
  count, L(C) over the loss-compute frontier (the best loss of each budget).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmjax.scaling import ScalingError

HUBER_DELTA = 1e-3
BUDGET_TOLERANCE = 0.01
GRID_E = np.arange(-1.0, 1.01, 0.5)
GRID_LOG_COEF = np.arange(0.0, 25.01, 5.0)
GRID_EXPONENT = np.arange(0.0, 2.01, 0.5)


# ----------------------------------------------------------------------------- input


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

    def subset(self, mask: np.ndarray) -> Runs:
        idx = np.flatnonzero(mask)
        used = sorted({int(self.budget[i]) for i in idx if self.budget[i] >= 0})
        remap = {old: new for new, old in enumerate(used)}
        return Runs([self.names[i] for i in idx], self.N[idx], self.D[idx], self.L[idx], self.C[idx],
                    np.array([remap.get(int(b), -1) for b in self.budget[idx]], int), self.budgets[used],
                    [self.workdirs[i] for i in idx] if self.workdirs is not None else None, self.base_dir,
                    self.flops_given)

    @property
    def k(self) -> float:
        return float(np.median(self.C / (self.N * self.D)))


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


def load_runs(path: str | Path) -> Runs:
    """Read and check a runs CSV (see the module docstring for the columns)."""
    path = Path(path)
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
    rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in rows]
    loss_col = "loss" if "loss" in header else "final_loss" if "final_loss" in header else None
    missing = [c for c in ("params", "tokens") if c not in header] + ([] if loss_col else ["loss"])
    if missing:
        raise ScalingError(f"runs CSV {path}: missing column(s) {missing} (have {header}; 'final_loss' is "
                           "accepted as 'loss')")
    if not rows:
        raise ScalingError(f"runs CSV {path}: no rows")
    n = [_float(r["params"], i + 2, "params") for i, r in enumerate(rows)]
    d = [_float(r["tokens"], i + 2, "tokens") for i, r in enumerate(rows)]
    loss = [_float(r[loss_col], i + 2, loss_col) for i, r in enumerate(rows)]
    flops_given = "flops" in header
    c = [_float(r["flops"], i + 2, "flops") if flops_given else 6 * n[i] * d[i] for i, r in enumerate(rows)]
    for i, x in enumerate(c):
        if not math.isfinite(x):
            raise ScalingError(f"runs CSV {path}: row {i + 2}: 6 x params x tokens = {x} overflows (give a 'flops' "
                               "column, or check the values)")
    N, D, L, C = (np.array(x, float) for x in (n, d, loss, c))
    if "budget" in header and all(r.get("budget") for r in rows):
        given = np.array([_float(r["budget"], i + 2, "budget") for i, r in enumerate(rows)])
        values = np.unique(given)
        budget, budgets = np.searchsorted(values, given), values
    else:
        budget, budgets = group_budgets(C)
    names = [r.get("name") or f"row{i + 2}" for i, r in enumerate(rows)]
    workdirs = [r.get("workdir", "") for r in rows] if "workdir" in header else None
    return Runs(names, N, D, L, C, budget, budgets, workdirs, path.parent, flops_given)


# ----------------------------------------------------------------------------- the log-space Huber fit


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


def _interval(samples: np.ndarray) -> list[float]:
    return [float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))]


# ----------------------------------------------------------------------------- the laws


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
        out["intervals"] = {k: _interval(arr[:, i]) for i, k in enumerate(("E", "A", "B", "alpha", "beta", "a", "b"))}
        out["bootstrap"] = len(samples)
        out["_samples"] = arr
    return out


def power_law(C: np.ndarray, Y: np.ndarray) -> dict[str, Any]:
    """Y = coef·C^exponent by least squares in log10-log10, with a 95% interval of the exponent."""
    from scipy import stats

    x, y = np.log10(C), np.log10(Y)
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError("need two distinct compute values")
    if len(x) == 2:
        slope = (y[1] - y[0]) / (x[1] - x[0])
        return {"exponent": float(slope), "coef": float(10 ** (y[0] - slope * x[0])), "interval": None}
    r = stats.linregress(x, y)
    t = stats.t.ppf(0.975, len(x) - 2)
    return {"exponent": float(r.slope), "coef": float(10**r.intercept),
            "interval": [float(r.slope - t * r.stderr), float(r.slope + t * r.stderr)],
            "log10_coef_stderr": float(r.intercept_stderr), "r2": float(r.rvalue**2)}


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


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average; the window shrinks symmetrically at the ends (no padding bias)."""
    n, half = len(y), window // 2
    if half < 1 or n < 3:
        return y
    csum = np.concatenate([[0.0], np.cumsum(y)])
    i = np.arange(n)
    h = np.minimum(np.minimum(i, n - 1 - i), half)
    return (csum[i + h + 1] - csum[i - h]) / (2 * h + 1)


def load_curves(runs: Runs) -> list[tuple[np.ndarray, np.ndarray]] | str:
    """Per-run (C_t, smoothed L_t) from the run directories, or a note saying why not."""
    if runs.workdirs is None or not all(runs.workdirs):
        return "no 'workdir' column (or empty values) in the CSV: the training curves are needed"
    import yaml

    curves = []
    for i, wd in enumerate(runs.workdirs):
        d = runs.base_dir / wd
        path = d / "metrics.jsonl"
        if not path.is_file():
            return f"{path} not found"
        records = {}
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict) and r.get("kind") == "train" and "loss" in r and "step" in r:
                records[int(r["step"])] = float(r["loss"])
        if not records:
            return f"{path}: no train records"
        steps = max(records) + 1
        try:
            steps = int(yaml.safe_load((d / "config.yaml").read_text())["train"]["steps"])
        except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
            pass
        s = np.array(sorted(records))
        loss = np.array([records[k] for k in s])
        keep = np.isfinite(loss)
        s, loss = s[keep], loss[keep]
        curves.append((runs.C[i] * (s + 1) / steps, _smooth(loss, max(1, int(round(0.05 * len(s)))))))
    return curves


def approach1(runs: Runs, points: int = 40) -> dict[str, Any]:
    curves = load_curves(runs)
    if isinstance(curves, str):
        return {"skipped": curves}
    lo = max(min(c[0] for c, _ in curves), 1.0)
    hi = max(c[-1] for c, _ in curves)
    sizes = np.unique(runs.N)
    envelope = []
    for c in np.geomspace(lo, hi, points):
        covering = [i for i, (cc, _) in enumerate(curves) if cc[0] <= c <= cc[-1]]
        if not covering:
            continue
        losses = {i: float(np.interp(np.log(c), np.log(curves[i][0]), curves[i][1])) for i in covering}
        best = min(losses, key=losses.get)
        n = float(runs.N[best])
        k = float(runs.C[best] / (runs.N[best] * runs.D[best]))
        j = int(np.searchsorted(sizes, n))
        # Trusted when the next smaller and the next larger model both reach this C (and lose):
        # otherwise the optimum may be a model whose curve does not cover C.
        present = {float(runs.N[i]) for i in covering}
        trusted = 0 < j < len(sizes) - 1 and float(sizes[j - 1]) in present and float(sizes[j + 1]) in present
        envelope.append({"C": float(c), "N_opt": n, "D_opt": float(c / (k * n)), "loss": losses[best],
                         "run": runs.names[best], "trusted": trusted})
    out: dict[str, Any] = {"envelope": envelope}
    used = [e for e in envelope if e["trusted"]]
    out["fitted_points"] = len(used)
    if len({e["N_opt"] for e in used}) < 2:
        out["skipped"] = ("fewer than 2 model sizes win the envelope where their neighbours in size also reach that "
                          "compute: no power law")
        return out
    C = np.array([e["C"] for e in used])
    n_law = power_law(C, np.array([e["N_opt"] for e in used]))
    d_law = power_law(C, np.array([e["D_opt"] for e in used]))
    out.update(a=n_law["exponent"], b=d_law["exponent"], N_law=n_law, D_law=d_law,
               note="intervals treat envelope points as independent: optimistic")
    return out


def _one_term(x: np.ndarray, y: np.ndarray, what: str) -> dict[str, Any]:
    if len(x) < 4:
        return {"skipped": f"{what}: {len(x)} distinct values, need >= 4"}
    theta, _ = fit_lse(x[:, None], y)
    return {"E": math.exp(theta[0]), "A": math.exp(theta[1]), "alpha": float(theta[2]), "n_points": len(x),
            "points": [[float(a), float(b)] for a, b in zip(x, y, strict=True)]}


def frontier(runs: Runs) -> tuple[np.ndarray, np.ndarray]:
    """(C, best loss) per budget (budgets of one row included)."""
    C = runs.budgets
    L = np.array([runs.L[runs.budget == g].min() for g in range(len(C))])
    return C, L


def kaplan(runs: Runs) -> dict[str, Any]:
    def best_by(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u = np.unique(values)
        return u, np.array([runs.L[values == v].min() for v in u])

    C, LC = frontier(runs)
    return {"L_N": _one_term(*best_by(runs.N), "L(N)"), "L_D": _one_term(*best_by(runs.D), "L(D)"),
            "L_C": _one_term(C, LC, "L(C)"),
            "form": "L(x) = E + A / x^alpha, x = N (best loss per size), D (best per token count) or C (frontier)"}


def _law_at(law: dict[str, Any], C: float) -> float:
    return law["coef"] * C ** law["exponent"]


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
                row["approach3"]["N_opt_interval"] = _interval(np.array(ns))
                row["approach3"]["D_opt_interval"] = [C / (k * x) for x in reversed(row["approach3"]["N_opt_interval"])]
        for name in ("approach1", "approach2"):
            a = fit.get(name) or {}
            if "N_law" in a:
                n, d = _law_at(a["N_law"], C), _law_at(a["D_law"], C)
                row[name] = {"N_opt": n, "D_opt": d, "tokens_per_param": d / n}
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
        n = _law_at(a2["N_law"], C)
        out["approach2_N_opt_predicted"] = n
        out["approach2_N_opt_vs_best_observed"] = n / float(test.N[best])
    kp = kaplan(train)["L_C"]
    if "E" in kp:
        C = float(test.C[best])
        q = kp["E"] + kp["A"] / C ** kp["alpha"]
        out["kaplan_L_C"] = {"predicted": q, "relative_error": q / float(test.L[best]) - 1}
    return out


def fit_all(runs: Runs, budgets: list[float] | None = None, holdout: str | None = None, bootstrap: int = 100,
            seed: int = 0) -> dict[str, Any]:
    """Every fit of the module docstring, as a JSON-able dict."""
    fit: dict[str, Any] = {
        "n_runs": len(runs.L), "flops_per_param_token": runs.k,
        "flops_source": "flops column" if runs.flops_given else "6*N*D (no flops column)",
        "budgets": [float(c) for c in runs.budgets],
    }
    fit["approach3"] = approach3(runs, bootstrap=bootstrap, seed=seed)
    fit["approach2"] = approach2(runs)
    fit["approach1"] = approach1(runs)
    fit["kaplan"] = kaplan(runs)
    if budgets:
        fit["compute_optimal"] = allocations(fit, budgets, runs.k)
    if holdout:
        fit["holdout"] = holdout_check(runs, holdout, bootstrap, seed)
    fit["approach3"].pop("_samples", None)
    return fit


def parse_budgets(text: str | None) -> list[float]:
    if not text:
        return []
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ScalingError(f"--budgets: expected comma-separated FLOPs values, got {text!r}") from None
    if any(not math.isfinite(x) or x <= 0 for x in out):
        raise ScalingError(f"--budgets: values must be positive, got {text!r}")
    return out


def write_fit(csv_path: str | Path, out_dir: str | Path, budgets: str | None = None, holdout: str | None = None,
              bootstrap: int = 100, seed: int = 0) -> Path:
    runs = load_runs(csv_path)
    fit = fit_all(runs, parse_budgets(budgets), holdout, bootstrap, seed)
    fit["csv"] = str(csv_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fit.json"
    try:
        text = json.dumps(fit, indent=1, default=float, allow_nan=False)
    except ValueError:
        raise ScalingError(f"the fit of {csv_path} has non-finite values (inputs out of range? values near 1e308 "
                           "overflow): nothing was written") from None
    path.write_text(text + "\n")
    return path


def summary(fit: dict[str, Any]) -> str:
    lines = []
    a3 = fit["approach3"]
    ci = a3.get("intervals", {})

    def iv(k: str) -> str:
        return f" [{ci[k][0]:.3g}, {ci[k][1]:.3g}]" if k in ci else ""

    lines.append(f"approach 3: L = {a3['E']:.3g}{iv('E')} + {a3['A']:.3g}/N^{a3['alpha']:.3f}{iv('alpha')} + "
                 f"{a3['B']:.3g}/D^{a3['beta']:.3f}{iv('beta')}; N_opt ∝ C^{a3['a']:.3f}, D_opt ∝ C^{a3['b']:.3f}")
    for name in ("approach2", "approach1"):
        a = fit.get(name, {})
        if "a" in a:
            lines.append(f"{name.replace('approach', 'approach ')}: N_opt ∝ C^{a['a']:.3f}, D_opt ∝ C^{a['b']:.3f}")
        else:
            lines.append(f"{name.replace('approach', 'approach ')}: skipped ({a.get('skipped', '?')})")
    for row in fit.get("compute_optimal", []):
        r = row.get("approach3")
        if r:
            lines.append(f"C = {row['C']:.3g}: N_opt {r['N_opt']:.3g}, D_opt {r['D_opt']:.3g}, "
                         f"{r['tokens_per_param']:.1f} tokens/param, loss {r['loss']:.4f} (approach 3)")
    h = fit.get("holdout")
    if h:
        b = h["best_run"]
        lines.append(f"held out {h['n_test']} runs ({h['holdout']}): best {b['name']} loss {b['loss']:.4f}, predicted "
                     f"{b['predicted']:.4f} ({100 * b['relative_error']:+.2f}%); mean |error| "
                     f"{100 * h['mean_abs_relative_error']:.2f}%")
    return "\n".join(lines)
