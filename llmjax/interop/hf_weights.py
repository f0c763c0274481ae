"""Hugging Face safetensors <-> the llmjax parameter tree: sharded reads and writes.

Each llmjax parameter is built from one Hugging Face tensor per layer (and per expert), laid
out by a `Source` of the name table (`llmjax.interop.hf_names`). Reading under a sharding
(`build_params`) reads, for each device's block, only the rows of each tensor that block
covers (`safe_open(...).get_slice(name)[rows, cols]`), so no host holds more than one
tensor's slice at a time beyond the sharded result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from llmjax.config import ConfigError
from llmjax.guards import inside
from llmjax.interop.hf_names import Path_, Source

INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that hold no weights (buffers recomputed at load time).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


# ----------------------------------------------------------------------------- reading


class SafetensorsReader:
    """The tensors of a Hugging Face directory: one `model.safetensors`, several `*.safetensors`,
    or the shards listed by `model.safetensors.index.json`. Reads slices without loading files.

    Every file must be inside the directory (`llmjax.guards.inside`: no absolute or `..` shard names, no
    links out of it; a hub cache snapshot's links into its blobs are fine), checked before any is opened."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        self._handles: dict[tuple[Path, str], Any] = {}
        index = self.dir / INDEX_FILE
        files: dict[str, Path] = {}
        if index.is_file():
            inside(self.dir, INDEX_FILE, "HF_DIR")
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
                raise ConfigError(f"{index}: not a safetensors index ({e})") from None
            checked: dict[Any, Path] = {}
            for name, file in weight_map.items():
                key = file if isinstance(file, str) else repr(file)
                if key not in checked:
                    checked[key] = inside(self.dir, file, f"{index}: weight_map[{name!r}]")
                files[name] = checked[key]
            missing = sorted({str(p) for p in files.values() if not p.is_file()})
            if missing:
                raise ConfigError(f"{index}: weight_map names missing file(s): {', '.join(missing)}")
        else:
            paths = sorted(self.dir.glob("*.safetensors"))
            if not paths:
                pickled = " (PyTorch *.bin weights are not read: save them as safetensors)" \
                    if any(self.dir.glob("*.bin")) else ""
                raise ConfigError(f"HF_DIR: no *.safetensors file (nor {INDEX_FILE}) in {self.dir}{pickled}")
            for path in paths:
                inside(self.dir, path.name, "HF_DIR")
            for path in paths:
                for name in self._open(path).keys():
                    files[name] = path
        self.files = files

    def _open(self, path: Path, framework: str = "numpy") -> Any:
        key = (path, framework)
        if key not in self._handles:
            try:
                self._handles[key] = safe_open(str(path), framework=framework)
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise ConfigError(f"{path}: not a readable safetensors file ({e})") from None
        return self._handles[key]

    def names(self) -> set[str]:
        return set(self.files)

    def where(self, name: str) -> str:
        return self.files[name].name

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        s = self._open(self.files[name]).get_slice(name)
        return tuple(s.get_shape()), s.get_dtype()

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """tensor[index] as a numpy array in its stored dtype (bfloat16 via ml_dtypes)."""
        path = self.files[name]
        if self.shape_dtype(name)[1] == "BF16":  # numpy has no bfloat16: read through JAX on the host CPU
            with jax.default_device(jax.local_devices(backend="cpu")[0]):
                return np.asarray(self._open(path, "flax").get_slice(name)[index])
        return np.asarray(self._open(path).get_slice(name)[index])


def check_tensors(reader: SafetensorsReader, table: dict[Path_, Source]) -> None:
    """Every tensor `table` needs exists with the expected shape and a float dtype; nothing else is
    there (ignored: buffers, and lm_head.weight of a tied model). ConfigError naming the tensor."""
    needed: set[str] = set()
    for src in table.values():
        for name in src.names.flat:
            needed.add(name)
            if name not in reader.files:
                raise ConfigError(f"HF_DIR: tensor {name} is missing from {reader.dir} (does config.json match the "
                                  "weights?)")
            shape, dt = reader.shape_dtype(name)
            if shape != src.hf_shape:
                raise ConfigError(f"{reader.where(name)}: tensor {name} has shape {list(shape)}, but config.json "
                                  f"implies {list(src.hf_shape)}")
            if dt not in _DTYPES:
                raise ConfigError(f"{reader.where(name)}: tensor {name} has dtype {dt}; supported: "
                                  f"{', '.join(_DTYPES)}")
    extra = sorted(n for n in reader.names() - needed
                   if not n.endswith(_IGNORED_SUFFIXES) and n != "lm_head.weight")
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise ConfigError(f"HF_DIR: tensors that config.json does not account for: {', '.join(extra[:3])}{more} "
                          "(an unsupported architecture or option?)")


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    out = []
    for s, n in zip(index, shape, strict=True):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {s}")
        out.append((start, stop))
    return tuple(out)


def read_block(reader: SafetensorsReader, src: Source, param_shape: tuple[int, ...],
               bounds: tuple[tuple[int, int], ...], dtype: Any) -> np.ndarray:
    """The block `bounds` ((start, stop) per dimension) of the parameter -> numpy array of `dtype`.

    For every stacked tensor the block touches, reads only the rows/columns it covers."""
    lead = src.names.ndim
    block = src.block_shape(param_shape)
    inner = bounds[lead:]
    firsts = {g[0] for g in src.groups}
    offsets = src.offsets or (0,) * len(src.groups)
    hf_index, shape, order = [], [], []
    for g, offset in zip(src.groups, offsets, strict=True):
        rest = math.prod(block[d] for d in g[1:])
        a, b = inner[g[0]]
        hf_index.append(slice(offset + a * rest, offset + b * rest))
        shape += [b - a, *(block[d] for d in g[1:])]
        order += list(g)
    perm = tuple(int(i) for i in np.argsort(order))
    sub = tuple(slice(None) if d in firsts else slice(*inner[d]) for d in range(len(block)))

    def one(name: str) -> np.ndarray:
        t = reader.read(name, tuple(hf_index)).reshape(shape).transpose(perm)[sub]
        return t.astype(dtype)

    ranges = [range(*bounds[i]) for i in range(lead)]
    pieces = [one(src.names[tuple(r[i] for r, i in zip(ranges, idx, strict=True))])
              for idx in np.ndindex(*(len(r) for r in ranges))]
    if lead == 0:
        return pieces[0]
    return np.stack(pieces).reshape(*(len(r) for r in ranges), *pieces[0].shape)


def build_params(reader: SafetensorsReader, table: dict[Path_, Source], abstract: Any, shardings: Any) -> Any:
    """The parameter tree shaped like `abstract` (ShapeDtypeStructs), each leaf a jax.Array with
    the matching leaf of `shardings`, assembled from per-device reads (`read_block`)."""

    def build(path: Any, leaf: Any, sharding: Any) -> jax.Array:
        key = tuple(getattr(p, "key", str(p)) for p in path)
        src = table[key]
        shape = tuple(leaf.shape)
        cache: dict[tuple[tuple[int, int], ...], np.ndarray] = {}  # replicated blocks are read once

        def callback(index: tuple[slice, ...] | None) -> np.ndarray:
            assert index is not None  # typed Optional by jax, which asserts an index before calling
            bounds = _bounds(index, shape)
            if bounds not in cache:
                cache[bounds] = read_block(reader, src, shape, bounds, leaf.dtype)
            return cache[bounds]

        return jax.make_array_from_callback(shape, sharding, callback)

    return jax.tree_util.tree_map_with_path(build, abstract, shardings)


# ----------------------------------------------------------------------------- writing


def hf_tensors(table: dict[Path_, Source], params: Any, dtype: Any) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(name, thunk) for every on-disk tensor of `params` (inverse of `read_block`, classic names).

    Each thunk fetches one layer's (expert's) slice from the devices and lays it out as HF does."""
    flat = {tuple(getattr(p, "key", str(p)) for p in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    take = jax.jit(lambda a, i: a[i])
    for key, src in table.items():
        param = flat[key]
        order = [d for g in src.groups for d in g]
        for idx in np.ndindex(*src.names.shape):
            def thunk(param=param, idx=idx, order=order, src=src) -> np.ndarray:
                block = param
                for i in idx:
                    block = take(block, np.int32(i))
                block = np.asarray(jax.device_get(block)).transpose(order)
                return block.reshape(src.hf_shape).astype(dtype)

            yield cast(str, src.names[idx]), thunk  # an element of an array of names (numpy types it an array)


def write_safetensors(hf_dir: Path, tensors: list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]],
                      itemsize: int, max_shard_bytes: int) -> list[str]:
    """Write `tensors` (name, shape, thunk) as `model.safetensors`, or as shards of at most
    `max_shard_bytes` plus `model.safetensors.index.json`. Returns the file names written."""
    from safetensors.numpy import save_file

    shards: list[list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]] = [[]]
    size = 0
    for t in tensors:
        nbytes = math.prod(t[1]) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map: dict[str, str] = {}
    for file, shard in zip(names, shards, strict=True):
        save_file({name: np.ascontiguousarray(thunk()) for name, _, thunk in shard}, str(hf_dir / file),
                  metadata={"format": "pt"})
        weight_map.update({name: file for name, _, _ in shard})
    if n > 1:
        total = sum(math.prod(s) * itemsize for _, s, _ in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (hf_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names
