"""XLA's memory analysis of the train step on this machine's CPU (compile only, nothing runs) with
the dense loss and with `model.loss_chunk`: the figures of the README's chunked cross-entropy table.

    python3 benchmarks/loss_memory.py [--chunks 0,128] [section.key=value ...]

Defaults: the default model with vocab 131072, seq 2048, batch 2 on one device.
"""

from __future__ import annotations

import argparse
import time

import jax

from llmjax.config import load_config, validate
from llmjax.train.setup import build_setup

DEFAULTS = ["model.vocab_size=131072", "data.seq_len=2048", "model.max_seq_len=2048", "train.batch_size=2",
            "mesh.data=1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", default="0,128", help="model.loss_chunk values, comma-separated (0: dense)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    jax.config.update("jax_threefry_partitionable", True)
    for chunk in (int(c) for c in args.chunks.split(",")):
        cfg = load_config(None, [*DEFAULTS, *args.overrides, f"model.loss_chunk={chunk}"])
        validate(cfg, 1)
        setup = build_setup(cfg, jax.devices()[:1])
        t0 = time.perf_counter()
        stats = setup.jit_train_step().lower(setup.abstract_state, setup.abstract_batch()).compile().memory_analysis()
        print(f"loss_chunk={chunk}: temporaries {stats.temp_size_in_bytes / 2**20:,.0f} MiB, arguments "
              f"{stats.argument_size_in_bytes / 2**20:,.0f} MiB (compiled in {time.perf_counter() - t0:.0f} s)",
              flush=True)


if __name__ == "__main__":
    main()
