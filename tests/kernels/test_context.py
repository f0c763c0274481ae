"""Context parallelism's attention equals one device's: `all_gather` and `ring`, each with xla, chunked and
splash as the local implementation, forward and gradients, float32, over {context=8}, {data=2, context=4},
{context=2, tensor=2, fsdp=2}, for causal, bidirectional, packed-document and windowed masks. One compiled
function per (layout, strategy) checks all four masks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import RTOL, assert_trees_close

import llmjax.kernels.splash  # noqa: F401  registers `splash`
from llmjax.config import ConfigError
from llmjax.config.schema import MeshConfig
from llmjax.kernels.context import context_attention
from llmjax.models.attention import Blocks, MaskSpec, get, xla_attention
from llmjax.parallel import context
from llmjax.parallel.mesh import build_mesh
from llmjax.parallel.rules import make_rules, use_sharding

B, L, H, K, E = 2, 32, 4, 2, 8
LAYOUTS = {"context8": dict(data=1, context=8), "data2_context4": dict(data=2, context=4),
           "context2_tensor2_fsdp2": dict(data=1, context=2, tensor=2, fsdp=2)}
STRATEGIES = {"all_gather-xla": ("all_gather", "xla"), "all_gather-chunked": ("all_gather", "chunked"),
              "ring-xla": ("ring", "xla"), "ring-chunked": ("ring", "chunked"),
              "all_gather-splash": ("all_gather", "splash"), "ring-splash": ("ring", "splash")}
# name -> (causal, window, packed documents)
MASKS = {"causal": (True, 0, False), "bidirectional": (False, 0, True), "packed": (True, 0, True),
         "window": (True, 5, True)}


def _inputs():
    rng = np.random.default_rng(0)
    q, k, v, ct = (rng.standard_normal(s).astype(np.float32) for s in
                   ((B, L, H, E), (B, L, K, E), (B, L, K, E), (B, L, H, E)))
    packed = np.stack([np.repeat([1, 2, 3], [7, 15, 10]), np.repeat([1, 2, 0], [20, 9, 3])]).astype(np.int32)
    return q, k, v, ct, packed


def _all_masks(attn, q, k, v, ct, packed):
    """{mask: (out, (dq, dk, dv))} for every mask of MASKS."""
    out = {}
    for name, (causal, window, docs) in MASKS.items():
        seg = packed if docs else jnp.ones((B, L), jnp.int32)
        o, pullback = jax.vjp(functools.partial(attn, seg=seg, causal=causal, window=window), q, k, v)
        out[name] = (o, pullback(ct))
    return out


@pytest.fixture(scope="module")
def reference():
    q, k, v, ct, packed = _inputs()

    def attn(q, k, v, seg, causal, window):
        return xla_attention(q, k, v, MaskSpec.self_attention(seg, causal, window), E ** -0.5)

    return jax.device_get(jax.jit(lambda *a: _all_masks(attn, *a))(q, k, v, ct, packed))


# Every strategy over every layout. Not `slow` (CPU compile time is what they cost): `xla` both ways over the two
# 2-axis layouts, and the ring calling `chunked` over {data=2, context=4} (12-18 s each at load 8 on 2 cores);
# the rest is `slow`. Blocks(8, 8) give `chunked` 1 to 4 tiles per call (2 to 8 tokens per chunk of L / 2C),
# so its tile skipping and its log-sum-exp over several tiles are exercised.
FAST = {("context8", "all_gather-xla"), ("context8", "ring-xla"), ("data2_context4", "all_gather-xla"),
        ("data2_context4", "ring-xla"), ("data2_context4", "ring-chunked"),
        ("data2_context4", "all_gather-splash")}  # splash: Pallas interpret mode, 13-16 s per layout
# ring-splash is `slow` everywhere: 31-53 s per layout at load 9, nearly all XLA compiling Pallas interpret-mode
# kernels (per kind of chunk pair: the forward 4 times, dq and dkv twice: remat, and the ring's scan body and last step)
CASES = [pytest.param(layout, s, marks=[] if (layout, s) in FAST else [pytest.mark.slow])
         for layout in LAYOUTS for s in STRATEGIES]


@pytest.mark.parametrize(("layout", "strategy"), CASES)
def test_context_attention_matches_one_device(layout, strategy, reference):
    mode, impl = STRATEGIES[strategy]
    mesh = build_mesh(MeshConfig(**LAYOUTS[layout]), jax.devices())
    rules = make_rules(None, dict(mesh.shape), K)
    q, k, v, ct, packed = _inputs()

    def attn(q, k, v, seg, causal, window):
        split = context.plan(L)
        assert split is not None and split.size == LAYOUTS[layout]["context"]
        q, k, v, seg = (split.balance(x) for x in (q, k, v, seg))
        mask = MaskSpec(seg, seg, 0, causal, window, balanced=True)
        out = context_attention(split, mode, q, k, v, mask, get(impl), E ** -0.5, Blocks(8, 8))
        return split.unbalance(out)

    def run(*args):
        with use_sharding(mesh, rules):
            return _all_masks(attn, *args)

    got = jax.device_get(jax.jit(run)(q, k, v, ct, packed))
    for name in MASKS:
        assert_trees_close(got[name], reference[name], rtol=RTOL)


def test_balance_is_the_load_balanced_order_and_its_inverse():
    mesh = build_mesh(MeshConfig(data=1, context=4), jax.devices()[:4])
    rules = make_rules(None, dict(mesh.shape))
    x = np.arange(2 * 16, dtype=np.int32).reshape(2, 16)

    def both(x):
        with use_sharding(mesh, rules):
            split = context.plan(16)
            assert split is not None and split.chunk == 2
            y = split.balance(x)
            return y, split.unbalance(y)

    balanced, back = jax.device_get(jax.jit(both)(x))
    # device i holds chunks i and 2C-1-i: chunks (0, 7), (1, 6), (2, 5), (3, 4) of two tokens each
    order = np.concatenate([np.arange(2 * c, 2 * c + 2) for c in (0, 7, 1, 6, 2, 5, 3, 4)])
    np.testing.assert_array_equal(balanced, x[:, order])
    np.testing.assert_array_equal(back, x)


@pytest.mark.slow  # Pallas interpret mode over 2 x 8 tiles per device and head: ~25 s
def test_all_gather_splash_with_several_tiles_per_device():
    """`all_gather` with splash where each device's two chunks are whole query tiles of 128 (L = 1024 over
    context=4): the sharded mask info's tile lists (forward, dq and dkv), not only padding, carry the
    balanced order. Causal, packed-document and windowed masks (a window that crosses tiles)."""
    Lb, Hb, Kb = 1024, 2, 1
    rng = np.random.default_rng(1)
    q, ct = (rng.standard_normal((2, Lb, Hb, E)).astype(np.float32) for _ in range(2))
    k, v = (rng.standard_normal((2, Lb, Kb, E)).astype(np.float32) for _ in range(2))
    packed = np.stack([np.repeat([1, 2, 3], [300, 500, 224]), np.repeat([1, 2, 0], [700, 300, 24])]).astype(np.int32)
    masks = {"causal": (True, 0, False), "packed": (True, 0, True), "window": (True, 200, True)}

    def grads(attn, q, k, v, ct):
        out = {}
        for name, (causal, window, docs) in masks.items():
            seg = packed if docs else jnp.ones((2, Lb), jnp.int32)
            o, pullback = jax.vjp(functools.partial(attn, seg=seg, causal=causal, window=window), q, k, v)
            out[name] = (o, pullback(ct))
        return out

    def one_device(q, k, v, seg, causal, window):
        return xla_attention(q, k, v, MaskSpec.self_attention(seg, causal, window), E ** -0.5)

    mesh = build_mesh(MeshConfig(data=2, context=4), jax.devices())
    rules = make_rules(None, dict(mesh.shape), Kb)

    def split(q, k, v, seg, causal, window):
        plan = context.plan(Lb)
        assert plan is not None and plan.chunk == 128
        q, k, v, seg = (plan.balance(x) for x in (q, k, v, seg))
        out = context_attention(plan, "all_gather", q, k, v, MaskSpec(seg, seg, 0, causal, window, balanced=True),
                                get("splash"), E ** -0.5, Blocks(128, 256))
        return plan.unbalance(out)

    def run(*args):
        with use_sharding(mesh, rules):
            return grads(split, *args)

    want = jax.device_get(jax.jit(lambda *a: grads(one_device, *a))(q, k, v, ct))
    got = jax.device_get(jax.jit(run)(q, k, v, ct))
    for name in masks:
        assert_trees_close(got[name], want[name], rtol=RTOL)


def test_ring_with_splash_refused_where_jax_lacks_its_backward_kernels(monkeypatch):
    """The splash blocks need private backward kernels of jax's splash module (found on this jax); where they are
    missing the ring refuses with a ConfigError naming both keys, raised while tracing, before anything compiles."""
    from llmjax.kernels import splash_ring

    assert splash_ring._KERNELS is not None, splash_ring._WHY_NOT
    monkeypatch.setattr(splash_ring, "_KERNELS", None)
    monkeypatch.setattr(splash_ring, "_WHY_NOT", "its splash_attention_kernel has no _splash_attention_bwd_dq")
    mesh = build_mesh(MeshConfig(data=1, context=8), jax.devices())
    q, k, v, _, _ = _inputs()
    seg = jnp.ones((B, L), jnp.int32)

    def attn(q, k, v):
        with use_sharding(mesh, make_rules(None, dict(mesh.shape), K)):
            split = context.plan(L)
            mask = MaskSpec(seg, seg, 0, True, 0, balanced=True)
            return context_attention(split, "ring", q, k, v, mask, get("splash"), E ** -0.5, Blocks(8, 8))

    with pytest.raises(ConfigError, match=r"model\.context_parallel=ring with model\.attention=splash: .*"
                                          r"has no _splash_attention_bwd_dq.*model\.context_parallel=all_gather"):
        jax.jit(attn).lower(q, k, v)
