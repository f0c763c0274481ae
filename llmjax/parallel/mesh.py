"""Build the device mesh from the config.

The mesh axes are the integer fields of `MeshConfig`, outermost first (`data`, `fsdp`,
`tensor`, ...); a new parallelism axis is a new field there and a rule in
`parallel.rules`, not a change here. Axes are GSPMD-style (`AxisType.Auto`): the
compiler propagates shardings from the annotations the model makes.

Multi-slice (hybrid) meshes: when any `mesh.dcn_*` size is above 1, the devices are laid
out by `mesh_utils.create_hybrid_device_mesh`: each axis is `dcn_<axis> x <axis>`, with
the DCN part outermost, so the fast ICI links carry the inner (per-slice) part of every
axis and only the DCN part crosses slices (put data parallelism there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from llmjax.config.schema import ConfigError, MeshConfig, mesh_axis_names

if TYPE_CHECKING:  # jax is imported where a mesh is built, so config validation stays jax-free
    import jax
    from jax.sharding import Mesh, NamedSharding


def mesh_shape(mesh: MeshConfig, n_devices: int) -> dict[str, int]:
    """Resolve -1 entries of the mesh against `n_devices`; raise ConfigError if impossible.

    Returns the total size of every axis (ICI size x DCN size).
    """
    ici, dcn = hybrid_mesh_shape(mesh, n_devices)
    return {name: ici[name] * dcn[name] for name in ici}


def hybrid_mesh_shape(mesh: MeshConfig, n_devices: int) -> tuple[dict[str, int], dict[str, int]]:
    """(per-slice ICI sizes, across-slice DCN sizes) of every mesh axis, -1 resolved.

    The product of all ICI and DCN sizes must equal `n_devices`; raise ConfigError otherwise.
    """
    names = mesh_axis_names()
    dcn = {name: getattr(mesh, f"dcn_{name}") for name in names}
    for name, size in dcn.items():
        if size < 1:
            raise ConfigError(f"mesh.dcn_{name} must be a positive size, got {size}")
    slices = math.prod(dcn.values())
    if n_devices % slices:
        shape = " x ".join(f"dcn_{n}={s}" for n, s in dcn.items())
        raise ConfigError(f"mesh: {shape} = {slices} slices do not divide the {n_devices} available devices")
    per_slice = n_devices // slices
    sizes = {name: getattr(mesh, name) for name in names}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name} must be a positive size or -1, got {size}")
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {', '.join('mesh.' + n for n in free)}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    where = f"the {per_slice} devices of each of the {slices} slices" if slices > 1 else \
        f"the {n_devices} available devices"
    if free:
        if per_slice % fixed:
            raise ConfigError(f"mesh: the fixed axes ({fixed} devices) do not divide {where} for mesh.{free[0]}=-1")
        sizes[free[0]] = per_slice // fixed
    elif fixed != per_slice:
        shape = " x ".join(f"{n}={s}" for n, s in sizes.items())
        if slices > 1:
            dshape = " x ".join(f"dcn_{n}={s}" for n, s in dcn.items())
            raise ConfigError(f"mesh: ({shape}) x ({dshape}) = {fixed * slices} devices, but {n_devices} devices "
                              "are available")
        raise ConfigError(f"mesh: {shape} = {fixed} devices, but {n_devices} devices are available")
    return sizes, dcn


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
