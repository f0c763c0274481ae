"""SFT with full fine-tuning against LoRA on the same model: train-step throughput and XLA's memory figures.

    python3 benchmarks/post_training.py [--rounds 3] [--steps 5] [section.key=value ...]

Each mode compiles the real SFT train step on one device (experiments/data/sft_chat.jsonl through the chat
template, packed rows); the modes then run in alternation, `--rounds` times `--steps` timed steps each (after
one warm-up step), so a change in the machine's load hits every mode alike. Printed per mode: the median
tokens/s (rows x seq_len per step), the state's bytes (parameters + frozen base + optimizer state) and XLA's
per-device estimate of the step (arguments + outputs + temporaries - donated).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from llmjax.config import load_config, validate
from llmjax.data.post.sft_data import SFTData
from llmjax.train.setup import build_setup

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = ["model.vocab_size=512", "model.d_model=256", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=4",
            "model.d_ff=1024", "model.max_seq_len=256", "model.compute_dtype=float32", "model.scan_layers=false",
            "data.seq_len=256", "train.batch_size=8", "train.steps=100", "train.objective=sft", "mesh.data=1",
            f"data.path={ROOT / 'experiments/data/sft_chat.jsonl'}",
            f"data.tokenizer={ROOT / 'experiments/data/chat_tokenizer'}"]
MODES = {
    "full fine-tuning": [],
    "LoRA r=8 q,k,v,o,mlp": ["lora.rank=8", "lora.targets=[q,k,v,o,mlp]"],
    "LoRA r=8 q,v": ["lora.rank=8", "lora.targets=[q,v]"],
}


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    jax.config.update("jax_threefry_partitionable", True)
    runs = {}
    for name, extra in MODES.items():
        cfg = load_config(None, [*DEFAULTS, *extra, *args.overrides])
        validate(cfg, 1)
        setup = build_setup(cfg, jax.devices()[:1])
        compiled = setup.jit_train_step().lower(setup.abstract_state, setup.abstract_batch()).compile()
        stats = compiled.memory_analysis()
        xla = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
               - stats.alias_size_in_bytes)
        state = setup.init_state()
        it = SFTData(cfg).train_iterator()
        batch = setup.put_batch(next(it))
        state, m = compiled(state, batch)  # warm-up
        jax.block_until_ready(m)
        runs[name] = {"setup": setup, "step": compiled, "state": state, "batch": batch, "tps": [],
                      "trained": nbytes(state.params), "frozen": nbytes(state.frozen), "opt": nbytes(state.opt_state),
                      "xla": xla, "temp": stats.temp_size_in_bytes,
                      "tokens": cfg.train.batch_size * cfg.data.seq_len}
    for _ in range(args.rounds):
        for r in runs.values():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                r["state"], m = r["step"](r["state"], r["batch"])
            jax.block_until_ready(m)
            r["tps"].append(args.steps * r["tokens"] / (time.perf_counter() - t0))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {args.rounds} rounds x {args.steps} steps")
    ref = None
    mib = 2**20
    for name, r in runs.items():
        tps = statistics.median(r["tps"])
        ref = ref or (tps, r["xla"])
        print(f"{name:24s} {tps:8.0f} tokens/s ({tps / ref[0]:.2f}x)  trained {r['trained'] / mib:6.2f} MiB  "
              f"frozen {r['frozen'] / mib:6.2f} MiB  optimizer {r['opt'] / mib:6.2f} MiB  XLA step "
              f"{r['xla'] / mib:7.1f} MiB ({r['xla'] / ref[1]:.2f}x; temporaries {r['temp'] / mib:.1f} MiB)")
    np.set_printoptions()


if __name__ == "__main__":
    main()
