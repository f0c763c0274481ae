"""Scaling-law fits: `llmjax fit --csv runs.csv --out DIR` -> DIR/fit.json.

Notation: N = parameters (`--params total|non_embedding|active`: the CSV's `params`,
`non_embedding_params` or `active_params`), D = `tokens`, L = the loss column (`--loss`, default
`loss` or `final_loss`; `final_bpb` for bits per byte), C = training FLOPs (`--flops formula|xla|6nd`:
the `flops` column, XLA's `flops_xla`, or 6·N·D). k = median of C / (N·D) over the rows is the
FLOPs-per-parameter-per-token factor used to turn C into N·D for the compute-optimal allocations
(6 for the classic 6ND; the project's `flops_per_token` counts matmul weights and attention, so
k differs a little from 6 and varies with size: the allocations are then approximate in
proportion). See `scaling/laws/runs.py` for the columns.

The fits, each in its own module:
- `hparams`: with several runs per (N, D) (hyperparameter axes), `--select best` (default) keeps
  the best of each before the fits below, and fits power laws of the optimal learning rate and
  batch size against N and C.
- `envelope`: Hoffmann et al.'s approach 1 (the minimum-loss envelope of the training curves).
- `chinchilla`: approaches 2 (IsoFLOP parabolas) and 3 (L(N, D) = E + A/N^alpha + B/D^beta),
  compute-optimal allocations at `--budgets`, `--holdout` predictions.
- `kaplan`: L(N), L(D), L(C) with an irreducible term.
- `lse`: the log-space Huber fit and power laws they share.
- `replicates`: with several seeds per point (a `point` column), the fits above use each point's
  mean loss, and the exponents get a second 95% interval from the replicate spread (`replicates`
  in fit.json: a bootstrap over each point's seeds, `--bootstrap` refits from `--seed`).

A partial sweep (rows not done, or points of the `sweep.json` beside the CSV without a row) is
fitted from its done rows; `partial` in fit.json and the first line of the summary name the
others. Too few rows for approach 3 is an error that says how many points are done.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llmjax.scaling import ScalingError
from llmjax.scaling.laws.chinchilla import (
    allocations,
    approach2,
    approach3,
    chinchilla_loss,
    chinchilla_optimum,
    chinchilla_params,
    holdout_check,
)
from llmjax.scaling.laws.envelope import approach1, load_curves
from llmjax.scaling.laws.hparams import apply_selection
from llmjax.scaling.laws.kaplan import frontier, kaplan
from llmjax.scaling.laws.lse import fit_lse, power_law, predict_lse
from llmjax.scaling.laws.replicates import replicate_intervals, summary_lines
from llmjax.scaling.laws.runs import Runs, describe_flops, group_budgets, load_runs, loss_unit
from llmjax.scaling.sweep.collect import partial_line


def fit_all(runs: Runs, budgets: list[float] | None = None, holdout: str | None = None, bootstrap: int = 100,
            seed: int = 0, select: str = "best", hparams: list[str] | None = None) -> dict[str, Any]:
    """Every fit of the module docstring, as a JSON-able dict."""
    all_runs = runs
    runs, selection, laws = apply_selection(runs, select, hparams)
    fit: dict[str, Any] = {
        "options": {**runs.options, "select": select, "hparams": selection["axes"]},
        "loss_unit": runs.loss_unit,
        "n_runs": len(runs.L), "flops_per_param_token": runs.k, "flops_source": describe_flops(runs),
        "budgets": [float(c) for c in runs.budgets],
    }
    if all_runs.notes:
        fit["notes"] = list(all_runs.notes)
    if selection["axes"] or selection["kept"] != selection["rows"]:
        fit["selection"] = selection
    if laws:
        fit["hyperparameters"] = laws
    if all_runs.progress:
        fit["partial"] = all_runs.progress
    try:
        fit["approach3"] = approach3(runs, bootstrap=bootstrap, seed=seed)
    except ScalingError as e:
        if all_runs.progress:  # a partial sweep: say how far it got
            raise ScalingError(f"{partial_line(all_runs.progress)}; too few to fit: {e}") from None
        raise
    fit["approach2"] = approach2(runs)
    spread = replicate_intervals(runs, fit["approach3"], fit["approach2"], bootstrap, seed)
    if spread:
        fit["replicates"] = spread
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


def parse_hparams(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def write_fit(csv_path: str | Path, out_dir: str | Path, budgets: str | None = None, holdout: str | None = None,
              bootstrap: int = 100, seed: int = 0, params: str = "total", loss: str | None = None,
              flops: str = "formula", select: str = "best", hparams: str | None = None) -> Path:
    runs = load_runs(csv_path, params=params, loss=loss, flops=flops)
    fit = fit_all(runs, parse_budgets(budgets), holdout, bootstrap, seed, select, parse_hparams(hparams))
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


def runs_for_plots(csv_path: str | Path, fit: dict[str, Any]) -> Runs:
    """The runs a fit was made from: the CSV read with the fit's options, after its selection."""
    opts = fit.get("options") or {}
    runs = load_runs(csv_path, params=opts.get("params", "total"), loss=opts.get("loss"),
                     flops=opts.get("flops", "formula"))
    return apply_selection(runs, opts.get("select", "best"), opts.get("hparams") or None)[0]


def summary(fit: dict[str, Any]) -> str:
    lines = [partial_line(fit["partial"])] if fit.get("partial") else []
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
    lines += summary_lines(fit)
    for row in fit.get("compute_optimal", []):
        r = row.get("approach3")
        if r:
            lines.append(f"C = {row['C']:.3g}: N_opt {r['N_opt']:.3g}, D_opt {r['D_opt']:.3g}, "
                         f"{r['tokens_per_param']:.1f} tokens/param, loss {r['loss']:.4f} (approach 3)")
    for note in fit.get("notes", []):
        lines.append(f"note: {note}")
    sel = fit.get("selection")
    if sel and sel.get("kept") != sel.get("rows"):
        lines.append(f"selection: {sel['note']}: {sel['kept']} of {sel['rows']} runs fitted")
    for key, entry in (fit.get("hyperparameters") or {}).items():
        for vs in ("vs_N", "vs_C"):
            law = entry.get(vs) or {}
            if "exponent" in law:
                interval = law.get("interval")
                ci = f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""
                lines.append(f"optimal {key} = {law['coef']:.3g} * {law['of']}^{law['exponent']:.3f}{ci} "
                             f"({law['n_points']} optima)")
        if "skipped" in entry or "note" in entry:
            lines.append(f"optimal {key}: {entry.get('skipped') or entry.get('note')}")
    h = fit.get("holdout")
    if h:
        b = h["best_run"]
        lines.append(f"held out {h['n_test']} runs ({h['holdout']}): best {b['name']} loss {b['loss']:.4f}, predicted "
                     f"{b['predicted']:.4f} ({100 * b['relative_error']:+.2f}%); mean |error| "
                     f"{100 * h['mean_abs_relative_error']:.2f}%")
    return "\n".join(lines)


__all__ = ["Runs", "allocations", "approach1", "approach2", "approach3", "chinchilla_loss", "chinchilla_optimum",
           "chinchilla_params", "fit_all", "fit_lse", "frontier", "group_budgets", "holdout_check", "kaplan",
           "load_curves", "load_runs", "loss_unit", "parse_budgets", "power_law", "predict_lse", "runs_for_plots",
           "summary", "write_fit"]
