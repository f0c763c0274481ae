"""The MFU denominator: published accelerator peaks, or the CPU's matmul rate measured and cached.

- `peak_flops(devices, dtype)`: total peak FLOP/s of the devices and where the figure comes from.
- `mfu(tokens_per_s, flops_per_token, peak)`: model FLOPs utilisation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

# (case-insensitive substring of jax.Device.device_kind, bf16 dense peak FLOP/s per device,
# name). First match wins, so more specific patterns come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float, str], ...] = (
    ("tpu v6 lite", 918e12, "TPU v6e (Trillium)"),
    ("tpu v6e", 918e12, "TPU v6e (Trillium)"),
    ("tpu v5 lite", 197e12, "TPU v5e"),
    ("tpu v5e", 197e12, "TPU v5e"),
    ("tpu v5p", 459e12, "TPU v5p"),
    ("tpu v5", 459e12, "TPU v5p"),  # v5p reports itself as "TPU v5"
    ("tpu v4", 275e12, "TPU v4"),
    ("h100 pcie", 756e12, "NVIDIA H100 PCIe"),
    ("h100", 989e12, "NVIDIA H100 SXM"),
    ("h200", 989e12, "NVIDIA H200"),
    ("a100", 312e12, "NVIDIA A100"),
)


def lookup_peak(device_kind: str) -> tuple[float, str] | None:
    """(bf16 dense peak FLOP/s, name) for a `device_kind` string, or None when unknown."""
    kind = device_kind.lower()
    for pattern, flops, name in PEAK_BF16_FLOPS:
        if pattern in kind:
            return flops, name
    return None


def default_cache_dir() -> Path:
    """`$LLMJAX_CACHE` or `~/.cache/llmjax`."""
    return Path(os.environ.get("LLMJAX_CACHE") or Path.home() / ".cache" / "llmjax")


def cpu_model_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else `platform.processor()`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_flags_digest() -> str:
    """Short hash of the CPU feature flags: VMs with the same model name can differ (e.g. AMX hidden)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                return hashlib.sha1(flags.encode()).hexdigest()[:8]
    except OSError:
        pass
    return "noflags"


def _cpu_cache_key(compute_dtype: str) -> str:
    """Cache key: CPU model, feature-flag hash, usable CPUs, dtype, jax version."""
    return f"{cpu_model_name()}|flags {_cpu_flags_digest()}|{_cpu_count()} cpus|{compute_dtype}|jax {jax.__version__}"


def measure_matmul_flops(compute_dtype: str, n: int = 2048, seconds: float = 0.6) -> float:
    """Best observed FLOP/s of a jitted n×n matmul on the default device.

    Low-precision dtypes accumulate in float32 (`preferred_element_type`), as the model does.
    Runs for about `seconds` after compilation and a warmup call and keeps the fastest call.
    """
    dtype = jnp.dtype(compute_dtype)
    acc = jnp.float32 if dtype.itemsize < 4 else None
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=acc))
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    matmul(a, b).block_until_ready()
    best, deadline = math.inf, time.perf_counter() + seconds
    for i in range(1000):
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        t1 = time.perf_counter()
        best = min(best, t1 - t0)
        if t1 > deadline and i >= 2:
            break
    return 2.0 * n**3 / best


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


LOADED_SHARE = 0.15  # other processes using more than this share of our CPUs during the measurement: "under load"


def _cpu_ticks(cpus: set[int]) -> int | None:
    """Busy clock ticks (user, nice, system, irq, softirq, steal) of `cpus` from /proc/stat, or None."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus and len(fields) >= 8:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
            busy += user + nice + system + irq + softirq + steal
    return busy


def others_cpu_share(fn: Any) -> tuple[Any, float | None]:
    """Run `fn()`; return its result and the share (0..1) of this process's CPUs that *other* processes
    used meanwhile (busy time of those CPUs minus this process's own CPU time), or None where /proc/stat
    is not available. A measurement of peak speed is only meaningful when this is small."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        return fn(), None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    ticks0, own0, t0 = _cpu_ticks(cpus), sum(os.times()[:2]), time.perf_counter()
    result = fn()
    ticks1, own1, t1 = _cpu_ticks(cpus), sum(os.times()[:2]), time.perf_counter()
    if ticks0 is None or ticks1 is None or t1 <= t0:
        return result, None
    others = (ticks1 - ticks0) / hz - (own1 - own0)
    return result, min(max(others / (len(cpus) * (t1 - t0)), 0.0), 1.0)


def cpu_peak(compute_dtype: str, cache_dir: str | os.PathLike | None = None) -> tuple[float, str, bool]:
    """The machine's matmul FLOP/s in `compute_dtype`, where the figure comes from, and whether it is reliable.

    Cached in `<cache_dir>/cpu_peak_flops.json`, keyed by CPU model, a hash of the CPU feature flags,
    usable CPU count, dtype and jax version. A measurement is only as good as the moment it was taken:
    on a busy machine it comes out low (and MFU high). So the share of the CPUs other processes used
    during the measurement is recorded with it; a figure taken under load (> LOADED_SHARE) is not
    trusted: the next call measures again and keeps the fastest figure seen, until one measurement
    is taken on a quiet machine. Until then the figure is returned as unreliable (MFU is marked so).
    """
    path = Path(cache_dir) if cache_dir else default_cache_dir()
    path = path / "cpu_peak_flops.json"
    key = _cpu_cache_key(compute_dtype)
    entry = _read_cache(path).get(key)
    cached = float(entry.get("flops", 0)) if isinstance(entry, dict) else 0.0
    # entries of older versions (no "quiet") are measured again
    if cached > 0 and isinstance(entry, dict) and entry.get("quiet") is True:
        return cached, f"CPU {compute_dtype} matmul peak measured earlier on a quiet machine (cached in {path})", True
    measured, share = others_cpu_share(lambda: measure_matmul_flops(compute_dtype))
    quiet = share is not None and share <= LOADED_SHARE
    flops = max(measured, cached)
    cache = _read_cache(path)  # re-read: another process may have written meanwhile
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cache[key] = {"flops": flops, "measured_at": time.time(), "load_average": load, "others_share": share,
                  "quiet": quiet}
    try:
        _write_cache(path, cache)
        where = f"cached in {path}"
    except OSError as e:
        where = f"not cached: {e}"
    if quiet:
        return flops, f"CPU {compute_dtype} matmul peak measured now ({where})", True
    busy = "unknown" if share is None else f"{100 * share:.0f}%"
    return flops, (f"CPU {compute_dtype} matmul peak measured under load (other processes used {busy} of the CPUs; "
                   f"best of the measurements so far, {where}): MFU is unreliable (reads high) and the peak is "
                   "measured again next run"), False


def cpu_peak_flops(compute_dtype: str, cache_dir: str | os.PathLike | None = None) -> tuple[float, str]:
    """`cpu_peak` without the reliability flag."""
    flops, source, _ = cpu_peak(compute_dtype, cache_dir)
    return flops, source


def peak_info(devices: Sequence[Any], compute_dtype: str, cache_dir: str | os.PathLike | None = None
              ) -> tuple[float, str, bool]:
    """`peak_flops` plus whether the figure is reliable (False: a CPU peak measured under load)."""
    devices = list(devices)
    if devices and all(getattr(d, "platform", "") == "cpu" for d in devices):
        return cpu_peak(compute_dtype, cache_dir)
    total, source = peak_flops(devices, compute_dtype, cache_dir)
    return total, source, True


def peak_flops(
    devices: Sequence[Any], compute_dtype: str, cache_dir: str | os.PathLike | None = None
) -> tuple[float, str]:
    """Total peak FLOP/s of `devices` and where the figure comes from.

    Accelerators: the sum of the published bf16 dense per-chip peaks (`PEAK_BF16_FLOPS`),
    whatever `compute_dtype` is. CPU: the machine's measured matmul rate in `compute_dtype`;
    virtual CPU devices (`--xla_force_host_platform_device_count`) share the same cores, so it is
    counted once, not per device. An unknown accelerator gives (0.0, "unknown device kind ...")
    and MFU should be reported as n/a.
    """
    devices = list(devices)
    if not devices:
        return 0.0, "no devices"
    if all(getattr(d, "platform", "") == "cpu" for d in devices):
        return cpu_peak_flops(compute_dtype, cache_dir)
    total, names = 0.0, set()
    for d in devices:
        kind = str(getattr(d, "device_kind", "?"))
        hit = lookup_peak(kind)
        if hit is None:
            return 0.0, f"unknown device kind '{kind}': no peak FLOP/s known, MFU n/a"
        total += hit[0]
        names.add(hit[1])
    return total, f"{len(devices)} x {', '.join(sorted(names))} published bf16 dense peak"


def mfu(tokens_per_second: float, flops_per_token: float, peak: float) -> float | None:
    """Model FLOPs utilisation (0..1), or None when the peak is unknown (<= 0)."""
    if peak <= 0:
        return None
    return tokens_per_second * flops_per_token / peak
