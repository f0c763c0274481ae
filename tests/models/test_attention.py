"""The attention interface: the mask description's rule, the implementation registry, refusals."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.config import ConfigError
from llmjax.kernels import ATTENTION_MODULES, attention_names
from llmjax.models import attention
from llmjax.models.attention import MaskSpec, attend


def rule(q_seg, kv_seg, offset, causal, window):
    """The documented rule, one (b, i, j) at a time."""
    B, L = q_seg.shape
    S = kv_seg.shape[1]
    out = np.zeros((B, 1, L, S), bool)
    for b in range(B):
        for i in range(L):
            for j in range(S):
                ok = q_seg[b, i] == kv_seg[b, j]
                ok &= (not causal) or j <= i + offset
                ok &= window <= 0 or i + offset - j < window
                out[b, 0, i, j] = ok
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("offset", [0, 5])
def test_dense_mask_follows_the_rule(causal, window, offset):
    rng = np.random.default_rng(offset + window)
    L, S = 4, 12
    q_seg = np.sort(rng.integers(0, 3, (2, L)), axis=1).astype(np.int32)
    kv_seg = np.sort(rng.integers(0, 3, (2, S)), axis=1).astype(np.int32)
    spec = MaskSpec(jnp.asarray(q_seg), jnp.asarray(kv_seg), offset, causal, window)
    np.testing.assert_array_equal(np.asarray(spec.dense()), rule(q_seg, kv_seg, offset, causal, window))


def test_registry_names_and_refusals(monkeypatch):
    assert set(ATTENTION_MODULES) <= set(attention_names()) and "einsum" in attention_names()
    assert attention.get("einsum") is attention.get("xla")
    with pytest.raises(ConfigError, match="model.attention: 'flash'"):
        attention.get("flash")

    def refuse(platform: str) -> None:
        raise ConfigError(f"model.attention=xla cannot run on {platform} (test)")

    monkeypatch.setitem(attention._IMPLS, "xla", (attention.xla_attention, refuse))
    with pytest.raises(ConfigError, match="cannot run on cpu"):
        attention.get("xla")


def test_scale_is_applied():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 3, 2, 4), dtype=np.float32)
    k = rng.standard_normal((1, 3, 2, 4), dtype=np.float32)
    v = rng.standard_normal((1, 3, 2, 4), dtype=np.float32)
    spec = MaskSpec.self_attention(jnp.ones((1, 3), jnp.int32))
    # scaling q by 2 equals doubling the score scale
    np.testing.assert_allclose(attend(2 * q, k, v, spec), attend(q, k, v, spec, scale=2 * 4**-0.5), rtol=1e-6)
