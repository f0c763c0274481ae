"""Rotary position embeddings with the scalings long-context models use (`model.rope_scaling`).

Every variant is the rotate-half RoPE of `llmjax.models.layers.apply_rope` with other inverse
frequencies (and, for yarn, cos/sin multiplied by an attention factor):

  none     theta^(-2i/E)                                  (the plain path, `apply_rope`)
  linear   theta^(-2i/E) / factor                          (position interpolation)
  llama3   low frequencies / factor, high kept, smooth in between (Llama 3.1+)
  yarn     per-dimension blend of interpolated and original frequencies, cos/sin x attention factor
  dynamic  NTK-aware: base theta ((factor L / L0) - (factor - 1))^(E / (E - 2)) with L the largest
           position of the call + 1 (at least L0), recomputed per call as transformers does per forward

The static variants are computed once in float64 at trace time (constants of the program); the
dynamic one is traced (it depends on the positions). Formulas follow the papers and the reference
definitions in `transformers.modeling_rope_utils`, checked against it in tests/interop/test_hf_families.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ModelConfig, RopeScalingConfig
from llmjax.models.layers import apply_rope


def original_length(cfg: ModelConfig) -> int:
    """L0: the pre-training context of a scaled RoPE (`rope_scaling.original_max_seq_len`, else max_seq_len)."""
    return cfg.rope_scaling.original_max_seq_len or cfg.max_seq_len


def yarn_attention_factor(s: RopeScalingConfig) -> float:
    """The cos/sin multiplier of yarn: `attention_factor`, else 0.1 ln(factor) + 1."""
    if s.attention_factor > 0:
        return s.attention_factor
    return 0.1 * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0


def static_inverse_frequencies(theta: float, dim: int, s: RopeScalingConfig, original: int
                               ) -> tuple[np.ndarray, float]:
    """(inverse frequencies [dim / 2] float64, cos/sin multiplier) of a static scaling (linear, llama3, yarn)."""
    exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
    inv = 1.0 / theta ** exponents
    if s.type == "linear":
        return inv / s.factor, 1.0
    if s.type == "llama3":
        low_wavelen, high_wavelen = original / s.low_freq_factor, original / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled), 1.0
    if s.type == "yarn":
        def correction_dim(rotations: float) -> float:
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
        if s.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # no zero-width ramp
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        keep = 1 - ramp  # 1: the original (extrapolated) frequency, 0: the interpolated one
        return (inv / s.factor) * (1 - keep) + inv * keep, yarn_attention_factor(s)
    raise ValueError(f"not a static RoPE scaling: {s.type}")


def dynamic_inverse_frequencies(theta: float, dim: int, factor: float, original: int,
                                positions_BL: jax.Array) -> jax.Array:
    """NTK-aware inverse frequencies [dim / 2] float32 for the longest position of this call."""
    length = jnp.maximum(jnp.max(positions_BL).astype(jnp.float32) + 1.0, float(original))
    base = theta * (factor * length / original - (factor - 1.0)) ** (dim / (dim - 2))
    return 1.0 / base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)


@jax.named_scope("rope")
def rotate(x_BLHE: jax.Array, positions_BL: jax.Array, inv_freq: jax.Array, multiplier: float = 1.0) -> jax.Array:
    """Rotate-half RoPE with the given inverse frequencies [E / 2] (float32), cos/sin x `multiplier`."""
    half = x_BLHE.shape[-1] // 2
    angles = positions_BL.astype(jnp.float32)[:, :, None, None] * inv_freq.astype(jnp.float32)  # [B, L, 1, half]
    sin, cos = jnp.sin(angles) * multiplier, jnp.cos(angles) * multiplier
    x = x_BLHE.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BLHE.dtype)


def rotary(x_BLHE: jax.Array, positions_BL: jax.Array, cfg: ModelConfig) -> jax.Array:
    """RoPE of `cfg` (theta and scaling) on queries or keys x [B, L, H, E] at positions [B, L]."""
    s = cfg.rope_scaling
    if not s.enabled:
        return apply_rope(x_BLHE, positions_BL, cfg.rope_theta)
    dim = x_BLHE.shape[-1]
    if s.type == "dynamic":
        inv = dynamic_inverse_frequencies(cfg.rope_theta, dim, s.factor, original_length(cfg), positions_BL)
        return rotate(x_BLHE, positions_BL, inv)
    inv64, multiplier = static_inverse_frequencies(cfg.rope_theta, dim, s, original_length(cfg))
    return rotate(x_BLHE, positions_BL, jnp.asarray(inv64, jnp.float32), multiplier)
