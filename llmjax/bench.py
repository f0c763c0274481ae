"""`llmjax bench`: speed and memory figures for a config, on random tokens.

After `warmup` untimed steps it times `rounds` rounds of `steps` steps each and prints the median and
the range (min-max) over rounds of the step time, tokens/s and MFU (against the peak of
`train.metrics.peak_flops`), with the machine's load average before and after and the CPU model
(timings on a busy machine are not comparable with an idle one's), compile time and XLA's
per-device memory estimate; `--json` prints the same as one JSON object. `--profile` adds where
the step's time goes (`llmjax.train.telemetry.step_profile`) and the host's work between steps.
A benchmark, not a test: it asserts nothing. Data loading is excluded (random tokens, one document
per row; `llmjax bench-data` measures the pipeline).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from types import SimpleNamespace
from typing import Any

import jax
import numpy as np

from llmjax.config import Config
from llmjax.data.stream.row_objectives import number_documents
from llmjax.models.families import build_family
from llmjax.parallel.mesh import describe as describe_mesh
from llmjax.runtime import tcmalloc_preloaded
from llmjax.train.preflight import preflight
from llmjax.train.setup import Setup, build_setup
from llmjax.train.telemetry.metrics import cpu_model_name, memory_summary, mfu, param_counts, peak_flops
from llmjax.train.telemetry.step_profile import format_rows, profile_step

WARMUP_STEPS = 2
ROUNDS = 5


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


def spread(values: list[float]) -> dict[str, float]:
    """{median, min, max} of `values` (one per round)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on this platform
        return []


def machine() -> dict[str, object]:
    """What a timing depends on besides the code: CPU model and count, devices, jax version, the load now."""
    return {"cpu": cpu_model_name(), "cpus": os.cpu_count(), "devices": f"{jax.device_count()} x "
            f"{jax.devices()[0].device_kind}", "jax": jax.__version__, "python": platform.python_version(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "malloc": malloc_name()}


def malloc_name() -> str:
    """"tcmalloc" where this process runs with it preloaded (`llmjax.runtime.exec_with_tcmalloc`), else "system"."""
    return "tcmalloc" if tcmalloc_preloaded() else "system"


def _host_work(setup: Setup, rows: dict[str, np.ndarray], metrics: dict[str, jax.Array], rounds: int
               ) -> dict[str, float]:
    """Median seconds of the host's work between steps: putting a batch on the devices, reading the loss."""
    put, read = [], []
    for _ in range(max(rounds, 3)):
        t0 = time.perf_counter()
        jax.block_until_ready(setup.put_batch(rows))
        put.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        float(jax.device_get(metrics["loss"]))
        read.append(time.perf_counter() - t0)
    return {"batch transfer (put_batch)": statistics.median(put), "metric read (float(loss))": statistics.median(read)}


def bench(cfg: Config, steps: int = 10, rounds: int = ROUNDS, warmup: int = WARMUP_STEPS, as_json: bool = False,
          profile: bool = False) -> int:
    """Compile `cfg`'s train step, run `warmup` steps, then time `rounds` rounds of `steps` steps; print the
    figures (text, or one JSON object with `as_json`), with the step-time breakdown if `profile`. Returns 0."""
    setup, result = measure(cfg, steps, rounds, warmup, profile)
    if jax.process_index() == 0:
        print(json.dumps(result, indent=1) if as_json else "\n".join(report(cfg, setup, result)), flush=True)
    return 0


def measure(cfg: Config, steps: int = 10, rounds: int = ROUNDS, warmup: int = WARMUP_STEPS, profile: bool = False
            ) -> tuple[Setup, dict[str, Any]]:
    """`bench`'s measurements: (the setup, the figures as a JSON-ready dict)."""
    preflight(cfg)  # the config's rules, and a parameter estimate against the devices' memory
    setup = build_setup(cfg)
    counts = param_counts(setup.params.shapes, setup.params.logical, cfg.model)
    fpt = setup.family.flops_per_token(cfg.data.seq_len)
    peak, source = peak_flops(jax.devices(), cfg.model.compute_dtype, cfg.data.cache_dir)
    state = setup.init_state()

    cached = bool(getattr(jax.config, "jax_enable_compilation_cache"))  # noqa: B009 - not in the stubs
    if profile:  # the persistent cache's keys ignore op names: a cached step could carry another version's names
        jax.config.update("jax_enable_compilation_cache", False)
    t0 = time.perf_counter()
    try:
        step_fn = setup.jit_train_step().lower(setup.abstract_state, setup.abstract_batch()).compile()
    finally:
        jax.config.update("jax_enable_compilation_cache", cached)
    compile_s = time.perf_counter() - t0

    local_rows = cfg.train.batch_size // jax.process_count()
    rows = random_batch(cfg, local_rows, seed=jax.process_index())
    batch = setup.put_batch(rows)
    metrics = None
    for _ in range(warmup):
        state, metrics = step_fn(state, batch)
    jax.block_until_ready((state, metrics))
    load_before = _load()
    round_s = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = step_fn(state, batch)
        jax.block_until_ready((state, metrics))
        round_s.append((time.perf_counter() - t0) / steps)
    load_after = _load()
    assert metrics is not None

    tokens_per_step = cfg.train.batch_size * setup.family.tokens_per_example(cfg.data.seq_len)
    step = spread(round_s)
    tps = spread([tokens_per_step / s for s in round_s])
    utils = [mfu(tokens_per_step / s, fpt, peak) for s in round_s]
    util = spread([u for u in utils if u is not None]) if all(u is not None for u in utils) else None
    result: dict[str, Any] = {
        "machine": machine(), "load_before": load_before, "load_after": load_after,
        "steps": steps, "rounds": rounds, "warmup": warmup, "compile_s": compile_s,
        "step_s": {**step, "rounds": round_s}, "tokens_per_s": tps, "mfu": util, "peak_flops": peak,
        "peak_source": source, "flops_per_token": fpt, "params": counts, "memory": memory_summary(step_fn),
        "final_loss": float(jax.device_get(metrics["loss"])),
    }
    state_box = [state]

    def one_step() -> object:
        state_box[0], out = step_fn(state_box[0], batch)
        return out

    if profile:
        result["profile"] = profile_step(step_fn, one_step, step["median"], steps=max(steps, 3))
        result["host"] = _host_work(setup, rows, metrics, rounds)
    return setup, result


def _range(d: dict[str, float], fmt: str, scale: float = 1.0) -> str:
    return f"{format(d['median'] * scale, fmt)} median, {format(d['min'] * scale, fmt)}-{format(d['max'] * scale, fmt)}"


def report(cfg: Config, setup: Setup, r: dict[str, Any]) -> list[str]:
    """The text report of `measure`'s result."""
    m, counts, mach = cfg.model, r["params"], r["machine"]
    util = r["mfu"]
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
        f"flops/token: {r['flops_per_token'] / 1e6:.2f} MFLOP ({setup.family.name}: 6N + attention, "
        "see ModelFamily.flops_per_token)",
        f"machine: {mach['cpu']} ({mach['cpus']} CPUs), {mach['devices']}, jax {mach['jax']}, malloc "
        f"{mach['malloc']}; load average "
        f"(1/5/15 min) {'/'.join(map(str, r['load_before']))} before, {'/'.join(map(str, r['load_after']))} after",
        f"compile time: {r['compile_s']:.2f} s",
        f"step time: {_range(r['step_s'], '.1f', 1e3)} ms over {r['rounds']} rounds of {r['steps']} steps "
        f"(after {r['warmup']} warm-up steps)",
        f"tokens/s: {_range(r['tokens_per_s'], ',.0f')}",
        f"MFU: {_range(util, '.1f', 100)} % of {r['peak_flops'] / 1e12:.2f} TFLOP/s ({r['peak_source']})"
        if util is not None else f"MFU: n/a ({r['peak_source']})",
        f"memory per device: {r['memory']}",
        f"final loss: {r['final_loss']:.4f}",
    ]
    if "profile" in r:
        lines += format_rows(r["profile"], r["host"])
    return lines
