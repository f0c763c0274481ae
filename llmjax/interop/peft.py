"""LoRA adapters in the PEFT layout (`llmjax convert to-hf` of a LoRA workdir without `--merge-lora`).

PEFT stores, for every adapted torch Linear `NAME.weight` of the base model, `lora_A.weight`
[rank, in] and `lora_B.weight` [out, rank] under `base_model.model.NAME` (minus `.weight`),
and applies W + (lora_alpha / r) B A. Our adapter A [stack..., in..., rank], B [stack..., rank,
out...] (`llmjax.post.lora`) map onto those per layer (and expert) with the inputs and outputs
flattened major-first, as the base weights themselves are (`llmjax.interop.hf_weights`).
`adapter_config.json` records r, lora_alpha, lora_dropout, the target module names and the base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from llmjax.config import ConfigError, ModelConfig
from llmjax.interop.hf_config import check_exportable
from llmjax.interop.hf_names import sources

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."


def adapter_tensors(cfg: ModelConfig, plan: Any, adapters: Any, dtype: Any) -> dict[str, np.ndarray]:
    """{PEFT tensor name: array} of every adapter matrix (host copies, `dtype`)."""
    table = sources(cfg)
    flat = {tuple(getattr(k, "key", str(k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]}
    out: dict[str, np.ndarray] = {}
    for t in plan.targets:
        src = table.get(t.path)
        if src is None:
            raise ConfigError(f"LoRA target {'/'.join(t.path)} has no Hugging Face tensor to export it against")
        a = np.asarray(jax.device_get(flat[(*t.path, "a")]))
        b = np.asarray(jax.device_get(flat[(*t.path, "b")]))
        rank = a.shape[-1]
        for idx in np.ndindex(*src.names.shape):
            name = PREFIX + str(src.names[idx]).removesuffix(".weight")
            a_block, b_block = a[idx], b[idx]  # [in..., r], [r, out...]
            out[f"{name}.lora_A.weight"] = a_block.reshape(-1, rank).T.astype(dtype)
            out[f"{name}.lora_B.weight"] = b_block.reshape(rank, -1).T.astype(dtype)
    return out


def save_adapters(cfg: ModelConfig, lora_cfg: Any, plan: Any, adapters: Any, out_dir: str | Path,
                  base: str | None, dtype: str | None = None) -> list[str]:
    """Write `adapter_model.safetensors` and `adapter_config.json` to `out_dir`. Returns the file names."""
    import jax.numpy as jnp
    from safetensors.numpy import save_file

    check_exportable(cfg)
    if plan.whole:
        raise ConfigError(f"--merge-lora: this LoRA run also trains {', '.join('/'.join(p) for p in plan.whole)} whole "
                          "(a task head), which the PEFT adapter layout does not hold; export the merged weights "
                          "with --merge-lora")
    np_dtype = np.dtype(jnp.dtype(dtype or cfg.param_dtype))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = adapter_tensors(cfg, plan, adapters, np_dtype)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out_dir / ADAPTER_FILE),
              metadata={"format": "pt"})
    modules = sorted({name.split(".")[-3] for name in tensors})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_cfg.rank, "lora_alpha": lora_cfg.alpha,
              "lora_dropout": lora_cfg.dropout, "target_modules": modules, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True, "modules_to_save": None,
              "base_model_name_or_path": base}
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return [ADAPTER_FILE, CONFIG_FILE]
