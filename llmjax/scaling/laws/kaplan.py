"""Kaplan et al. 2020 style laws with an irreducible term: L(x) = E + A / x^alpha.

Fitted with the log-space Huber fit (`lse.fit_lse`, one term): L(N) over the best loss of each
size, L(D) over the best loss of each token count, L(C) over the loss-compute frontier (the best
loss of each budget). L(N) and L(D) need data- and size-unlimited runs respectively, which an
IsoFLOP sweep does not have: on one their fits are indicative at best.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from llmjax.scaling.laws.lse import fit_lse
from llmjax.scaling.laws.runs import Runs


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
