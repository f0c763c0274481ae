"""Build the device mesh from the config.

The mesh axes are the integer fields of `MeshConfig`, outermost first (`data`, `fsdp`,
`tensor`, ...); a new parallelism axis is a new field there and a rule in
`parallel.rules`, not a change here. Axes are GSPMD-style (`AxisType.Auto`): the
compiler propagates shardings from the annotations the model makes.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from llmjax.config import MeshConfig, mesh_axis_names, mesh_shape


def build_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over `devices` (default: all devices of all processes) with the configured shape.

    Raises ConfigError when the sizes cannot cover the devices exactly.
    """
    explicit = devices is not None
    devices = list(devices) if explicit else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    names = mesh_axis_names()
    sizes = tuple(shape[n] for n in names)
    types = (AxisType.Auto,) * len(names)
    if explicit:
        return Mesh(np.asarray(devices, dtype=object).reshape(sizes), names, axis_types=types)
    # make_mesh orders devices for the physical topology (ICI rings on TPU).
    return jax.make_mesh(sizes, names, axis_types=types)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def describe(mesh: Mesh) -> str:
    axes = " x ".join(f"{n}={s}" for n, s in mesh.shape.items())
    return f"mesh {axes} over {mesh.devices.size} {mesh.devices.flat[0].platform} devices"
