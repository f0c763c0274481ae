"""Build the device mesh from the config.

The mesh axes are the integer fields of `MeshConfig`, outermost first (`data`, `fsdp`,
`tensor`, ...); a new parallelism axis is a new field there and a rule in
`parallel.rules`, not a change here. Axes are GSPMD-style (`AxisType.Auto`): the
compiler propagates shardings from the annotations the model makes.

Multi-slice (hybrid) meshes: when any `mesh.dcn_*` size is above 1, the devices are laid
out by `mesh_utils.create_hybrid_device_mesh`: each axis is `dcn_<axis> x <axis>`, with
the DCN part outermost, so the fast ICI links carry the inner (per-slice) part of every
axis and only the DCN part crosses slices (put data parallelism there).

The sizes themselves (`mesh_shape`, `hybrid_mesh_shape`: -1 resolved against a device count) are
jax-free arithmetic in `llmjax.config.mesh_shape`, re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from llmjax.config.mesh_shape import hybrid_mesh_shape, mesh_shape
from llmjax.config.schema import MeshConfig, mesh_axis_names
from llmjax.errors import ConfigError

__all__ = ["build_mesh", "describe", "hybrid_device_array", "hybrid_mesh_shape", "mesh_shape", "replicated"]

if TYPE_CHECKING:  # jax is imported where a mesh is built, so config validation stays jax-free
    import jax
    from jax.sharding import Mesh, NamedSharding


def build_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh over `devices` (default: all devices of all processes) with the configured shape.

    Raises ConfigError when the sizes cannot cover the devices exactly.
    """
    import jax
    from jax.sharding import AxisType, Mesh

    explicit = devices is not None
    devices = list(devices) if devices is not None else jax.devices()
    ici, dcn = hybrid_mesh_shape(cfg, len(devices))
    names = mesh_axis_names()
    sizes = tuple(ici[n] * dcn[n] for n in names)
    types = (AxisType.Auto,) * len(names)
    if any(s > 1 for s in dcn.values()):
        return Mesh(hybrid_device_array(ici, dcn, devices), names, axis_types=types)
    if explicit:
        return Mesh(np.asarray(devices, dtype=object).reshape(sizes), names, axis_types=types)
    # make_mesh orders devices for the physical topology (ICI rings on TPU).
    return jax.make_mesh(sizes, names, axis_types=types)


def hybrid_device_array(ici: dict[str, int], dcn: dict[str, int], devices: Sequence[jax.Device]) -> np.ndarray:
    """Devices laid out for ICI sizes within a slice and DCN sizes across slices.

    Slices are the devices' `slice_index` (multi-slice TPU); where all devices share one
    (GPU clusters, CPU), each process is a slice. ConfigError if the sizes do not fit.
    """
    from jax.experimental import mesh_utils

    names = mesh_axis_names()
    slice_ids = {getattr(d, "slice_index", None) for d in devices}
    process_is_granule = len(slice_ids) <= 1
    try:
        return mesh_utils.create_hybrid_device_mesh(
            [ici[n] for n in names], [dcn[n] for n in names], devices, process_is_granule=process_is_granule
        )
    except (ValueError, AssertionError, NotImplementedError) as e:
        granules = "processes" if process_is_granule else "slices"
        dcn_shape = " x ".join(f"dcn_{n}={dcn[n]}" for n in names)
        raise ConfigError(f"mesh: cannot lay out {dcn_shape} over the {granules} of this run: {e}") from None


def replicated(mesh: Mesh) -> NamedSharding:
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec())


def describe(mesh: Mesh) -> str:
    axes = " x ".join(f"{n}={s}" for n, s in mesh.shape.items())
    return f"mesh {axes} over {mesh.devices.size} {mesh.devices.flat[0].platform} devices"
