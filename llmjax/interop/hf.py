"""Load and save Hugging Face decoder checkpoints (Llama, Mistral, Mixtral, Qwen2, Qwen3, Gemma, Gemma 2).

    from llmjax.interop import hf
    model, params = hf.load("path/to/hf_dir")               # one device
    model, params = hf.load(hf_dir, mesh=mesh)               # sharded by the default logical rules
    logits = model.apply({"params": params}, tokens)         # [batch, length] -> [batch, length, vocab]
    hf.save(model.cfg, params, "out_dir")                    # config.json + model.safetensors

The config mapping is `llmjax.interop.hf_config` (per family: `hf_families`), the tensor names
`llmjax.interop.hf_names`, the reading and writing `llmjax.interop.hf_weights`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from llmjax.config import DTYPES, ConfigError, ModelConfig
from llmjax.config.schema import Dtype
from llmjax.interop.hf_config import check_exportable, hf_config_from_model, model_config_from_hf, read_hf_config
from llmjax.interop.hf_names import sources
from llmjax.interop.hf_weights import (
    SafetensorsReader,
    build_params,
    check_tensors,
    hf_tensors,
    write_safetensors,
)
from llmjax.models.families import build_family
from llmjax.models.transformer import Transformer
from llmjax.parallel.rules import Rules, make_rules, tree_shardings
from llmjax.train.setup import model_abstract_params

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def load_model_config(hf_dir: str | Path, base: ModelConfig | None = None) -> tuple[ModelConfig, list[str]]:
    """`HF_DIR/config.json` -> (ModelConfig, notes); numerics/layout fields from `base`. ConfigError if unsupported."""
    hf_dir = Path(hf_dir)
    return model_config_from_hf(read_hf_config(hf_dir), str(hf_dir / "config.json"), base)


def check_model_memory(cfg: ModelConfig, where: str, devices: Any = None) -> None:
    """ConfigError naming `where` (config.json) when the parameters its sizes imply cannot fit in the memory of
    `devices` (default: all), by the trainer's estimate (`llmjax.train.preflight`): checked before any name table
    or array is built, so `num_hidden_layers: 10000000` is refused in milliseconds."""
    from llmjax.train.preflight import DTYPE_BYTES, GIB, _largest_part, devices_memory
    from llmjax.train.telemetry.flops import estimate_params

    memory = devices_memory(jax.devices() if devices is None else devices)
    if memory is None:
        return
    n = sum(estimate_params(cfg).values())
    need = n * DTYPE_BYTES[cfg.param_dtype]
    if need > memory[0]:
        raise ConfigError(f"{where}: about {n:.3g} parameters (most from {_largest_part(cfg)}) need "
                          f"{need / GIB:,.1f} GiB in {cfg.param_dtype}, more than the memory of {memory[1]}")


def abstract_params(cfg: ModelConfig) -> tuple[Any, Any]:
    """(ShapeDtypeStructs of the model's parameters, their logical PartitionSpecs)."""
    params = model_abstract_params(cfg)
    return params.shapes, params.logical


def _uses_fused_experts(reader: SafetensorsReader, cfg: ModelConfig) -> bool:
    names = reader.names()
    return (cfg.moe.enabled and "model.layers.0.block_sparse_moe.gate.weight" not in names
            and "model.layers.0.mlp.experts.gate_up_proj" in names)


def load_params(hf_dir: str | Path, cfg: ModelConfig, shardings: Any, reader: SafetensorsReader | None = None) -> Any:
    """The safetensors weights of `hf_dir` as `Transformer(cfg)` parameters, each placed with the
    matching leaf of `shardings` (a tree of `jax.sharding.Sharding`) as it is read.

    Sizes (`check_model_memory`), shapes and dtypes of every tensor are checked before anything is read
    (ConfigError). `reader`: the directory's `SafetensorsReader`, when the caller made it already."""
    check_model_memory(cfg, str(Path(hf_dir) / "config.json"))
    reader = reader or SafetensorsReader(hf_dir)
    table = sources(cfg, _uses_fused_experts(reader, cfg))
    check_tensors(reader, table)
    abstract, _ = abstract_params(cfg)
    return build_params(reader, table, abstract, shardings)


def load(hf_dir: str | Path, mesh: Mesh | None = None, rules: Rules | None = None, *,
         compute_dtype: str = "float32", param_dtype: str = "float32") -> tuple[Transformer, Any]:
    """Hugging Face model directory -> (Transformer, params).

    `model.apply({"params": params}, tokens [B, L] int32)` gives logits [B, L, V] float32.
    With `mesh`, each parameter is sharded over it by `rules` (default: `make_rules()` for the
    mesh) while it is read: a device's block is read from disk on its own. Without, the
    parameters live on the default device.
    """
    for name, value in (("compute_dtype", compute_dtype), ("param_dtype", param_dtype)):
        if value not in DTYPES:
            raise ConfigError(f"{name}: '{value}' is not one of {', '.join(DTYPES)}")
    base = dataclasses.replace(ModelConfig(), compute_dtype=cast(Dtype, compute_dtype),  # checked just above
                               param_dtype=cast(Dtype, param_dtype))
    cfg, _ = load_model_config(hf_dir, base)
    check_model_memory(cfg, str(Path(hf_dir) / "config.json"))
    abstract, logical = abstract_params(cfg)
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    else:
        rules = rules if rules is not None else make_rules(None, dict(mesh.shape), cfg.n_kv_heads)
        shardings = tree_shardings(logical, mesh, rules)
    model = build_family(cfg).module()
    assert isinstance(model, Transformer)  # Hugging Face models load as decoders
    return model, load_params(hf_dir, cfg, shardings)


def save(cfg: ModelConfig, params: Any, hf_dir: str | Path, dtype: str | None = None,
         max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, token_ids: dict[str, Any] | None = None) -> list[str]:
    """Write `params` of `Transformer(cfg)` as the Hugging Face model of its family (`hf_families.family_for`:
    Llama, Mistral, Mixtral, Qwen2, Qwen3, Gemma, Gemma 2).

    Writes `hf_dir/config.json` (with `token_ids`, e.g. {"bos_token_id": 1, "eos_token_id": 2}, when given)
    and `model.safetensors` (or shards of at most `max_shard_bytes` with `model.safetensors.index.json`)
    in `dtype` (default: `cfg.param_dtype`), one layer's tensor fetched from the devices at a time.
    Returns the safetensors file names. Raises ConfigError when `cfg` has no Hugging Face equivalent.
    """
    import json

    check_exportable(cfg)
    dtype = dtype or cfg.param_dtype
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    np_dtype = np.dtype(jnp.dtype(dtype))
    hf_dir = Path(hf_dir)
    hf_dir.mkdir(parents=True, exist_ok=True)
    table = sources(cfg)
    shapes = {name: src.hf_shape for src in table.values() for name in src.names.flat}
    tensors = [(name, shapes[name], thunk) for name, thunk in hf_tensors(table, params, np_dtype)]
    files = write_safetensors(hf_dir, tensors, np_dtype.itemsize, max_shard_bytes)
    config = {**hf_config_from_model(cfg, dtype), **(token_ids or {})}
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return files
