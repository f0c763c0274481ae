"""Per-chip memory figures for fit verdicts and rooflines (the peak FLOP/s table is
`llmjax.train.telemetry.metrics.PEAK_BF16_FLOPS`; the same `device_kind` substrings select a row).

Published figures: Google Cloud TPU system-architecture pages (v4: 32 GiB HBM, 1,200 GB/s;
v5e: 16 GiB, 819 GB/s; v5p: 95 GiB, 2,765 GB/s; v6e: 32 GiB, 1,640 GB/s) and NVIDIA's data
sheets (H100 SXM: 80 GB, 3.35 TB/s; H100 PCIe: 80 GB, 2.0 TB/s; H200: 141 GB, 4.8 TB/s;
A100 SXM 80 GB: 2.039 TB/s).
"""

from __future__ import annotations

import dataclasses

GIB = 1024.0**3

# (case-insensitive substring of jax.Device.device_kind, HBM bytes, HBM bytes/s); first match wins.
HBM: tuple[tuple[str, float, float], ...] = (
    ("tpu v6 lite", 32 * GIB, 1640e9),
    ("tpu v6e", 32 * GIB, 1640e9),
    ("tpu v5 lite", 16 * GIB, 819e9),
    ("tpu v5e", 16 * GIB, 819e9),
    ("tpu v5p", 95 * GIB, 2765e9),
    ("tpu v5", 95 * GIB, 2765e9),  # v5p reports itself as "TPU v5"
    ("tpu v4", 32 * GIB, 1200e9),
    ("h100 pcie", 80e9, 2.0e12),
    ("h100", 80e9, 3.35e12),
    ("h200", 141e9, 4.8e12),
    ("a100", 80e9, 2.039e12),
)


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip's published figures."""

    name: str
    peak_flops: float  # bf16 dense FLOP/s
    hbm_bytes: float
    hbm_bytes_per_s: float


def lookup_chip(device_kind: str) -> Chip | None:
    """The figures for a `device_kind` string ("TPU v5 lite", "NVIDIA H100 80GB HBM3"), or None."""
    from llmjax.train.telemetry.metrics import lookup_peak

    peak = lookup_peak(device_kind)
    kind = device_kind.lower()
    hbm = next(((c, b) for pattern, c, b in HBM if pattern in kind), None)
    if peak is None or hbm is None:
        return None
    return Chip(peak[1], peak[0], hbm[0], hbm[1])
