"""Hoffmann et al. 2022, approach 1: the minimum-loss envelope of the training curves.

Every training curve gives (C_t, L_t) at each logged step t (C_t = C·(t+1)/steps, curves smoothed
by a centred moving average over 5% of the steps). On a log grid of C, the run with the lowest
interpolated loss gives N_opt(C), and D_opt = C / (k·N_opt). Power laws N_opt ∝ C^a,
D_opt ∝ C^b by least squares in log-log, over the "trusted" envelope points: those where the
next smaller and the next larger model both reach C too (at the ends of the C range, or of the
sizes, the true optimum may be a model whose curve does not cover C).

Needs the run directories (the CSV's `workdir` column, relative to the CSV); skipped with a
note otherwise. A point trained with several seeds (`replicates`) contributes the mean of its
replicates' curves. With a decaying LR schedule, intermediate points of a curve are not
compute-optimal runs of that length (Hoffmann et al. use cosine cycles matched to each length),
so approach 1 is indicative.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from llmjax.scaling.laws.lse import power_law
from llmjax.scaling.laws.runs import Runs


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
        d = _run_dir(runs.base_dir, wd)
        replicates = runs.replicate_workdirs[i] if runs.replicate_workdirs is not None else [wd]
        read = [_train_losses(_run_dir(runs.base_dir, r)) for r in replicates]
        notes = [r for r in read if isinstance(r, str)]
        if notes:
            return notes[0]
        found = [r for r in read if isinstance(r, dict)]
        records = found[0]
        if len(found) > 1:  # replicates: the mean curve, over the steps every replicate logged
            common = set.intersection(*(set(r) for r in found))
            records = {k: float(np.mean([r[k] for r in found])) for k in sorted(common)}
            if not records:
                return f"the replicates of {runs.names[i]} logged no train step in common"
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


def _run_dir(base_dir: Path, workdir: str) -> Any:
    """A CSV's `workdir`: relative to the CSV's directory, or a URL as it is (a sweep collected from gs://)."""
    from llmjax.storage import any_path, is_url

    return any_path(workdir) if is_url(workdir) else base_dir / workdir


def _train_losses(d: Any) -> dict[int, float] | str:
    """step -> train loss of the run directory `d`'s metrics.jsonl, or a note saying why not."""
    path = d / "metrics.jsonl"
    if not path.is_file():
        return f"{path} not found"
    records = {}
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and r.get("kind") == "train" and "loss" in r and "step" in r:
            records[int(r["step"])] = float(r["loss"])
    return records or f"{path}: no train records"


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
        best = min(losses, key=losses.__getitem__)
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
