"""Lag-1 autocorrelation of the detrended per-step train loss of a run (how correlated consecutive batches are).

    python experiments/scripts/loss_autocorrelation.py runs/default [--first 150] [--last 600] [--window 31]

Reads `<workdir>/metrics.jsonl`, takes the train loss of every step, subtracts a centred moving average of
`window` steps (at the ends: the mean of the steps inside the window), and prints the lag-1 autocorrelation of
the residuals over steps first..last, with the evaluation losses. Independent batches give about 0; the stream
before documents became the shuffle unit gave 0.36 on the default quickstart (issue 23).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def detrended_lag1(steps: np.ndarray, loss: np.ndarray, first: int, last: int, window: int) -> float:
    """steps, loss: [n] (steps increasing). The lag-1 autocorrelation of loss - centred moving average, over the
    steps in [first, last]."""
    c = np.concatenate([[0.0], np.cumsum(loss)])
    idx = np.arange(len(loss))
    lo, hi = np.maximum(idx - window // 2, 0), np.minimum(idx + window // 2 + 1, len(loss))
    trend = (c[hi] - c[lo]) / (hi - lo)
    keep = (steps >= first) & (steps <= last)
    r = (loss - trend)[keep]
    r = r - r.mean()
    return float(np.sum(r[1:] * r[:-1]) / np.sum(r * r))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", type=Path)
    p.add_argument("--first", type=int, default=150)
    p.add_argument("--last", type=int, default=600)
    p.add_argument("--window", type=int, default=31)
    a = p.parse_args()
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    for line in (a.workdir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train" and "loss" in r:
            train[int(r["step"])] = float(r["loss"])
        elif r.get("kind") == "eval" and "eval_loss" in r:
            evals[int(r["step"])] = float(r["eval_loss"])
    steps = np.array(sorted(train))
    loss = np.array([train[s] for s in steps])
    rho = detrended_lag1(steps, loss, a.first, a.last, a.window)
    print("eval loss: " + ", ".join(f"step {s}: {v:.3f}" for s, v in sorted(evals.items())))
    late = loss[steps >= a.first]
    print(f"train loss steps {a.first}-{a.last}: min {late.min():.2f}, max {late.max():.2f}")
    print(f"lag-1 autocorrelation of the detrended train loss (centred {a.window}-step moving average, steps "
          f"{a.first}-{a.last}): {rho:.3f}")


if __name__ == "__main__":
    main()
