"""Mesh sizes from the config: `mesh.*` resolved against a device count (-1 takes the rest), jax-free.

Pure arithmetic on `MeshConfig`, so config validation can check a layout without importing jax;
`llmjax.parallel.mesh` builds the device mesh from these sizes (and re-exports both functions).
"""

from __future__ import annotations

import math

from llmjax.config.schema import MeshConfig, mesh_axis_names
from llmjax.errors import ConfigError


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
