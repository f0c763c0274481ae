"""Context parallelism on this machine's CPU: XLA's per-device memory of the train step and tokens/s at
long sequences, with the sequence split over context = 1, 2, 4, 8 virtual devices.

    JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8 python3 benchmarks/context_memory.py \
        [--lengths 8192,32768,65536] [--contexts 1,2,4,8] [--steps 2] [section.key=value ...]

One row of `seq` tokens per step on `context` devices (mesh.data=1, mesh.context=C); a small model
(2 layers, d_model 128, chunked attention, chunked loss) so that the sequence dominates the memory.
`--steps 0` compiles only (memory, no timing).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from llmjax.config import load_config, validate
from llmjax.train.setup import build_setup

MODEL = ["model.vocab_size=512", "model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.d_ff=256", "model.compute_dtype=float32", "model.attention=chunked", "model.attention_block_q=1024",
         "model.attention_block_kv=1024", "model.loss_chunk=1024", "train.batch_size=1", "mesh.data=1"]


def measure(length: int, context: int, steps: int, extra: list[str]) -> tuple[float, float | None]:
    """(XLA's per-device temporaries + arguments in MiB, tokens/s or None) of one configuration."""
    cfg = load_config(None, [*MODEL, f"data.seq_len={length}", f"model.max_seq_len={length}",
                             f"mesh.context={context}", *extra])
    validate(cfg, context)
    setup = build_setup(cfg, jax.devices()[:context])
    step = setup.jit_train_step()
    compiled = step.lower(setup.abstract_state, setup.abstract_batch()).compile()
    stats = compiled.memory_analysis()
    mib = (stats.temp_size_in_bytes + stats.argument_size_in_bytes) / 2**20
    if steps == 0:
        return mib, None
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.model.vocab_size, size=(1, length), dtype=np.int32)
    batch = setup.put_batch({"inputs": tokens, "targets": np.roll(tokens, -1, 1),
                             "segment_ids": np.ones_like(tokens), "positions": np.arange(length, dtype=np.int32)[None],
                             "weights": np.ones((1, length), np.float32)})
    state = setup.init_state()
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    return mib, steps * length / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="8192,32768,65536")
    p.add_argument("--contexts", default="1,2,4,8")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    jax.config.update("jax_threefry_partitionable", True)
    print("| tokens | context | memory per device (XLA) | tokens/s |\n|---|---|---|---|", flush=True)
    for length in (int(x) for x in args.lengths.split(",")):
        for context in (int(x) for x in args.contexts.split(",")):
            mib, tps = measure(length, context, args.steps, args.overrides)
            speed = "-" if tps is None else f"{tps:,.0f}"
            print(f"| {length:,} | {context} | {mib:,.0f} MiB | {speed} |", flush=True)


if __name__ == "__main__":
    main()
