"""Target topologies for `llmjax compile`: names -> compile-only devices (GPU targets: `planner.gpu`).

TPU names follow Cloud TPU accelerator types: `v5e-8`, `v6e-256` count chips; `v4-128`,
`v5p-64` count TensorCores (two per chip, one megacore device). A physical layout may be given
directly instead (`v5p:2x4x4`, `v5e:4x8`). The devices come from
`jax.experimental.topologies.get_topology_desc` and libtpu (the `tpu` extra): no TPU is needed,
only its compiler. `--slices N` asks for N such slices joined over the data-centre network.

The devices of a multi-host slice carry their host as `process_index`; the train step is
compiled for all of them at once, as each host of the real slice would compile it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from llmjax.config import ConfigError
from llmjax.planner.chips import Chip, lookup_chip
from llmjax.planner.gpu import gpu_devices, parse_gpu_name

# generation -> (name in libtpu's topology strings, accelerator-type units per chip, mesh rank)
TPU_GENERATIONS: dict[str, tuple[str, int, int]] = {
    "v4": ("v4", 2, 3),
    "v5p": ("v5p", 2, 3),
    "v5e": ("v5e", 1, 2),
    "v5litepod": ("v5e", 1, 2),
    "v6e": ("v6e", 1, 2),
}
# chips -> physical layout, for the slice sizes Cloud TPU offers
SHAPES_2D = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}


@dataclasses.dataclass
class Target:
    """A resolved target: what was asked for, its layout and its compile-only devices."""

    name: str  # as given
    layout: str  # e.g. "v5p:2x4x4"
    platform: str  # "tpu" or "gpu"
    slices: int
    devices: list[Any]

    @property
    def chip(self) -> Chip | None:
        return lookup_chip(self.devices[0].device_kind)

    @property
    def hosts(self) -> int:
        return len({(getattr(d, "slice_index", 0), d.process_index) for d in self.devices})

    def describe(self) -> str:
        kind = self.devices[0].device_kind
        slices = f" x {self.slices} slices" if self.slices > 1 else ""
        return (f"{self.name} = {self.layout}{slices}: {len(self.devices)} devices ({kind}) on {self.hosts} "
                f"host{'s' if self.hosts > 1 else ''}")


def parse_tpu_name(name: str) -> tuple[str, str]:
    """`v5p-64` or `v5p:2x4x4` -> ("v5p:2x4x4", generation). ConfigError naming the problem."""
    known = ", ".join(sorted(TPU_GENERATIONS))
    m = re.fullmatch(r"(v\d+[a-z]*)[:](\d+(?:x\d+)+)", name.lower())
    if m:
        gen, dims = m.groups()
        if gen not in TPU_GENERATIONS:
            raise ConfigError(f"--topology {name}: unknown TPU generation {gen!r} (known: {known})")
        prefix, _, rank = TPU_GENERATIONS[gen]
        if dims.count("x") + 1 != rank:
            raise ConfigError(f"--topology {name}: {gen} layouts have {rank} dimensions, e.g. "
                              f"{prefix}:{(SHAPES_2D if rank == 2 else SHAPES_3D)[8]}")
        return f"{prefix}:{dims}", gen
    m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.lower())
    if not m:
        raise ConfigError(f"--topology {name}: expected an accelerator type such as v5e-8, v5p-64, v4-128, "
                          "v6e-256, a layout such as v5p:2x4x4, or GPUs such as h100-8")
    gen, count = m.group(1), int(m.group(2))
    if gen not in TPU_GENERATIONS:
        raise ConfigError(f"--topology {name}: unknown TPU generation {gen!r} (known: {known})")
    prefix, per_chip, rank = TPU_GENERATIONS[gen]
    shapes = SHAPES_2D if rank == 2 else SHAPES_3D
    chips, rest = divmod(count, per_chip)
    if rest or chips not in shapes:
        sizes = ", ".join(f"{gen}-{c * per_chip}" for c in shapes)
        raise ConfigError(f"--topology {name}: no {gen} slice of that size (sizes: {sizes})")
    return f"{prefix}:{shapes[chips]}", gen


def libtpu_path() -> str | None:
    """Where libtpu is (TPU_LIBRARY_PATH or the `libtpu` package), None when it is not installed."""
    env = os.environ.get("TPU_LIBRARY_PATH")
    if env and os.path.isfile(env):
        return env
    spec = importlib.util.find_spec("libtpu")
    return None if spec is None else (spec.origin or "libtpu")


# a host accelerator type per generation: only for libtpu's host-runtime start-up on a machine without TPUs
_HOST_TYPES = {"v4": "v4-8", "v5p": "v5p-8", "v5e": "v5litepod-8", "v5litepod": "v5litepod-8", "v6e": "v6e-8"}


def _quiet_host_runtime(gen: str) -> None:
    """On a host without TPUs libtpu's start-up logs errors about undetectable host metadata (harmless
    for compile-only devices: the same programs compile to the same figures); describe a stand-in host
    unless the environment already describes one or the host has TPUs."""
    has_tpu = any(Path("/dev").glob("accel*")) or Path("/dev/vfio").exists()
    if has_tpu or "TPU_ACCELERATOR_TYPE" in os.environ or "TPU_WORKER_HOSTNAMES" in os.environ:
        return
    os.environ.update(TPU_ACCELERATOR_TYPE=_HOST_TYPES[gen], TPU_WORKER_HOSTNAMES="localhost", TPU_SKIP_MDS_QUERY="1")
    # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) for the process that owns the TPUs; with no TPU
    # to own, a second `llmjax compile` (or test run) on the same host must not be refused by it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def load_target(name: str, slices: int = 1) -> Target:
    """Compile-only devices for `name` x `slices`. ConfigError for a bad name or a missing libtpu."""
    if slices < 1:
        raise ConfigError(f"--slices must be >= 1, got {slices}")
    gpu = parse_gpu_name(name)
    if gpu is not None:
        if slices > 1:
            raise ConfigError(f"--slices applies to TPU slices; for more GPUs name them all (e.g. {gpu[0]}-16)")
        layout, devices = gpu_devices(name, *gpu)
        return Target(name, layout, "gpu", 1, devices)
    layout, gen = parse_tpu_name(name)
    if libtpu_path() is None:
        raise ConfigError(f"--topology {name}: compiling for TPU needs libtpu, which is not installed: "
                          "pip install 'llmjax[tpu]' (jax[tpu] picks the libtpu that matches the installed jax)")
    _quiet_host_runtime(gen)
    from jax.experimental import topologies

    kwargs: dict[str, Any] = {"chip_config_name": "megacore"} if gen == "v4" else {}
    if slices > 1:
        kwargs["num_slices"] = slices
    try:
        topology = topologies.get_topology_desc(topology_name=layout, platform="tpu", **kwargs)
    except Exception as e:  # noqa: BLE001 - libtpu reports bad layouts as runtime errors
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"--topology {name} ({layout}): libtpu cannot build it: {message}") from None
    return Target(name, layout, "tpu", slices, list(topology.devices))
