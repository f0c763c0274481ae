"""Do two step variants (or two versions of the code) give the same losses? (issue 27, point 3)

Trains `--steps` steps of a config with the real train step on seeded random batches (a new batch each
step) and writes the losses to a JSON file; with `--against FILE` it compares them with another run's
and prints whether they are bit-identical and the largest relative difference.

    # the same config, this tree against another checkout (e.g. main), 100 steps:
    PYTHONPATH=/work/main python benchmarks/step_numerics.py --out /tmp/main.json
    PYTHONPATH=. python benchmarks/step_numerics.py --out /tmp/branch.json --against /tmp/main.json
    # a changed order of operations (the chunked loss) against the default:
    PYTHONPATH=. python benchmarks/step_numerics.py --out /tmp/chunk.json --against /tmp/branch.json \
        model.loss_chunk=64

Exit status 1 when `--tolerance` (relative, default 1e-6) is exceeded.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", required=True)
    p.add_argument("--against", default=None)
    p.add_argument("--tolerance", type=float, default=1e-6)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    from llmjax.bench import random_batch
    from llmjax.config import load_config
    from llmjax.runtime import setup_jax
    from llmjax.train.setup import build_setup

    cfg = load_config(args.config, args.overrides)
    setup_jax(cfg)
    setup = build_setup(cfg)
    step = setup.jit_train_step()
    state = setup.init_state()
    losses = []
    for i in range(args.steps):
        state, metrics = step(state, setup.put_batch(random_batch(cfg, cfg.train.batch_size, seed=i)))
        losses.append(float(jax.device_get(metrics["loss"])))
    with open(args.out, "w") as f:
        json.dump({"overrides": args.overrides, "losses": losses}, f)
    print(f"{args.steps} steps, loss {losses[0]:.6f} -> {losses[-1]:.6f}; written to {args.out}")
    if args.against is None:
        return 0
    with open(args.against) as f:
        other = np.array(json.load(f)["losses"])
    mine = np.array(losses)
    if other.shape != mine.shape:
        print(f"different step counts: {other.shape[0]} vs {mine.shape[0]}")
        return 1
    rel = np.abs(mine - other) / np.maximum(np.abs(other), 1e-30)
    same = bool(np.array_equal(mine, other))
    print(f"bit-identical: {same}; max relative difference {rel.max():.3g} (step {int(rel.argmax())}); "
          f"tolerance {args.tolerance:g}")
    return 0 if rel.max() <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
