"""What each supported Hugging Face `model_type` means in llmjax model keys, both ways (no JAX import).

  llama    RMSNorm, SwiGLU, rotate-half RoPE with any scaling (linear, dynamic, yarn, llama3), GQA
  mistral  llama + a sliding window on every layer
  mixtral  mistral + a sparse MoE feed-forward in every layer (softmax router, top-k renormalised)
  qwen2    llama + biases on q/k/v (not o)
  qwen3    llama + RMSNorm on each head's queries and keys before RoPE (QK-norm)
  gemma    GeGLU (tanh GELU), norms scaled by (1 + w), embeddings x sqrt(d_model), tied head
  gemma2   gemma + sandwich norms, attention and final-logit soft-capping, query_pre_attn_scalar,
           local (sliding) attention on every other layer

A `Family` holds the llmjax keys the model_type fixes (`keys`: required on export, set on import),
its activation field and values, the bias fields that must be false, whether it reads sliding
windows, and hooks for the fields only it has (`extra_import`, `extra_export`). `family_for` picks
the export family of a ModelConfig from its keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from llmjax.config import ConfigError, ModelConfig

SILU = ("silu", "swish")
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")

# llmjax keys every Llama-like family fixes, and Gemma's conventions
_LLAMA_KEYS = dict(norm="rmsnorm", position="rope", mlp="swiglu", use_bias=False, norm_scale_offset=0.0,
                   scale_embeddings=False, post_norms=False, attn_softcap=0.0, logit_softcap=0.0,
                   attention_scale_dim=0.0, qkv_bias=False, qk_norm=False)
_GEMMA_KEYS = dict(_LLAMA_KEYS, mlp="geglu", norm_scale_offset=1.0, scale_embeddings=True)


@dataclasses.dataclass(frozen=True)
class Family:
    """One `model_type`: its architecture class, activation field and values, and its llmjax keys."""

    model_type: str
    architecture: str
    keys: dict[str, Any]  # llmjax model keys this family fixes
    act_field: str = "hidden_act"
    acts: tuple[str, ...] = SILU
    tie_default: bool = False
    false_fields: tuple[str, ...] = ("attention_bias", "mlp_bias")  # must be false (or absent) on import
    windows: bool = False  # sliding_window / layer_types are read
    free: tuple[str, ...] = ()  # keys of `keys` whose value the config.json gives (their default: none)
    extra_import: Callable[[Any, dict[str, Any]], None] | None = None  # (fields reader, keys) -> sets more keys
    extra_export: Callable[[ModelConfig, dict[str, Any]], None] | None = None


def _gemma2_import(f: Any, keys: dict[str, Any]) -> None:
    keys["attn_softcap"] = f.float("attn_logit_softcapping", 50.0)
    keys["logit_softcap"] = f.float("final_logit_softcapping", 30.0)
    keys["attention_scale_dim"] = f.float("query_pre_attn_scalar", 256.0)


def _gemma2_export(m: ModelConfig, out: dict[str, Any]) -> None:
    scalar = m.attention_scale_dim or m.resolved_head_dim
    out.update(attn_logit_softcapping=m.attn_softcap or None, final_logit_softcapping=m.logit_softcap or None,
               query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", _LLAMA_KEYS),
    Family("mistral", "MistralForCausalLM", _LLAMA_KEYS, windows=True),
    Family("mixtral", "MixtralForCausalLM", _LLAMA_KEYS, windows=True),
    Family("qwen2", "Qwen2ForCausalLM", dict(_LLAMA_KEYS, qkv_bias=True), false_fields=(), windows=True),
    Family("qwen3", "Qwen3ForCausalLM", dict(_LLAMA_KEYS, qk_norm=True), false_fields=("attention_bias",),
           windows=True),
    Family("gemma", "GemmaForCausalLM", _GEMMA_KEYS, acts=GELU_TANH, tie_default=True,
           false_fields=("attention_bias",)),
    Family("gemma2", "Gemma2ForCausalLM", dict(_GEMMA_KEYS, post_norms=True), act_field="hidden_activation",
           acts=GELU_TANH, tie_default=True, false_fields=("attention_bias",), windows=True,
           free=("attn_softcap", "logit_softcap", "attention_scale_dim"), extra_import=_gemma2_import,
           extra_export=_gemma2_export),
)}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def family_for(m: ModelConfig) -> Family:
    """The family a decoder ModelConfig is exported as; ConfigError naming the first key no family has."""
    if m.moe.enabled:
        name = "mixtral"
    elif m.post_norms or m.attn_softcap or m.logit_softcap or m.global_every or m.attention_scale_dim:
        name = "gemma2"
    elif m.norm_scale_offset or m.scale_embeddings or m.mlp == "geglu":
        name = "gemma"
    elif m.qk_norm:
        name = "qwen3"
    elif m.qkv_bias:
        name = "qwen2"
    else:
        name = "mistral" if m.sliding_window else "llama"
    fam = FAMILIES[name]
    for key, value in fam.keys.items():
        if key not in fam.free and getattr(m, key) != value:
            raise ConfigError(f"model.{key}={getattr(m, key)!r}: a Hugging Face {fam.model_type} model "
                              f"({fam.architecture}) needs model.{key}={value!r}")
    if m.sliding_window and not fam.windows:
        raise ConfigError(f"model.sliding_window={m.sliding_window}: a Hugging Face {fam.model_type} model has no "
                          "sliding window")
    return fam


def window_fields(m: ModelConfig, fam: Family) -> dict[str, Any]:
    """sliding_window (+ layer_types / use_sliding_window) of the exported config.json."""
    if not fam.windows:
        return {}
    if fam.model_type in ("mistral", "mixtral"):
        return {"sliding_window": m.sliding_window or None}
    from llmjax.models.blocks import layer_windows

    types = ["sliding_attention" if w else "full_attention" for w in layer_windows(m)]
    out: dict[str, Any] = {"sliding_window": m.sliding_window or None, "layer_types": types}
    if fam.model_type in ("qwen2", "qwen3"):
        if m.global_every:
            raise ConfigError(f"model.global_every={m.global_every}: a Hugging Face {fam.model_type} model windows "
                              "a first run of layers only")
        out.update(use_sliding_window=bool(m.sliding_window), max_window_layers=0)
    return out
