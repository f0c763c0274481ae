"""The causal tiles (`llmjax.kernels.causal_tiles`): the reference's attention, forward and gradients, bit for
bit at the default shapes and within float32 rounding elsewhere.

The reference is `xla_attention` with the first query's slot given as a traced 0, which takes the full path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from helpers import tiny_config

from llmjax.kernels import causal_tiles
from llmjax.models.attention import MaskSpec, skips_upper_tiles, xla_attention
from llmjax.parallel.mesh import build_mesh
from llmjax.parallel.rules import make_rules, use_sharding


def _inputs(B: int, L: int, H: int, K: int, E: int, packed: bool, dtype: jnp.dtype = jnp.float32):
    keys = jax.random.split(jax.random.PRNGKey(L + H + K), 5)
    q = jax.random.normal(keys[0], (B, L, H, E), dtype)
    k = jax.random.normal(keys[1], (B, L, K, E), dtype)
    v = jax.random.normal(keys[2], (B, L, K, E), dtype)
    seg = jnp.ones((B, L), jnp.int32)
    if packed:  # documents of random lengths, as packed training rows have
        seg = 1 + jnp.cumsum(jax.random.bernoulli(keys[3], 0.02, (B, L)), axis=1).astype(jnp.int32)
    w = jax.random.normal(keys[4], (B, L, H, E), jnp.float32)
    return q, k, v, seg, w


def _out_and_grads(q, k, v, seg, w, traced_offset: bool, window: int = 0):
    """The attention's output and the gradients of q, k, v given the output's cotangent w (jitted)."""
    def attention(q, k, v):
        spec = MaskSpec.self_attention(seg, True, window)
        if traced_offset:
            spec = spec.replace(q_offset=jnp.int32(0))
        assert skips_upper_tiles(spec, q.shape[1], k.shape[1]) != traced_offset
        return xla_attention(q, k, v, spec, q.shape[-1] ** -0.5)

    def run(q, k, v, w):
        out, vjp = jax.vjp(attention, q, k, v)
        return (out, *vjp(w.astype(out.dtype)))
    return jax.jit(run)(q, k, v, w)


@pytest.mark.parametrize("B,L,H,K,E", [
    (8, 256, 4, 4, 64),  # the default model's attention (d_model 256)
    (2, 512, 8, 8, 64),  # d_model 512's (issue 27's second benchmark shape)
])
def test_bit_identical_to_the_full_scores_at_the_default_shapes(B, L, H, K, E):
    """Bit for bit where the default run's losses must not move (measured on XLA:CPU, jax 0.10.2 and 0.12.1)."""
    q, k, v, seg, w = _inputs(B, L, H, K, E, packed=True)
    tiled = _out_and_grads(q, k, v, seg, w, traced_offset=False)
    full = _out_and_grads(q, k, v, seg, w, traced_offset=True)
    for a, b, name in zip(tiled, full, ("out", "dq", "dk", "dv"), strict=True):
        assert jnp.array_equal(a, b), f"{name}: max difference {float(jnp.max(jnp.abs(a - b)))}"


@pytest.mark.parametrize("B,L,H,K,E,packed,window", [
    (8, 256, 2, 2, 64, True, 0),  # a shape whose dQ, dK differ from the full path's in the last bit
    (2, 256, 4, 2, 32, False, 0),  # grouped queries
    (1, 256, 2, 1, 16, True, 100),  # multi-query, a local window
])
def test_matches_the_full_scores_elsewhere(B, L, H, K, E, packed, window):
    q, k, v, seg, w = _inputs(B, L, H, K, E, packed)
    tiled = _out_and_grads(q, k, v, seg, w, traced_offset=False, window=window)
    full = _out_and_grads(q, k, v, seg, w, traced_offset=True, window=window)
    for a, b, name in zip(tiled, full, ("out", "dq", "dk", "dv"), strict=True):
        assert jnp.allclose(a, b, rtol=1e-6, atol=1e-6), f"{name}: max difference {float(jnp.max(jnp.abs(a - b)))}"


def test_bfloat16_matches_the_full_scores_closely():
    q, k, v, seg, w = _inputs(2, 256, 4, 4, 64, True, jnp.bfloat16)
    tiled = _out_and_grads(q, k, v, seg, w, traced_offset=False)
    full = _out_and_grads(q, k, v, seg, w, traced_offset=True)
    for a, b in zip(jax.tree.leaves(tiled), jax.tree.leaves(full), strict=True):
        assert jnp.allclose(a.astype(jnp.float32), b.astype(jnp.float32), rtol=2e-2, atol=2e-2)


def test_applies_only_to_halves_of_causal_self_attention():
    assert causal_tiles.applies(256, 256) and causal_tiles.applies(512, 512) and causal_tiles.applies(128, 128)
    assert not causal_tiles.applies(200, 200) and not causal_tiles.applies(256, 512)
    seg = jnp.ones((1, 256), jnp.int32)
    assert skips_upper_tiles(MaskSpec.self_attention(seg), 256, 256)
    assert not skips_upper_tiles(MaskSpec.self_attention(seg, causal=False), 256, 256)
    assert not skips_upper_tiles(MaskSpec.self_attention(seg), 256, 256, softcap=30.0)
    assert not skips_upper_tiles(MaskSpec(seg, seg, 128), 256, 256)  # a cache's fill level: keys ahead exist


@pytest.mark.parametrize("tile", [64, 96])
def test_any_tile_gives_the_reference_closely(tile):
    """Smaller tiles (not used by default) skip more; their sums may round differently, within float32."""
    q, k, v, seg, w = _inputs(2, 192, 4, 2, 32, True)
    spec = MaskSpec.self_attention(seg)
    allowed = spec.dense()[:, 0]

    def tiled(q, k, v):
        B, L, H, E = q.shape
        K = k.shape[2]
        q_BKGLE = q.reshape(B, L, K, H // K, E).transpose(0, 2, 3, 1, 4)
        out = causal_tiles.causal_tiled(q_BKGLE, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), allowed,
                                        E ** -0.5, -1e30, tile)
        return out.transpose(0, 3, 1, 2, 4).reshape(B, L, H, E)

    def full(q, k, v):
        return xla_attention(q, k, v, spec.replace(q_offset=jnp.int32(0)), q.shape[-1] ** -0.5)

    out_a, vjp_a = jax.vjp(tiled, q, k, v)
    out_b, vjp_b = jax.vjp(full, q, k, v)
    assert jnp.allclose(out_a, out_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(vjp_a(w), vjp_b(w), strict=True):
        assert jnp.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_sharded_over_batch_and_heads_equals_one_device():
    """{data=2, tensor=2}: the halves sliced from arrays sharded over batch and heads give the single-device
    full path's output and gradients (rtol 1e-5)."""
    cfg = tiny_config("mesh.data=2", "mesh.tensor=2")
    mesh = build_mesh(cfg.mesh, jax.devices()[:4])
    rules = make_rules(cfg.mesh.rules, dict(mesh.shape), 4)
    q, k, v, seg, w = _inputs(2, 256, 4, 4, 64, True)

    def sharded(q, k, v, w):
        with use_sharding(mesh, rules):
            spec = MaskSpec.self_attention(seg)
            assert skips_upper_tiles(spec, 256, 256)
            out, vjp = jax.vjp(lambda q, k, v: xla_attention(q, k, v, spec, 0.125), q, k, v)
            return (out, *vjp(w))

    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, "tensor", None))  # [B, L, H, E]
    placed = [jax.device_put(x, split) for x in (q, k, v, w)]
    assert len(placed[0].sharding.device_set) == 4
    got = jax.jit(sharded)(*placed)
    assert len(got[0].sharding.device_set) == 4 and len(got[2].sharding.device_set) == 4
    want = _out_and_grads(q, k, v, seg, w, traced_offset=True)
    for a, b, name in zip(got, want, ("out", "dq", "dk", "dv"), strict=True):
        assert jnp.allclose(a, b, rtol=1e-5, atol=1e-6), f"{name}: max difference {float(jnp.max(jnp.abs(a - b)))}"
