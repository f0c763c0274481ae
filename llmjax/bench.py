"""`llmjax bench`: speed and memory figures for a config, on random tokens.

Prints tokens/s, step time, MFU (against the peak of `train.metrics.peak_flops`),
compile time and XLA's per-device memory estimate. A benchmark, not a test: it asserts
nothing. Data loading is excluded (random tokens, one document per row).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import jax
import numpy as np

from llmjax.config import Config
from llmjax.data.stream.row_objectives import number_documents
from llmjax.models.families import build_family
from llmjax.parallel.mesh import describe as describe_mesh
from llmjax.train.preflight import preflight
from llmjax.train.setup import build_setup
from llmjax.train.telemetry.metrics import memory_summary, mfu, param_counts, peak_flops

WARMUP_STEPS = 2


def random_batch(cfg: Config, rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`rows` examples of the model family's objective on random tokens (one document per row)."""
    family = build_family(cfg.model)
    tokenizer = SimpleNamespace(eos_id=3, vocab_size=cfg.model.vocab_size - cfg.model.reserved_ids)
    objective = family.objective(cfg.data.seq_len, tokenizer)
    rng = np.random.default_rng(seed)
    n = objective.raw_length(cfg.data.seq_len)
    examples = [objective(number_documents(rng.integers(4, tokenizer.vocab_size, n, dtype=np.int32), 3), rng)
                for _ in range(rows)]
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def bench(cfg: Config, steps: int = 10) -> int:
    """Compile and time `steps` train steps of `cfg`; print the figures. Returns 0."""
    preflight(cfg)  # the config's rules, and a parameter estimate against the devices' memory
    setup = build_setup(cfg)
    counts = param_counts(setup.params.shapes, setup.params.logical, cfg.model)
    fpt = setup.family.flops_per_token(cfg.data.seq_len)
    peak, source = peak_flops(jax.devices(), cfg.model.compute_dtype, cfg.data.cache_dir)
    state = setup.init_state()

    t0 = time.perf_counter()
    step_fn = setup.jit_train_step().lower(setup.abstract_state, setup.abstract_batch()).compile()
    compile_s = time.perf_counter() - t0

    local_rows = cfg.train.batch_size // jax.process_count()
    batch = setup.put_batch(random_batch(cfg, local_rows, seed=jax.process_index()))
    for _ in range(WARMUP_STEPS):
        state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - t0) / steps

    tokens_per_s = cfg.train.batch_size * setup.family.tokens_per_example(cfg.data.seq_len) / step_s
    util = mfu(tokens_per_s, fpt, peak)
    m = cfg.model
    lines = [
        f"config: {m.family}, {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads ({m.n_kv_heads} kv), "
        f"d_ff {m.d_ff}, "
        f"vocab {m.vocab_size}, batch {cfg.train.batch_size}x{cfg.data.seq_len}, "
        f"{m.compute_dtype} compute / {m.param_dtype} params, remat {m.remat}",
        f"{describe_mesh(setup.mesh)}",
        *([setup.schedule.describe()] if setup.schedule is not None else []),
        f"params: {counts['total']:,} total, {counts['non_embedding']:,} non-embedding, {counts['active']:,} active",
        *([f"moe: {m.moe.num_experts} experts, top-{m.moe.top_k}, "
           + (f"capacity factor {m.moe.capacity_factor}" if m.moe.capacity_factor > 0 else "dropless")
           + f", {m.moe.shared_experts} shared (FLOPs/MFU count active experts only)"] if m.moe.enabled else []),
        f"flops/token: {fpt / 1e6:.2f} MFLOP ({setup.family.name}: 6N + attention, see ModelFamily.flops_per_token)",
        f"compile time: {compile_s:.2f} s",
        f"step time: {step_s * 1e3:.1f} ms (mean of {steps} steps after {WARMUP_STEPS} warm-up)",
        f"tokens/s: {tokens_per_s:,.0f}",
        f"MFU: {util * 100:.1f}% of {peak / 1e12:.2f} TFLOP/s ({source})" if util is not None
        else f"MFU: n/a ({source})",
        f"memory per device: {memory_summary(step_fn)}",
        f"final loss: {float(jax.device_get(metrics['loss'])):.4f}",
    ]
    if jax.process_index() == 0:
        print("\n".join(lines), flush=True)
    return 0
