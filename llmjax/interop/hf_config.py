"""Hugging Face `config.json` <-> llmjax `ModelConfig`, for Llama-family decoders (no JAX import).

Supported `model_type`s: `llama`, `mistral` (Llama with a sliding window) and `mixtral`
(Mistral with a sparse MoE feed-forward in every layer). Their architecture maps onto ours
exactly: RMSNorm, rotate-half RoPE (`llmjax.models.layers.apply_rope` uses HF's convention,
so q/k weights need no permutation), grouped-query attention, SwiGLU MLPs, and for Mixtral a
float32 softmax router over all experts with the top-k weights renormalised
(`model.moe.score=softmax`, `renormalize=true`, dropless dispatch).

Anything whose results we would not reproduce exactly (another model_type or activation,
RoPE scaling, partial rotary embeddings, biases) raises `ConfigError` naming the field.
A sliding window is honoured by capping `model.max_seq_len` at the window: no sequence the
model is given can then reach past it, so full causal attention is the same computation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from llmjax.config import ConfigError, ModelConfig, MoEConfig
from llmjax.models import mup

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral")
_ACTIVATIONS = ("silu", "swish")  # the same function under two names

# ModelConfig fields (and model.moe.* fields) that a Hugging Face config determines.
ARCH_FIELDS = (
    "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len", "norm",
    "norm_eps", "position", "rope_theta", "mlp", "use_bias", "tie_embeddings",
)
MOE_ARCH_FIELDS = ("num_experts", "top_k", "capacity_factor", "every", "shared_experts", "score", "renormalize")


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The parsed `HF_DIR/config.json`; ConfigError naming the path when it is missing or invalid."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConfigError(f"HF_DIR: {hf_dir} is not a directory")
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"HF_DIR: {path} not found (a Hugging Face model directory has a config.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
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

    def float(self, field: str, default: float, source: dict[str, Any] | None = None) -> float:
        value = (self.data if source is None else source).get(field)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
            raise self.error(field, f"expected a non-negative number, got {value!r}")
        return float(value)

    def flag(self, field: str, default: bool = False) -> bool:
        value = self.data.get(field, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(field, f"expected true or false, got {value!r}")
        return value


def _rope(f: _Fields) -> float:
    """RoPE base frequency; ConfigError for any RoPE variant but the plain one."""
    params = f.data.get("rope_parameters")  # transformers >= 5
    scaling = f.data.get("rope_scaling")  # transformers < 5
    theta = f.float("rope_theta", 10000.0)
    for field, spec in (("rope_parameters", params), ("rope_scaling", scaling)):
        if spec is None:
            continue
        if not isinstance(spec, dict) or any(isinstance(v, dict) for v in spec.values()):
            raise f.error(field, f"expected one mapping of RoPE parameters, got {spec!r}")
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind not in (None, "default"):
            raise f.error(f"{field}.rope_type", f"RoPE scaling '{kind}' is not supported (only the default, "
                                                "unscaled RoPE is implemented)")
        partial = f.float("partial_rotary_factor", 1.0, spec)
        if partial != 1.0:
            raise f.error(f"{field}.partial_rotary_factor", f"{partial} is not supported (only 1.0)")
        theta = f.float("rope_theta", theta, spec)
    if f.float("partial_rotary_factor", 1.0) != 1.0:
        raise f.error("partial_rotary_factor", f"{f.data['partial_rotary_factor']} is not supported (only 1.0)")
    if theta <= 0:
        raise f.error("rope_theta", f"must be positive, got {theta}")
    return theta


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
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise f.error("model_type", f"{model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    act = data.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise f.error("hidden_act", f"{act!r} is not supported (only silu: the SwiGLU MLP)")
    for field in ("attention_bias", "mlp_bias"):
        if f.flag(field):
            raise f.error(field, "true is not supported (llmjax Llama-style layers have no biases)")
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
    max_len = f.int("max_position_embeddings", 4096)
    window = data.get("sliding_window")
    if window is not None and data.get("use_sliding_window", True):
        window = f.int("sliding_window")
        if window < max_len:
            notes.append(f"sliding_window={window} < max_position_embeddings={max_len}: model.max_seq_len is set to "
                         f"{window}, within which the window changes nothing")
            max_len = window
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
    fields = dict(
        vocab_size=f.int("vocab_size"), d_model=d_model, n_layers=f.int("num_hidden_layers"), n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=head_dim if head_dim and head_dim * n_heads != d_model else 0,
        d_ff=f.int("intermediate_size"), max_seq_len=max_len, norm="rmsnorm",
        norm_eps=f.float("rms_norm_eps", 1e-6), position="rope", rope_theta=_rope(f), mlp="swiglu", use_bias=False,
        tie_embeddings=f.flag("tie_word_embeddings", False), moe=moe,
    )
    return dataclasses.replace(base or ModelConfig(), **fields), notes


def check_exportable(m: ModelConfig) -> None:
    """ConfigError naming the model.* key when `m` has no Llama/Mixtral equivalent."""
    if m.family != "decoder":
        raise ConfigError(f"model.family={m.family}: only decoder models export to Hugging Face Llama/Mixtral")
    required = {"norm": "rmsnorm", "position": "rope", "mlp": "swiglu", "use_bias": False}
    for key, value in required.items():
        if getattr(m, key) != value:
            raise ConfigError(f"model.{key}={getattr(m, key)!r}: a Hugging Face Llama/Mixtral model needs "
                              f"model.{key}={value!r}")
    scale = mup.attention_scale(m)
    if scale is not None and abs(scale * m.resolved_head_dim ** 0.5 - 1) > 1e-12:
        raise ConfigError(f"model.parametrization=mup: attention scale {scale:.4g} (sqrt(E_base) / head_dim) is "
                          f"not Llama's 1/sqrt(head_dim) = {m.resolved_head_dim ** -0.5:.4g}; only a muP model at its "
                          "base head dim exports")
    if m.moe.enabled:
        e = m.moe
        moe_required = {"every": 1, "shared_experts": 0, "score": "softmax", "renormalize": True}
        for key, value in moe_required.items():
            if getattr(e, key) != value:
                raise ConfigError(f"model.moe.{key}={getattr(e, key)!r}: Mixtral needs model.moe.{key}={value!r}")


def hf_config_from_model(m: ModelConfig, dtype: str) -> dict[str, Any]:
    """The `config.json` of a LlamaForCausalLM (dense) or MixtralForCausalLM (MoE) equal to `m`.

    `dtype` is the weights' dtype name (float32, bfloat16, float16). Call `check_exportable` first."""
    out: dict[str, Any] = {
        "architectures": ["MixtralForCausalLM" if m.moe.enabled else "LlamaForCausalLM"],
        "model_type": "mixtral" if m.moe.enabled else "llama",
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.d_ff,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": m.tie_embeddings,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if m.moe.enabled:
        out.update(num_local_experts=m.moe.num_experts, num_experts_per_tok=m.moe.top_k, sliding_window=None,
                   router_jitter_noise=m.moe.router_jitter, router_aux_loss_coef=m.moe.aux_loss_weight)
    else:
        out.update(attention_bias=False, mlp_bias=False)
    return out
