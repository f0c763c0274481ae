"""Alternating-round timing of train-step variants in one process (issue 27): each variant is a set of
config overrides; every round times each variant once, in turn, so load changes hit all variants alike.

    PYTHONPATH=. python benchmarks/step_ablation.py --rounds 5 --steps 5 \
        --base model.d_model=64 model.d_ff=256 model.n_heads=1 model.n_kv_heads=1 \
        --variant "full loss=" --variant "chunk 64=model.loss_chunk=64"

Prints per variant the median and range (min-max) of the step time over rounds, its ratio to the first
variant's median, and the load average before/after; and the same for the process's CPU time per step
(user + system over all threads), which a loaded machine disturbs far less than the wall time (issue 27:
at load 14-22 the wall time of one program varied 3x between rounds, its CPU time ~10 %).
A variant spec is "NAME=override override ...".
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax

from llmjax.bench import random_batch
from llmjax.config import load_config
from llmjax.runtime import setup_jax
from llmjax.train.setup import build_setup


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--base", nargs="*", default=[], help="overrides every variant shares")
    p.add_argument("--variant", action="append", required=True, help='"NAME=override override ..."')
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()

    variants = []
    for spec in args.variant:
        name, _, overrides = spec.partition("=")
        cfg = load_config(args.config, [*args.base, *overrides.split()])
        setup_jax(cfg)
        setup = build_setup(cfg)
        step = setup.jit_train_step().lower(setup.abstract_state, setup.abstract_batch()).compile()
        state, batch = setup.init_state(), setup.put_batch(random_batch(cfg, cfg.train.batch_size))
        for _ in range(args.warmup):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        variants.append({"name": name, "step": step, "state": state, "batch": batch, "times": [], "cpu": []})
    load_before = os.getloadavg()
    for _ in range(args.rounds):
        for v in variants:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                v["state"], metrics = v["step"](v["state"], v["batch"])
            jax.block_until_ready((v["state"], metrics))
            v["times"].append((time.perf_counter() - t0) / args.steps)
            v["cpu"].append((time.process_time() - c0) / args.steps)
    load_after = os.getloadavg()
    base = statistics.median(variants[0]["times"])
    base_cpu = statistics.median(variants[0]["cpu"])
    print(f"load average before {load_before[0]:.1f}/{load_before[1]:.1f}, after {load_after[0]:.1f}/"
          f"{load_after[1]:.1f}; {args.rounds} alternating rounds of {args.steps} steps; {' '.join(args.base)}")
    for v in variants:
        t = v["times"]
        med = statistics.median(t)
        print(f"{v['name']:28s} {med * 1e3:8.1f} ms median ({min(t) * 1e3:.1f}-{max(t) * 1e3:.1f})  "
              f"{med / base:5.2f}x of {variants[0]['name']}")
        c = v["cpu"]
        cmed = statistics.median(c)
        print(f"{'  CPU time':28s} {cmed * 1e3:8.1f} ms median ({min(c) * 1e3:.1f}-{max(c) * 1e3:.1f})  "
              f"{cmed / base_cpu:5.2f}x")


if __name__ == "__main__":
    main()
