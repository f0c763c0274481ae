"""Checks before anything is built: the config against these devices, and whether the model can fit at all.

The config's own rules ran when it was loaded (`llmjax.config.validate_config`). `preflight(cfg)`
runs the rules that need the devices (`validate_mesh`: the mesh resolved against the device
count) and this machine (`check_environment`; with `model.matmul_dtype=fp8`, that the backend compiles
float8 matmuls: `llmjax.kernels.fp8.check_backend`), and then `check_fits`: the parameters,
their gradients and the optimizer state, estimated from the config (`flops.estimate_params`,
no model is built), must fit into the memory of all devices together, even if perfectly
sharded. It is a lower bound on what training needs (activations come on top), so it never
refuses a config that could run, and it refuses absurd sizes (`model.vocab_size=1e12`,
`model.n_layers=1e8`) in milliseconds with the responsible keys named, where building the
model would hang or run out of memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from llmjax.config import Config, ConfigError, ModelConfig, check_environment, validate_mesh
from llmjax.train.telemetry.flops import estimate_params

GIB = 1024.0**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def optimizer_slots(cfg: Config) -> int:
    """Parameter-sized optimizer buffers: adamw 2 (first and second moments), lion 1, sgd 1 with momentum,
    adafactor 0 (its factored statistics are far smaller than the parameters)."""
    o = cfg.optim
    return {"adamw": 2, "lion": 1, "sgd": 1 if o.b1 > 0 else 0}.get(o.name, 0)


def training_bytes(cfg: Config) -> tuple[int, int]:
    """(parameters, lower bound on the bytes training holds: parameters + gradients + optimizer state)."""
    n = sum(estimate_params(cfg.model).values())
    return n, n * DTYPE_BYTES[cfg.model.param_dtype] * (2 + optimizer_slots(cfg))


def devices_memory(devices: Sequence[Any]) -> tuple[int, str] | None:
    """(total bytes of memory of `devices`, a description), or None when the backend does not say.

    Accelerators report their own memory (`memory_stats()["bytes_limit"]`, summed over the local
    devices, times the process count). CPU devices (virtual ones included) share the host's RAM,
    counted once per process."""
    import jax

    devices = list(devices)
    local = [d for d in devices if d.process_index == jax.process_index()] or devices
    if all(d.platform == "cpu" for d in local):
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
        return ram * jax.process_count(), f"{len(devices)} CPU device(s) sharing {ram / GIB:.1f} GiB of RAM" + (
            f" on each of {jax.process_count()} processes" if jax.process_count() > 1 else "")
    total = 0
    for d in local:
        try:
            stats = d.memory_stats() or {}
        except Exception:  # noqa: BLE001 - some backends raise instead of returning None
            return None
        if not stats.get("bytes_limit"):
            return None
        total += int(stats["bytes_limit"])
    total *= jax.process_count()
    return total, f"{len(devices)} x {local[0].device_kind}, {total / GIB:,.1f} GiB in all"


def _largest_part(model: ModelConfig) -> str:
    """The keys responsible for the largest part of the parameter estimate, with their values."""
    parts = estimate_params(model)
    name = max(parts, key=lambda k: parts[k])
    m = model
    if name in ("embedding", "lm_head"):
        tied = "" if m.tie_embeddings else " (embedding and untied LM head)"
        return f"model.vocab_size={m.vocab_size} x model.d_model={m.d_model}{tied}"
    if name == "positions":
        return f"model.max_seq_len={m.max_seq_len} x model.d_model={m.d_model} (learned positions)"
    per_layer = parts["layers"] // max(m.n_layers, 1)
    experts = f", model.moe.num_experts={m.moe.num_experts}" if m.moe.enabled else ""
    return (f"model.n_layers={m.n_layers} layers x {per_layer:,} each (model.d_model={m.d_model}, "
            f"model.d_ff={m.d_ff}, model.n_heads={m.n_heads}{experts})")


def check_fits(cfg: Config, devices: Sequence[Any]) -> None:
    """ConfigError when parameters + gradients + optimizer state cannot fit in all of `devices`' memory."""
    memory = devices_memory(devices)
    if memory is None:
        return
    available, where = memory
    n, need = training_bytes(cfg)
    if need <= available:
        return
    raise ConfigError(
        f"model: about {n:.3g} parameters (estimated from the config; most from {_largest_part(cfg.model)}) need "
        f"at least {need / GIB:,.1f} GiB for {cfg.model.param_dtype} parameters, gradients and {cfg.optim.name} "
        f"state, more than the memory of {where}")


def preflight(cfg: Config) -> dict[str, int]:
    """`validate_mesh` against this process's view of the devices, `check_environment`, then `check_fits`.
    Returns the mesh shape. The config's own rules are `load_config`'s (a config built in code is checked
    with `llmjax.config.rules.validate`)."""
    import jax

    shape = validate_mesh(cfg, jax.device_count())
    check_environment(cfg)
    if cfg.model.matmul_dtype == "fp8":
        from llmjax.kernels.fp8 import check_backend

        check_backend(jax.devices())
    check_fits(cfg, jax.devices())
    return shape
