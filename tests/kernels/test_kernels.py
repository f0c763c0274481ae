"""Attention kernels against the `xla` reference, float32, forward and gradients at rtol 1e-5:
`chunked` at several block sizes (lengths not divisible by them), `splash` in Pallas interpret
mode, `cudnn`'s arguments run through XLA; traced query offsets (KV cache); sharded layouts of
the whole model against one device; cached decoding against the full forward."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import packed_batch, tiny_config

from llmjax.config import ConfigError, validate
from llmjax.infer.engine import Engine
from llmjax.infer.sampling import SamplingParams
from llmjax.kernels.chunked import chunked_attention, chunked_attention_lse
from llmjax.kernels.cudnn import cudnn_arguments, cudnn_attention
from llmjax.kernels.splash import splash_attention, splash_attention_lse
from llmjax.models import attention
from llmjax.models.attention import NEG_INF, Blocks, MaskSpec, xla_attention, xla_attention_lse
from llmjax.models.transformer import Transformer
from llmjax.parallel.mesh import build_mesh
from llmjax.parallel.rules import make_rules, use_sharding
from llmjax.train.setup import build_setup

ROOT = Path(__file__).resolve().parents[2]
RTOL = 1e-5
SCALE = 0.3


def qkv(L: int, S: int, n_kv: int, seed: int = 0, B: int = 2, H: int = 4, E: int = 8):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
                 for shape in ((B, L, H, E), (B, S, n_kv, E), (B, S, n_kv, E)))


def packed_segments(L: int) -> jax.Array:
    """Row 0: three documents; row 1: one document then padding (segment 0)."""
    a, b = L // 4, L // 2
    row0 = [1] * a + [2] * b + [3] * (L - a - b)
    row1 = [1] * (L - L // 5) + [0] * (L // 5)
    return jnp.asarray(np.array([row0, row1], np.int32))


def assert_close(x, y, rtol=RTOL):
    y = np.asarray(y)
    np.testing.assert_allclose(np.asarray(x), y, rtol=rtol, atol=rtol * (float(np.max(np.abs(y))) or 1.0))


def assert_matches_reference(fn, q, k, v, spec):
    """fn(q, k, v, spec) equals xla_attention in value and in the gradients of sum(sin(out))."""
    ref = lambda q, k, v: xla_attention(q, k, v, spec, SCALE)  # noqa: E731
    got = lambda q, k, v: fn(q, k, v, spec)  # noqa: E731
    assert_close(jax.jit(got)(q, k, v), ref(q, k, v))
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2)))  # noqa: E731
    for a, b in zip(grad(got)(q, k, v), grad(ref)(q, k, v), strict=True):
        assert_close(a, b)


# ----------------------------------------------------------------------------- chunked


@pytest.mark.parametrize("n_kv", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("blocks", [pytest.param((8, 8), marks=pytest.mark.slow), (16, 5), (64, 64), (3, 11)])
def test_chunked_equals_reference(n_kv, blocks):
    L = 37  # divisible by none of the blocks
    q, k, v = qkv(L, L, n_kv, seed=n_kv)
    spec = MaskSpec.self_attention(packed_segments(L))
    assert_matches_reference(lambda *a: chunked_attention(*a, SCALE, Blocks(*blocks)), q, k, v, spec)


@pytest.mark.parametrize("causal,window", [(False, 0), (True, 5), (False, 6)])
def test_chunked_masks(causal, window):
    L = 29
    q, k, v = qkv(L, L, 2, seed=window)
    spec = MaskSpec(packed_segments(L), packed_segments(L), 0, causal, window)
    assert_matches_reference(lambda *a: chunked_attention(*a, SCALE, Blocks(8, 8)), q, k, v, spec)


def cache_mask(L: int, S: int, offset, window: int = 0) -> MaskSpec:
    """A chunk of L queries written at cache slot `offset` of S slots; row 1 starts with 2 empty slots."""
    o = int(offset)
    kv = np.zeros((2, S), np.int32)
    kv[0, : o + L] = 1
    kv[1, min(2, o): o + L] = 1
    return MaskSpec(jnp.ones((2, L), jnp.int32), jnp.asarray(kv), offset, True, window)


@pytest.mark.parametrize("impl", ["chunked", "splash"])
@pytest.mark.parametrize("offset,window", [(0, 0), (5, 4), (17, 0)])
def test_traced_query_offset(impl, offset, window):
    """Prefill/decode over a KV cache: the offset is traced (a cache's fill level)."""
    L, S = 3, 20
    q, k, v = qkv(L, S, 1, seed=offset)
    fn = {"chunked": chunked_attention, "splash": splash_attention}[impl]
    expected = xla_attention(q, k, v, cache_mask(L, S, offset, window), SCALE)
    run = jax.jit(lambda q, k, v, o: fn(q, k, v, cache_mask(L, S, offset, window).replace(q_offset=o), SCALE,
                                        Blocks(128, 128)))
    assert_close(run(q, k, v, jnp.int32(offset)), expected)


# splash (Pallas interpret mode, ~15 s of compiling) in the first case: rows that see no key, an empty, a partial and
# a full pair among its kernels; the ring tests (tests/kernels/test_context.py) cover the other masks
@pytest.mark.parametrize("offset,causal,window,with_splash", [(-6, True, 0, True), (9, True, 4, False),
                                                              (-3, False, 0, False)])
def test_block_forms_return_the_log_sum_exp(offset, causal, window, with_splash):
    """The ring's per-block interface: (out, lse) with a traced query offset (negative: the first queries see
    no key, out 0 and lse NEG_INF), equal to the dense definition; chunked's custom backward (with the lse's
    cotangent) and splash's (jax's splash kernels, with the lse's cotangent) equal autodiff through xla's."""
    L, S = 13, 11
    q, k, v = qkv(L, S, 2, seed=abs(offset))
    seg = packed_segments(16)
    spec = MaskSpec(seg[:, :L], seg[:, :S], offset, causal, window)
    allowed = np.asarray(spec.dense())[:, 0]  # [B, L, S]
    scores = np.einsum("blkge,bske->blkgs", np.asarray(q).reshape(2, L, 2, 2, 8), np.asarray(k)) * SCALE
    scores = np.where(allowed[:, :, None, None], scores, -np.inf).reshape(2, L, 4, S)
    lse_ref = np.asarray(jax.nn.logsumexp(scores, axis=-1))
    seen = np.isfinite(lse_ref)
    assert not seen.all() if causal and offset < 0 else seen.any()
    probs = np.where(seen[..., None], np.exp(scores - np.where(seen, lse_ref, 0)[..., None]), 0.0)
    out_ref = np.einsum("blhs,bshe->blhe", probs, np.repeat(np.asarray(v), 2, axis=2))
    # splash's block form picks a static kernel by the traced offset among the values it can take (empty, partial
    # and full pairs here)
    choices = (offset - 20, offset, offset + 20)
    fns = {"xla": lambda q, k, v, o: xla_attention_lse(q, k, v, spec.replace(q_offset=o), SCALE),
           "chunked": lambda q, k, v, o: chunked_attention_lse(q, k, v, spec.replace(q_offset=o), SCALE, Blocks(4, 3)),
           "splash": lambda q, k, v, o: splash_attention_lse(q, k, v, spec.replace(q_offset=o, offsets=choices), SCALE,
                                                             Blocks(128, 128))}
    if not with_splash:
        del fns["splash"]

    def loss(fn, q, k, v):
        out, lse = fn(q, k, v, jnp.int32(offset))
        return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.where(lse > NEG_INF / 2, jnp.cos(lse), 0.0))

    grads = {}
    for name, fn in fns.items():
        out, lse = jax.jit(fn)(q, k, v, jnp.int32(offset))
        assert_close(out, out_ref)
        assert_close(np.where(seen, lse, 0.0), np.where(seen, lse_ref, 0.0))
        assert np.all(np.asarray(lse)[~seen] == NEG_INF)
        grads[name] = jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2)))(q, k, v)
    for name in set(fns) - {"xla"}:
        for a, b in zip(grads[name], grads["xla"], strict=True):
            assert_close(a, b)


# ----------------------------------------------------------------------------- splash (interpret mode)


@pytest.mark.parametrize("L,n_kv,causal,window,blocks", [
    pytest.param(200, 2, True, 0, (128, 128), marks=pytest.mark.slow),  # GQA, lengths padded to the tiles
    (37, 1, True, 7, (128, 128)),  # MQA, sliding window
    (150, 4, False, 0, (128, 256)),  # MHA, bidirectional
])
def test_splash_equals_reference(L, n_kv, causal, window, blocks):
    q, k, v = qkv(L, L, n_kv, seed=L)
    spec = MaskSpec(packed_segments(L), packed_segments(L), 0, causal, window)
    assert_matches_reference(lambda *a: splash_attention(*a, SCALE, Blocks(*blocks)), q, k, v, spec)


@pytest.mark.parametrize("n_kv", [2, 1])
def test_splash_sharded_over_batch_and_heads(n_kv):
    """shard_map over {data=2, tensor=2}; with MQA the one kv head is replicated and each device
    picks it for its query heads."""
    L = 40
    cfg = tiny_config("mesh.data=2", "mesh.tensor=2")
    mesh = build_mesh(cfg.mesh, jax.devices()[:4])
    rules = make_rules(cfg.mesh.rules, dict(mesh.shape), n_kv)
    q, k, v = qkv(L, L, n_kv, seed=3)
    spec = MaskSpec.self_attention(packed_segments(L))

    def sharded(q, k, v, spec):
        with use_sharding(mesh, rules):
            return splash_attention(q, k, v, spec, SCALE, Blocks(128, 128))

    assert_matches_reference(sharded, q, k, v, spec)


def test_splash_and_cudnn_refuse_where_they_cannot_run():
    with pytest.raises(ConfigError, match="TPU .* cannot run on gpu"):
        attention.get("splash", platform="gpu")
    attention.get("splash", platform="tpu")
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU .* for cpu"):
        attention.get("cudnn")  # the tests run on CPU
    for platform in ("gpu", "cuda"):  # compiling for a GPU: allowed where jax finds cuDNN, else refused
        with attention.compiling_for(platform):
            try:
                attention.get("cudnn")
            except ConfigError as e:
                assert "jax cannot use cuDNN here" in str(e)
    with pytest.raises(ConfigError, match="multiple of 128"):
        validate(tiny_config("model.attention=splash", "model.attention_block_kv=64"), 1)
    with pytest.raises(ConfigError, match="compute_dtype=bfloat16"):
        validate(tiny_config("model.attention=cudnn"), 1)


# ----------------------------------------------------------------------------- cudnn arguments


@pytest.mark.parametrize("case", ["causal_packed", "causal_window", "bidirectional", "cache_offset"])
def test_cudnn_arguments_express_the_mask(case):
    """What cudnn passes to jax.nn.dot_product_attention, run with implementation="xla" on CPU."""
    L, S = 24, 24
    segs = packed_segments(L)
    offset = None
    if case == "causal_packed":
        spec = MaskSpec.self_attention(segs)
    elif case == "causal_window":
        spec = MaskSpec.self_attention(segs, window=5)
    elif case == "bidirectional":
        spec = MaskSpec.self_attention(segs, causal=False)
    else:
        L, S, offset = 3, 20, 5
        spec = cache_mask(L, S, offset)
    q, k, v = qkv(L, S, 2, seed=7)
    args = cudnn_arguments(spec, L, S)
    assert args["is_causal"] == (case in ("causal_packed", "causal_window"))  # cuDNN's causal mask type
    assert ("local_window_size" in args) == (case == "causal_window")
    if offset is None:
        assert_matches_reference(lambda q, k, v, s: cudnn_attention(q, k, v, s, SCALE, implementation="xla"),
                                 q, k, v, spec)
    else:
        run = jax.jit(lambda q, k, v, o: cudnn_attention(q, k, v, spec.replace(q_offset=o), SCALE,
                                                         implementation="xla"))
        assert_close(run(q, k, v, jnp.int32(offset)), xla_attention(q, k, v, spec, SCALE))


def test_cudnn_is_refused_on_cpu_with_exit_2():
    args = ["model.attention=cudnn", "model.compute_dtype=bfloat16", "model.d_model=64", "model.n_layers=1",
            "model.vocab_size=128", "data.seq_len=32", "train.batch_size=8"]
    r = subprocess.run([sys.executable, "-m", "llmjax.cli", "bench", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    assert "model.attention=cudnn needs an NVIDIA GPU" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- the whole model


def gradients(cfg, devices):
    setup = build_setup(cfg, devices)
    state = setup.init_state()
    grads, metrics = setup.jit_gradients()(state.params, setup.put_batch(packed_batch(cfg, seed=0)))
    return jax.device_get(grads), float(metrics["loss"])


@pytest.fixture(scope="module")
def one_device_reference():
    return gradients(tiny_config(), jax.devices()[:1])


@pytest.mark.parametrize("impl", ["chunked", "splash"])
@pytest.mark.parametrize("layout", [("mesh.data=2", "mesh.tensor=2"),
                                    pytest.param(("mesh.data=1", "mesh.fsdp=4"), marks=pytest.mark.slow)])
def test_layouts_equal_one_device(impl, layout, one_device_reference):
    cfg = tiny_config(f"model.attention={impl}", "model.attention_block_q=128", "model.attention_block_kv=128",
                      *layout)
    grads, loss = gradients(cfg, jax.devices()[:4])
    ref_grads, ref_loss = one_device_reference
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-6 * float(np.max(np.abs(b))),
                                   err_msg=jax.tree_util.keystr(path))


PROMPTS = [list(np.random.default_rng(0).integers(4, 128, n)) for n in (3, 11, 6)]


@pytest.mark.parametrize("impl", [pytest.param("chunked", marks=pytest.mark.slow), "splash"])  # chunked: 16-23 s
@pytest.mark.parametrize("sharded", [False, True])
def test_cached_decode_equals_full_forward(impl, sharded):
    """Prefill + decode with the implementation equal the reference model's full forward; sharded:
    {data=2, tensor=2} with MQA (the kv head replicated)."""
    n_kv = 1 if sharded else 2
    cfg = tiny_config(f"model.attention={impl}", "model.attention_block_q=128", "model.attention_block_kv=128",
                      f"model.n_kv_heads={n_kv}")
    reference = Transformer(tiny_config(f"model.n_kv_heads={n_kv}").model)
    params = nn.meta.unbox(reference.init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))["params"])
    params = jax.tree.map(lambda p: p * 8.0 if p.ndim > 1 else p, params)  # logits far from uniform
    if sharded:
        mesh_cfg = tiny_config("mesh.data=2", "mesh.tensor=2").mesh
        mesh = build_mesh(mesh_cfg, jax.devices()[:4])
        engine = Engine(cfg.model, params, mesh, make_rules(mesh_cfg.rules, dict(mesh.shape), n_kv))
    else:
        engine = Engine(cfg.model, params)
    for prompt, g in zip(PROMPTS, engine.generate(PROMPTS, SamplingParams(max_new_tokens=6), return_logits=True),
                         strict=True):
        full = reference.apply({"params": params}, jnp.asarray([prompt + g.tokens], jnp.int32))[0]
        ref = np.asarray(full[len(prompt) - 1: len(prompt) - 1 + len(g.tokens)])
        np.testing.assert_allclose(g.logits, ref, rtol=RTOL, atol=1e-4 * np.abs(ref).max())
