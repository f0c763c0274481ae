"""The optimal learning rate against model size, per parametrization, for the μP transfer sweep.

    python3 experiments/scripts/mup_transfer_fit.py experiments/results/mup_transfer/runs.csv OUT.json

`llmjax fit` needs several token budgets (approach 3); the transfer sweep has one. This script
splits the runs by `model.parametrization` and applies the fit's own hyperparameter analysis
(`llmjax.scaling.laws.hparams`: the best learning rate per size, refined by a parabola in log lr
through its neighbours, and the power law lr_opt = coef * N^exponent over the optima inside the
grid) to each, against total parameters N. It prints one line per parametrization and writes
{parametrization: {"optima": [...], "vs_N": {...}}} to OUT.json.
"""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from pathlib import Path

from llmjax.scaling.laws.hparams import configurations, hyperparameter_laws
from llmjax.scaling.laws.runs import load_runs


def main() -> None:
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    with open(src, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), list(reader)
    result = {}
    for name in sorted({r["model.parametrization"] for r in rows}):
        with tempfile.TemporaryDirectory() as tmp:
            part = Path(tmp) / f"{name}.csv"
            with open(part, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=header)
                w.writeheader()
                w.writerows(r for r in rows if r["model.parametrization"] == name)
            runs = load_runs(part)
        laws = hyperparameter_laws(runs, configurations(runs), ["optim.lr"])["optim.lr"]
        result[name] = laws
        law = laws.get("vs_N", {})
        optima = ", ".join(f"N={o['N']:.3g}: {o['optimum']:.3g}{' (edge)' if o['at_edge'] else ''}"
                           for o in laws["optima"])
        fitted = (f"lr_opt = {law['coef']:.3g} N^{law['exponent']:.3f}" if "exponent" in law else
                  laws.get("skipped", law.get("skipped", "no law")))
        print(f"{name}: {fitted}; optima {optima}")
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
