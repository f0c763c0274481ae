"""Training metrics: one import path for sizes, FLOPs, peaks / MFU, writers, progress and memory.

The pieces live in their own modules and are re-exported here:

- `llmjax.train.telemetry.flops`: `param_counts`, `matmul_params`, `flops_per_token` (see the
  docstrings for the exact formula).
- `llmjax.train.telemetry.peak`: `peak_flops`, `mfu`: the MFU denominator, from a table of published
  bf16 dense peaks for TPUs and NVIDIA GPUs, or measured (and cached) on CPU.
- `llmjax.train.telemetry.writers`: `MetricsWriter` (JSON lines + TensorBoard), `read_metrics`.
- `llmjax.train.telemetry.progress`: `ProgressBar` (tqdm or plain log lines).
- here: `memory_summary`, XLA's per-device memory estimate of a compiled step.
"""

from __future__ import annotations

from typing import Any

from llmjax.train.telemetry.flops import flops_per_token, matmul_params, mlp_matrices, param_counts
from llmjax.train.telemetry.peak import (
    PEAK_BF16_FLOPS,
    cpu_model_name,
    cpu_peak_flops,
    default_cache_dir,
    lookup_peak,
    measure_matmul_flops,
    mfu,
    peak_flops,
)
from llmjax.train.telemetry.progress import ProgressBar
from llmjax.train.telemetry.writers import MetricsWriter, read_metrics

__all__ = [
    "PEAK_BF16_FLOPS", "MetricsWriter", "ProgressBar", "cpu_model_name", "cpu_peak_flops", "default_cache_dir",
    "flops_per_token", "lookup_peak", "matmul_params", "measure_matmul_flops", "memory_summary", "mfu",
    "mlp_matrices", "param_counts", "peak_flops", "read_metrics",
]

MIB = 1024.0**2

_MEMORY_FIELDS = (
    ("arguments", "argument_size_in_bytes"),
    ("outputs", "output_size_in_bytes"),
    ("temporaries", "temp_size_in_bytes"),
    ("generated code", "generated_code_size_in_bytes"),
)


def memory_summary(compiled: Any) -> str:
    """XLA's per-device memory estimate of a `jax.stages.Compiled`, in MiB.

    total = arguments + outputs + temporaries + generated code - aliased (donated) buffers.
    Returns a short "not available" message if the backend gives no analysis or fields.
    """
    try:
        stats = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - some backends raise instead of returning None
        return f"memory analysis not available ({type(e).__name__})"
    if isinstance(stats, (list, tuple)):
        stats = stats[0] if stats else None
    if stats is None:
        return "memory analysis not available"
    parts, total, found = [], 0, False
    for label, attr in _MEMORY_FIELDS:
        value = getattr(stats, attr, None)
        if value is None:
            continue
        found = True
        total += int(value)
        parts.append(f"{label} {int(value) / MIB:.1f} MiB")
    if not found:
        return "memory analysis not available"
    alias = getattr(stats, "alias_size_in_bytes", None) or 0
    total -= int(alias)
    if alias:
        parts.append(f"aliased -{int(alias) / MIB:.1f} MiB")
    return f"{', '.join(parts)}, total {total / MIB:.1f} MiB"
