"""Hugging Face `config.json` <-> llmjax `ModelConfig` for the decoder families of
`llmjax.interop.hf_families` (llama, mistral, mixtral, qwen2, qwen3, gemma, gemma2; no JAX import).

Their architectures map onto ours exactly: rotate-half RoPE (HF's convention, so q/k weights
need no permutation) with the `linear`, `dynamic`, `yarn` and `llama3` scalings
(`model.rope_scaling`), grouped-query attention, sliding windows per layer (`model.sliding_window`,
`model.global_every`, from `sliding_window` and `layer_types`), and for Mixtral a float32 softmax
router over all experts with the top-k weights renormalised (`model.moe.score=softmax`,
`renormalize=true`, dropless dispatch). Anything whose results we would not reproduce exactly
(another model_type or activation, longrope, partial rotary embeddings, unexpected biases, a
layer pattern other than all-local or global every k-th layer) raises `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from llmjax.config import ConfigError, ModelConfig, MoEConfig, RopeScalingConfig
from llmjax.config.family_spec import family_spec
from llmjax.guards import inside
from llmjax.interop.hf_families import FAMILIES, SUPPORTED_MODEL_TYPES, Family, family_for, window_fields
from llmjax.models import mup

# ModelConfig fields (and model.moe.* fields) that a Hugging Face config determines.
ARCH_FIELDS = (
    "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len", "norm",
    "norm_eps", "position", "rope_theta", "rope_scaling", "mlp", "use_bias", "tie_embeddings", "sliding_window",
    "global_every", "qkv_bias", "qk_norm", "norm_scale_offset", "post_norms", "scale_embeddings",
    "attention_scale_dim", "attn_softcap", "logit_softcap",
)
_SCALINGS = ("linear", "dynamic", "yarn", "llama3")
MOE_ARCH_FIELDS = ("num_experts", "top_k", "capacity_factor", "every", "shared_experts", "score", "renormalize")


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The parsed `HF_DIR/config.json`; ConfigError naming the path when it is missing or invalid."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConfigError(f"HF_DIR: {hf_dir} is not a directory")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"HF_DIR: {path} not found (a Hugging Face model directory has a config.json)")
    inside(hf_dir, "config.json", "HF_DIR")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return data


class _Fields:
    """Typed access to a config.json's fields; every error names the file and the field."""

    def __init__(self, data: dict[str, Any], where: str):
        self.data, self.where = data, where

    def error(self, field: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}: {field}: {message}")

    def int(self, field: str, default: Any = ..., minimum: int = 1) -> int:
        value = self.data.get(field)
        if value is None:
            if default is ...:
                raise self.error(field, "missing (a positive integer is needed)")
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(field, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def float(self, field: str, default: Any, source: dict[str, Any] | None = None, prefix: str = "") -> float:
        value = (self.data if source is None else source).get(field)
        if value is None:
            if default is ...:
                raise self.error(prefix + field, "missing (a number is needed)")
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
            raise self.error(prefix + field, f"expected a non-negative number, got {value!r}")
        return float(value)

    def flag(self, field: str, default: bool = False) -> bool:
        value = self.data.get(field, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(field, f"expected true or false, got {value!r}")
        return value


def _rope(f: _Fields, max_pos: int) -> tuple[float, RopeScalingConfig, int]:
    """(RoPE base, scaling, model.max_seq_len): ConfigError for longrope, partial rotary and malformed fields.

    `rope_parameters` (transformers >= 5) wins over `rope_scaling` (< 5). The scaled context is
    factor x L0 (L0: original_max_position_embeddings for yarn/llama3, else max_position_embeddings,
    which is what `dynamic` scales from)."""
    theta = f.float("rope_theta", 10000.0)
    scaling, max_len = RopeScalingConfig(), max_pos
    specs = [(k, f.data.get(k)) for k in ("rope_parameters", "rope_scaling") if f.data.get(k) is not None]
    scaled = [(k, v) for k, v in specs if not isinstance(v, dict) or v.get("rope_type", v.get("type")) not in
              (None, "default")]
    for field, spec in (scaled or specs)[:1]:
        if not isinstance(spec, dict) or any(isinstance(v, dict) for v in spec.values()):
            raise f.error(field, f"expected one mapping of RoPE parameters, got {spec!r}")
        kind = spec.get("rope_type", spec.get("type", "default"))
        partial = f.float("partial_rotary_factor", 1.0, spec, f"{field}.")
        if partial != 1.0:
            raise f.error(f"{field}.partial_rotary_factor", f"{partial} is not supported (only 1.0)")
        theta = f.float("rope_theta", theta, spec, f"{field}.")
        if kind in (None, "default"):
            continue
        if kind not in _SCALINGS:
            raise f.error(f"{field}.rope_type", f"RoPE scaling '{kind}' is not supported (supported: default, "
                                                f"{', '.join(_SCALINGS)})")
        at = f"{field}."
        factor = f.float("factor", ..., spec, at)
        if factor < 1:
            raise f.error(f"{field}.factor", f"must be >= 1, got {factor}")
        original = max_pos
        if kind in ("yarn", "llama3"):
            original = spec.get("original_max_position_embeddings") or max_pos
            if isinstance(original, bool) or not isinstance(original, int) or original < 1:
                raise f.error(f"{field}.original_max_position_embeddings", f"expected a positive integer, got "
                                                                          f"{original!r}")
        values: dict[str, Any] = dict(type=kind, factor=factor, original_max_seq_len=original)
        if kind == "llama3":
            values.update(low_freq_factor=f.float("low_freq_factor", ..., spec, at),
                          high_freq_factor=f.float("high_freq_factor", ..., spec, at))
        if kind == "yarn":
            for extra in ("mscale", "mscale_all_dim"):
                if spec.get(extra):
                    raise f.error(f"{field}.{extra}", f"{spec[extra]} is not supported (DeepSeek's yarn variant)")
            truncate = spec.get("truncate", True)
            if not isinstance(truncate, bool):
                raise f.error(f"{field}.truncate", f"expected true or false, got {truncate!r}")
            values.update(beta_fast=f.float("beta_fast", 32.0, spec, at) or 32.0,
                          beta_slow=f.float("beta_slow", 1.0, spec, at) or 1.0,
                          attention_factor=f.float("attention_factor", 0.0, spec, at), truncate=truncate)
        scaling = RopeScalingConfig(**values)
        max_len = max(max_pos, int(factor * original))
    if f.float("partial_rotary_factor", 1.0) != 1.0:
        raise f.error("partial_rotary_factor", f"{f.data['partial_rotary_factor']} is not supported (only 1.0)")
    if theta <= 0:
        raise f.error("rope_theta", f"must be positive, got {theta}")
    return theta, scaling, max_len


def _windows(f: _Fields, fam: Family, n_layers: int) -> tuple[int, int]:
    """(model.sliding_window, model.global_every) from sliding_window, use_sliding_window and layer_types."""
    window = f.data.get("sliding_window")
    if not fam.windows or window is None or f.data.get("use_sliding_window") is False:
        return 0, 0
    window = f.int("sliding_window")
    types = f.data.get("layer_types")
    if types is None:
        return window, 2 if fam.model_type == "gemma2" else 0  # gemma2 before layer_types: every other layer
    allowed = ("sliding_attention", "full_attention")
    if not isinstance(types, list) or len(types) != n_layers or any(t not in allowed for t in types):
        raise f.error("layer_types", f"expected {n_layers} entries of {' / '.join(allowed)}, got {types!r}")
    local = [t == "sliding_attention" for t in types]
    if not any(local):
        return 0, 0
    if all(local):
        return window, 0
    for every in range(2, n_layers + 1):
        if local == [(i + 1) % every != 0 for i in range(n_layers)]:
            return window, every
    raise f.error("layer_types", "this pattern of local and full layers is not supported (only all-local, or a "
                                 "full-attention layer every k-th layer)")


def model_config_from_hf(data: dict[str, Any], where: str = "config.json",
                         base: ModelConfig | None = None) -> tuple[ModelConfig, list[str]]:
    """A Hugging Face config dict -> (llmjax ModelConfig, notes for the log).

    The architecture fields (`ARCH_FIELDS`, `MOE_ARCH_FIELDS`) come from `data`; numerics and
    layout (`compute_dtype`, `param_dtype`, `remat`, `scan_layers`, `attention`, `init_std`) from
    `base` (default: `ModelConfig()`). Raises ConfigError naming `where` and the field.
    """
    f = _Fields(data, where)
    notes: list[str] = []
    model_type = data.get("model_type")
    if model_type not in FAMILIES:
        raise f.error("model_type", f"{model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    fam = FAMILIES[model_type]
    act_field = fam.act_field if fam.act_field in data or "hidden_act" not in data else "hidden_act"
    act = data.get(act_field) or fam.acts[0]
    if act not in fam.acts:
        raise f.error(act_field, f"{act!r} is not supported by {model_type} (only {' / '.join(fam.acts)})")
    for field in fam.false_fields:
        if f.flag(field):
            raise f.error(field, f"true is not supported (llmjax {model_type} layers have no such biases)")
    d_model = f.int("hidden_size")
    n_heads = f.int("num_attention_heads")
    n_kv = f.int("num_key_value_heads", n_heads)
    if n_heads % n_kv:
        raise f.error("num_key_value_heads", f"{n_kv} does not divide num_attention_heads={n_heads}")
    head_dim = f.int("head_dim", 0)
    if head_dim == 0 and d_model % n_heads:
        raise f.error("hidden_size", f"{d_model} is not divisible by num_attention_heads={n_heads} (and no head_dim)")
    if (head_dim or d_model // n_heads) % 2:
        raise f.error("head_dim", f"RoPE needs an even head dimension, got {head_dim or d_model // n_heads}")
    n_layers = f.int("num_hidden_layers")
    theta, scaling, max_len = _rope(f, f.int("max_position_embeddings", 4096))
    window, global_every = _windows(f, fam, n_layers)
    if window and window >= max_len:
        notes.append(f"sliding_window={window} >= the context of {max_len} tokens: the window never applies")
    if model_type == "mixtral":
        n_experts = f.int("num_local_experts")
        top_k = f.int("num_experts_per_tok")
        if top_k > n_experts:
            raise f.error("num_experts_per_tok", f"{top_k} exceeds num_local_experts={n_experts}")
        jitter = f.float("router_jitter_noise", 0.0)
        if jitter >= 1.0:
            raise f.error("router_jitter_noise", f"must be < 1, got {jitter}")
        base_moe = (base or ModelConfig()).moe
        moe = dataclasses.replace(
            base_moe, num_experts=n_experts, top_k=top_k, capacity_factor=0.0, every=1, shared_experts=0,
            score="softmax", renormalize=True, router_jitter=jitter,
            aux_loss_weight=f.float("router_aux_loss_coef", base_moe.aux_loss_weight), z_loss_weight=0.0,
        )
    else:
        moe = MoEConfig()
    keys = dict(fam.keys)
    if fam.extra_import is not None:
        fam.extra_import(f, keys)
    fields = dict(
        keys, vocab_size=f.int("vocab_size"), d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim if head_dim and head_dim * n_heads != d_model else 0, d_ff=f.int("intermediate_size"),
        max_seq_len=max_len, norm_eps=f.float("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        tie_embeddings=f.flag("tie_word_embeddings", fam.tie_default), sliding_window=window,
        global_every=global_every, moe=moe,
    )
    return dataclasses.replace(base or ModelConfig(), **fields), notes


def check_exportable(m: ModelConfig) -> None:
    """ConfigError naming the model.* key when `m` has no Hugging Face equivalent."""
    if not family_spec(m.family).hf_export:
        raise ConfigError(f"model.family={m.family}: only decoder models export to Hugging Face")
    family_for(m)
    scale = mup.attention_scale(m)
    if scale is not None and abs(scale * m.resolved_head_dim ** 0.5 - 1) > 1e-12:
        raise ConfigError(f"model.parametrization=mup: attention scale {scale:.4g} (sqrt(E_base) / head_dim) is "
                          f"not 1/sqrt(head_dim) = {m.resolved_head_dim ** -0.5:.4g}; only a muP model at its "
                          "base head dim exports")
    if m.moe.enabled:
        e = m.moe
        moe_required = {"every": 1, "shared_experts": 0, "score": "softmax", "renormalize": True}
        for key, value in moe_required.items():
            if getattr(e, key) != value:
                raise ConfigError(f"model.moe.{key}={getattr(e, key)!r}: Mixtral needs model.moe.{key}={value!r}")


def rope_fields(m: ModelConfig) -> dict[str, Any]:
    """rope_theta, rope_parameters (transformers >= 5) and rope_scaling (< 5) of `m`; the context fields."""
    s = m.rope_scaling
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": m.rope_theta}
    max_pos = m.max_seq_len
    if s.enabled:
        original = s.original_max_seq_len or m.max_seq_len
        params.update(rope_type=s.type, factor=s.factor)
        if s.type in ("linear", "dynamic"):
            max_pos = original  # what dynamic scales from
        if s.type in ("yarn", "llama3"):
            params["original_max_position_embeddings"] = original
        if s.type == "llama3":
            params.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
        if s.type == "yarn":
            params.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
            if s.attention_factor > 0:
                params["attention_factor"] = s.attention_factor
    legacy = None if not s.enabled else {**{k: v for k, v in params.items() if k != "rope_theta"}, "type": s.type}
    return {"rope_theta": m.rope_theta, "rope_parameters": params, "rope_scaling": legacy,
            "max_position_embeddings": max_pos}


def hf_config_from_model(m: ModelConfig, dtype: str) -> dict[str, Any]:
    """The `config.json` of the Hugging Face model equal to `m` (`hf_families.family_for` picks the family).

    `dtype` is the weights' dtype name (float32, bfloat16, float16). Call `check_exportable` first."""
    fam = family_for(m)
    out: dict[str, Any] = {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.d_ff,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.resolved_head_dim,
        fam.act_field: fam.acts[0] if fam.acts != ("silu", "swish") else "silu",
        "rms_norm_eps": m.norm_eps,
        **rope_fields(m),
        "tie_word_embeddings": m.tie_embeddings,
        "torch_dtype": dtype,
        "dtype": dtype,
        "use_cache": True,
        **window_fields(m, fam),
    }
    if "attention_bias" in fam.false_fields:
        out["attention_bias"] = False
    if "mlp_bias" in fam.false_fields:
        out["mlp_bias"] = False
    if m.moe.enabled:
        out.update(num_local_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k,
                   router_jitter_noise=m.moe.router_jitter, router_aux_loss_coef=m.moe.aux_loss_weight)
    if fam.extra_export is not None:
        fam.extra_export(m, out)
    return out
