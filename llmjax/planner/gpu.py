"""GPU targets for `llmjax compile` (`h100-8`, `h200-16`, `a100-8`): compile-only CUDA devices.

jax's CUDA PJRT plugin builds compile-only devices from a target description (a text
`stream_executor.GpuTargetConfigProto`) and a `slices x hosts x devices` topology, with no GPU
and no driver present. The descriptions below are written from the vendors' published figures
(SM count, shared memory and registers per SM, L2, HBM size and bandwidth, compute capability).
No autotuning happens without a device, so the compiled code (and its memory) is what XLA
chooses by default. Needs the plugin without the CUDA libraries: `pip install
'llmjax[gpu-compile]'` (jax[cuda12-local]). cuDNN attention cannot be compiled this way (jax
asks the cuDNN library for its version at trace time).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re

from llmjax.config import ConfigError

GPUS_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """Published figures of one GPU model (per device)."""

    description: str  # what the driver reports as the device name
    sms: int
    compute_capability: tuple[int, int]
    shared_memory_per_sm: int  # bytes
    shared_memory_per_block_optin: int  # bytes
    l2_bytes: int
    hbm_bytes: int
    hbm_bytes_per_s: int
    clock_ghz: float


# NVIDIA H100 SXM5 / H200 SXM (Hopper, 132 SMs, 228 KiB shared memory per SM, 50 MiB L2) and
# A100 SXM4 80 GB (Ampere, 108 SMs, 164 KiB per SM, 40 MiB L2): NVIDIA's data sheets and the
# Hopper/Ampere tuning guides.
GPU_SPECS: dict[str, GpuSpec] = {
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", 132, (9, 0), 233472, 232448, 50 * 2**20, 80 * 2**30, 3_350_000_000_000,
                    1.98),
    "h200": GpuSpec("NVIDIA H200", 132, (9, 0), 233472, 232448, 50 * 2**20, 141 * 10**9, 4_800_000_000_000, 1.98),
    "a100": GpuSpec("NVIDIA A100-SXM4-80GB", 108, (8, 0), 167936, 166912, 40 * 2**20, 80 * 2**30,
                    2_039_000_000_000, 1.41),
}


def parse_gpu_name(name: str) -> tuple[str, int] | None:
    """`h100-8` / `h200-16` -> ("h100", 8); None when `name` is not a GPU target."""
    m = re.fullmatch(r"([a-z]\d+)-(\d+)", name.lower())
    if not m or m.group(1) not in GPU_SPECS:
        return None
    count = int(m.group(2))
    if count < 1 or (count > GPUS_PER_HOST and count % GPUS_PER_HOST):
        raise ConfigError(f"--topology {name}: use 1-{GPUS_PER_HOST} GPUs or a multiple of {GPUS_PER_HOST} "
                          f"({GPUS_PER_HOST} per host)")
    return m.group(1), count


def target_config(spec: GpuSpec) -> str:
    """The text GpuTargetConfigProto of one device of `spec`."""
    major, minor = spec.compute_capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {spec.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {spec.sms}
  fpus_per_core: {64 if major == 8 else 128}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {spec.hbm_bytes_per_s}
  l2_cache_size: {spec.l2_bytes}
  clock_rate_ghz: {spec.clock_ghz}
  device_memory_size: {spec.hbm_bytes}
  shared_memory_per_block_optin: {spec.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
runtime_version {{ major: 12 minor: 8 patch: 0 }}
device_description_str: "{spec.description}"
"""


def cuda_plugin_installed() -> bool:
    """Whether jax's CUDA PJRT plugin (jax_plugins.xla_cuda12 or 13) is importable."""
    if importlib.util.find_spec("jax_plugins") is None:
        return False
    return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13))


def gpu_devices(name: str, model: str, count: int) -> tuple[str, list]:
    """(layout, compile-only devices) for `count` GPUs of `model`; ConfigError without the CUDA plugin."""
    if not cuda_plugin_installed():
        raise ConfigError(f"--topology {name}: compiling for GPUs needs jax's CUDA plugin: "
                          "pip install 'llmjax[gpu-compile]' (jax[cuda12-local]; no GPU or driver needed)")
    from jax.experimental import topologies

    hosts, per_host = (1, count) if count <= GPUS_PER_HOST else (count // GPUS_PER_HOST, GPUS_PER_HOST)
    layout = f"1x{hosts}x{per_host}"
    try:
        topology = topologies.get_topology_desc(platform="cuda", topology_name="",
                                                target_config=target_config(GPU_SPECS[model]), topology=layout)
    except Exception as e:  # noqa: BLE001 - the plugin reports problems as runtime errors
        raise ConfigError(f"--topology {name}: the CUDA plugin cannot build it: {str(e).splitlines()[0]}") from None
    return f"{hosts} host{'s' if hosts > 1 else ''} x {per_host} {model.upper()}", list(topology.devices)
