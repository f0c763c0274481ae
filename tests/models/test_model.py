"""Model semantics in float32: packing, causality, GQA/MQA, attention implementations, RoPE,
remat, GPT-2 style configs, bfloat16 compute, logical axis names and the z-loss.

Layout equivalence of the default model lives in test_parallel.py; here only the
variants (GPT-2 style, MQA) are run on a mesh."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import lm_batch, packed_batch, tiny_config

from llmjax.config import ModelConfig
from llmjax.models.attention import MaskSpec, attend
from llmjax.models.families import build_family
from llmjax.models.layers import apply_rope
from llmjax.models.transformer import Transformer
from llmjax.parallel.rules import LOGICAL_AXES, make_rules
from llmjax.train.setup import build_setup
from llmjax.train.step import batch_gradients

RTOL, ATOL = 1e-5, 1e-6  # atol is relative to the largest entry of each tensor
L = 16  # sequence length of the forward-only tests
BASE = tiny_config().model  # d_model 64, 2 layers, 4 heads, 2 kv heads, float32


def model_cfg(**changes) -> ModelConfig:
    return dataclasses.replace(BASE, **changes)


@functools.cache
def logits_fn(cfg: ModelConfig):
    """Jitted (params, tokens, segment_ids, positions) -> logits; one compile per config and shape."""
    model = Transformer(cfg)
    return jax.jit(lambda p, t, s, q: model.apply({"params": p}, t, s, q))


@functools.cache
def init_params(cfg: ModelConfig, seed: int = 0):
    """Random params of `cfg`'s shapes, drawn in numpy (no compile): kernels and embeddings
    N(0, init_std), norm scales 1 + N(0, 0.1), biases N(0, init_std) (non-zero, to exercise them)."""
    shapes = param_shapes(cfg)
    rng = np.random.default_rng(seed)

    def draw(path, s):
        x = rng.standard_normal(s.shape).astype(s.dtype)
        return 1 + 0.1 * x if jax.tree_util.keystr(path).endswith("['scale']") else cfg.init_std * x

    return jax.tree_util.tree_map_with_path(draw, shapes)


def param_shapes(cfg: ModelConfig):
    model = Transformer(cfg)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return nn.meta.unbox(boxed)


@functools.cache
def gradients_fn(cfg: ModelConfig):
    """Jitted (params, batch, z_loss) -> (grads, metrics), z_loss traced so one compile serves all values."""
    model = Transformer(cfg)
    return jax.jit(lambda p, b, z: batch_gradients(build_family(cfg), model, p, lm_batch(b), z, 1))


def logits(cfg, params, tokens, segment_ids=None, positions=None):
    tokens = np.asarray(tokens, np.int32)
    if segment_ids is None:
        segment_ids = np.ones_like(tokens)
    if positions is None:
        positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    return np.asarray(logits_fn(cfg)(params, tokens, np.asarray(segment_ids, np.int32),
                                     np.asarray(positions, np.int32)))


def assert_close(x, y, rtol=RTOL, atol=ATOL, err_msg=""):
    x, y = np.asarray(x), np.asarray(y)
    scale = float(np.max(np.abs(y))) or 1.0
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * scale, err_msg=err_msg)


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    """Leafwise allclose; atol is relative to the leaf's largest entry, but at least 1e-3 of the tree's.

    The floor matters for leaves whose exact value is zero: e.g. the gradient of the key
    bias (softmax is invariant to adding q.b to every score of a row) is pure round-off.
    """
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    tree_scale = max(float(np.max(np.abs(y))) for _, y in flat_b)
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        scale = max(float(np.max(np.abs(y))), 1e-3 * tree_scale) or 1.0
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * scale, err_msg=jax.tree_util.keystr(path))


def small_batch(rows=4, seed=0):
    cfg = tiny_config(f"data.seq_len={L}", f"train.batch_size={rows}")
    return {k: jnp.asarray(v) for k, v in packed_batch(cfg, seed=seed).items()}


def random_tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(1, BASE.vocab_size, size=shape, dtype=np.int32)


# ----------------------------------------------------------------------------- packing, causality


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_packed_documents_do_not_attend_across_boundaries(position):
    cfg = model_cfg(position=position)
    params = init_params(cfg)
    la = 6
    lb = L - la
    doc_a, doc_b = random_tokens(la, seed=1), random_tokens(lb, seed=2)
    pad = 7  # a real token, so padding would change the logits if it leaked
    packed = np.concatenate([doc_a, doc_b])
    tokens = np.stack([
        packed,  # A then B, as two segments
        np.concatenate([doc_a, np.full(lb, pad)]),  # A alone, then padding
        np.concatenate([doc_b, np.full(la, pad)]),  # B alone, then padding
        packed,  # A then B as one segment (no mask between them): the sanity check
    ])
    segment_ids = np.array([[1] * la + [2] * lb, [1] * la + [0] * lb, [1] * lb + [0] * la, [1] * L])
    positions = np.array([
        list(range(la)) + list(range(lb)),
        list(range(la)) + [0] * lb,
        list(range(lb)) + [0] * la,
        list(range(la)) + list(range(lb)),
    ])
    out = logits(cfg, params, tokens, segment_ids, positions)
    assert out.dtype == np.float32 and out.shape == (4, L, cfg.vocab_size)
    assert_close(out[0, :la], out[1, :la])
    assert_close(out[0, la:], out[2, :lb])
    # Sanity: without the segment boundary, B's logits would see A.
    assert np.max(np.abs(out[3, la:] - out[2, :lb])) > 1e-3


def test_causality():
    cfg = BASE
    params = init_params(cfg)
    t = 9
    tokens = np.stack([random_tokens(L, seed=3)] * 4)
    tokens[1, t] = tokens[0, t] % (cfg.vocab_size - 1) + 1  # a different token at position t
    tokens[1, t + 3 :] = random_tokens(L - t - 3, seed=4)  # and different ones after it
    out = logits(cfg, params, tokens)
    assert_close(out[1, :t], out[0, :t])
    assert np.max(np.abs(out[1, t] - out[0, t])) > 1e-3  # the changed position itself does change


# ----------------------------------------------------------------------------- grouped-query attention


def repeat_kv_heads(params, groups):
    """GQA params -> MHA params: each key/value head repeated for the `groups` query heads it serves."""
    params = jax.tree.map(lambda x: x, params)  # shallow copy of the dicts
    attn = dict(params["layers"]["attn"])
    for name in ("k", "v"):
        attn[name] = {n: jnp.repeat(x, groups, axis=2) for n, x in attn[name].items()}  # [N, D, K, E] / [N, K, E]
    params["layers"] = {**params["layers"], "attn": attn}
    return params


@pytest.mark.parametrize("n_kv_heads", [2, 1])
def test_gqa_equals_mha_with_repeated_kv_heads(n_kv_heads):
    gqa = model_cfg(n_kv_heads=n_kv_heads)
    mha = model_cfg(n_kv_heads=BASE.n_heads)
    params = init_params(gqa)
    assert params["layers"]["attn"]["k"]["kernel"].shape == (BASE.n_layers, BASE.d_model, n_kv_heads, 16)
    mha_params = repeat_kv_heads(params, BASE.n_heads // n_kv_heads)
    assert jax.tree.map(jnp.shape, mha_params) == jax.tree.map(lambda x: x.shape, param_shapes(mha))
    batch = small_batch(rows=4, seed=5)
    args = (batch["inputs"], batch["segment_ids"], batch["positions"])
    assert_close(logits(gqa, params, *args), logits(mha, mha_params, *args))


# ----------------------------------------------------------------------------- attention implementations


def naive_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(E) + mask) v with each key/value head repeated for its query group."""
    q, k, v, mask = (np.asarray(a, np.float64) if a.dtype != bool else np.asarray(a) for a in (q, k, v, mask))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("blhe,bshe->bhls", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask, scores, -np.inf)  # mask [B, 1, L, S] broadcasts over heads
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhls,bshe->blhe", probs, v)


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_implementations_agree(n_kv_heads):
    B, H, E = 2, 4, 8
    rng = np.random.default_rng(n_kv_heads)
    q = rng.standard_normal((B, L, H, E), dtype=np.float32)
    k = rng.standard_normal((B, L, n_kv_heads, E), dtype=np.float32)
    v = rng.standard_normal((B, L, n_kv_heads, E), dtype=np.float32)
    segment_ids = np.array([[1] * 5 + [2] * 7 + [3] * 4, [1] * L], np.int32)
    spec = MaskSpec.self_attention(jnp.asarray(segment_ids))
    mask = spec.dense()
    assert mask.shape == (B, 1, L, L) and mask.dtype == jnp.bool_
    expected = naive_attention(q, k, v, mask)
    einsum = attend(q, k, v, spec, "einsum")
    jaxnn = attend(q, k, v, spec, "dot_product_attention")
    assert einsum.shape == jaxnn.shape == (B, L, H, E) and einsum.dtype == jnp.float32
    assert_close(einsum, expected)
    assert_close(jaxnn, expected)


def test_model_with_jax_nn_attention_equals_default():
    other = model_cfg(attention="dot_product_attention")
    params = init_params(BASE)
    batch = small_batch(rows=4, seed=6)
    args = (batch["inputs"], batch["segment_ids"], batch["positions"])
    assert_close(logits(other, params, *args), logits(BASE, params, *args))


# ----------------------------------------------------------------------------- RoPE


def rope_reference(x, positions, theta):
    """Rotate-half RoPE via complex numbers: pair (x[i], x[i + E/2]) rotated by positions * theta^(-2i/E)."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    freqs = theta ** (-2.0 * np.arange(half) / x.shape[-1])
    angles = np.asarray(positions, np.float64)[:, :, None, None] * freqs
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angles)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_matches_complex_rotation():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, L, 3, 8), dtype=np.float32)
    positions = np.stack([np.arange(L), rng.integers(0, 100, L)]).astype(np.int32)
    out = apply_rope(jnp.asarray(x), jnp.asarray(positions), 10000.0)
    assert out.dtype == jnp.float32
    assert_close(out, rope_reference(x, positions, 10000.0))
    # position 0 is the identity; norms are preserved
    assert_close(out[0, 0], x[0, 0])
    assert_close(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1))


def test_rope_scores_depend_only_on_position_difference():
    rng = np.random.default_rng(8)
    q = rng.standard_normal((1, L, 2, 16), dtype=np.float32)
    k = rng.standard_normal((1, L, 2, 16), dtype=np.float32)

    def scores(offset):
        pos = jnp.arange(L, dtype=jnp.int32)[None] + offset
        return jnp.einsum("blhe,bshe->bhls", apply_rope(q, pos, 10000.0), apply_rope(k, pos, 10000.0))

    base = scores(0)
    for offset in (1, 5, 17):
        assert_close(scores(offset), base)
    assert np.max(np.abs(base - jnp.einsum("blhe,bshe->bhls", q, k))) > 1e-2  # RoPE did something


# ----------------------------------------------------------------------------- remat, z-loss


@pytest.mark.slow
def test_remat_policies_give_identical_loss_and_gradients():
    policies = ("none", "full", "dots", "dots_no_batch", "minimal")
    models = [Transformer(model_cfg(remat=p)) for p in policies]

    # One jit for all policies (a fifth of the compile time); each gets its own copy of the
    # params as a separate argument, so XLA cannot merge the computations.
    @jax.jit
    def all_gradients(params_per_policy, batch):
        return [batch_gradients(build_family(m.cfg), m, p, lm_batch(batch), 0.0, 1)
                for m, p in zip(models, params_per_policy, strict=True)]

    params = init_params(BASE)
    results = all_gradients([params] * len(policies), small_batch())
    ref_grads, ref_metrics = results[0]
    for policy, (grads, metrics) in zip(policies[1:], results[1:], strict=True):
        np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=RTOL, err_msg=policy)
        assert_trees_close(grads, ref_grads)


def test_z_loss_changes_gradients_not_reported_loss():
    params = init_params(BASE)
    batch = small_batch()
    grads0, m0 = gradients_fn(BASE)(params, batch, 0.0)
    grads1, m1 = gradients_fn(BASE)(params, batch, 1e-4)
    np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-6)
    assert float(m0["z_loss"]) == 0.0
    # z_loss metric = 1e-4 * mean(logZ^2); at init logZ ~ log(V)
    assert 0.5 * 1e-4 * np.log(BASE.vocab_size) ** 2 < float(m1["z_loss"]) < 2e-4 * np.log(BASE.vocab_size) ** 2
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0),
                                                              strict=True))
    scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(grads0))
    assert diff > 1e-4 * scale


# ----------------------------------------------------------------------------- bfloat16 compute


def test_bfloat16_compute_is_close_to_float32():
    bf16 = model_cfg(compute_dtype="bfloat16")
    params = init_params(BASE)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(param_shapes(bf16)))
    batch = small_batch()
    args = (batch["inputs"], batch["segment_ids"], batch["positions"])
    ref, out = logits(BASE, params, *args), logits(bf16, params, *args)
    assert out.dtype == np.float32
    assert np.max(np.abs(out - ref)) <= 2e-2 * np.max(np.abs(ref))

    def loss(x):
        logz = jax.nn.logsumexp(x, axis=-1)
        tgt = np.take_along_axis(x, np.asarray(batch["targets"])[..., None], axis=-1)[..., 0]
        return float(np.mean(logz - tgt))

    assert abs(loss(out) - loss(ref)) < 1e-2


# ----------------------------------------------------------------------------- logical axis names


GPT2 = ("model.norm=layernorm", "model.position=learned", "model.mlp=gelu", "model.use_bias=true",
        "model.tie_embeddings=true")


@pytest.mark.parametrize("variant", ["default", "gpt2"])
def test_every_param_has_logical_axis_names(variant):
    cfg = ModelConfig() if variant == "default" else tiny_config(*GPT2).model
    boxed = jax.eval_shape(Transformer(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    assert len(leaves) > 5
    for path, box in leaves:
        where = jax.tree_util.keystr(path)
        assert isinstance(box, nn.LogicallyPartitioned), where
        assert len(box.names) == box.value.ndim, where
        for name in box.names:
            # Only the learned position table's length dimension is deliberately unnamed (replicated).
            assert name in LOGICAL_AXES or (name is None and "pos_embed" in where), (where, box.names)
    if variant == "default":
        layers = boxed["layers"]
        assert layers["attn"]["k"]["kernel"].names == ("layers", "embed", "kv_heads", "head_dim")
        assert layers["attn"]["o"]["kernel"].names == ("layers", "heads", "head_dim", "embed")
        assert layers["mlp"]["wo"]["kernel"].names == ("layers", "mlp", "embed")
        assert boxed["lm_head"]["kernel"].names == ("embed", "vocab")


def test_make_rules_replicates_kv_heads_that_do_not_divide():
    mesh = {"data": 4, "tensor": 2}
    for n_kv, expected in ((1, ()), (2, ("tensor",)), (4, ("tensor",))):
        rules = make_rules(None, mesh, n_kv)
        assert rules["kv_heads"] == rules["act_kv_heads"] == expected, n_kv
        assert rules["heads"] == ("tensor",)
        assert rules["embed"] == ()  # no fsdp axis in this mesh
    assert make_rules(None, {"data": 4, "tensor": 3}, 4)["kv_heads"] == ()
    assert make_rules(None, mesh)["kv_heads"] == ("tensor",)  # no head count given: untouched


# ----------------------------------------------------------------------------- mesh runs of the variants


def mesh_gradients(cfg, devices, params):
    """Gradients and loss at `params` (placed as the rules say) on `devices`; also the setup."""
    setup = build_setup(cfg, devices)
    params = jax.device_put(params, setup.state_shardings.params)
    batch = setup.put_batch(packed_batch(cfg, seed=0))
    grads, metrics = setup.jit_gradients()(params, batch)
    return setup, params, jax.device_get(grads), float(metrics["loss"])


@pytest.mark.slow
def test_gpt2_style_model_builds_trains_and_matches_on_a_mesh():
    small = (f"data.seq_len={L}", "train.batch_size=4", "train.steps=5")
    cfg = tiny_config(*GPT2, *small)
    setup = build_setup(cfg, jax.devices()[:1])
    state = setup.init_state()
    params = jax.device_get(state.params)
    assert "lm_head" not in params and "pos_embed" in params
    assert params["pos_embed"]["embedding"].shape == (cfg.model.max_seq_len, cfg.model.d_model)
    layers = params["layers"]
    for path in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/wi_0", "mlp/wo"):
        block, name = path.split("/")
        assert set(layers[block][name]) == {"kernel", "bias"}, path
    assert "wi_1" not in layers["mlp"]  # plain GELU MLP, no gate
    assert set(layers["attn_norm"]) == set(layers["mlp_norm"]) == set(params["final_norm"]) == {"scale", "bias"}
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))

    _, _, grads, loss = mesh_gradients(cfg, jax.devices()[:1], params)
    step = setup.jit_train_step()
    batch = setup.put_batch(packed_batch(cfg, seed=0))
    losses = []
    for _ in range(5):  # one batch, repeated: the loss must fall
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[0], loss, rtol=RTOL)
    assert losses[-1] < losses[0] - 0.1, losses

    mesh_cfg = tiny_config(*GPT2, *small, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    _, _, mesh_grads, mesh_loss = mesh_gradients(mesh_cfg, jax.devices(), params)
    np.testing.assert_allclose(mesh_loss, loss, rtol=RTOL)
    assert_trees_close(mesh_grads, grads)


def test_mqa_runs_on_a_tensor_mesh_and_matches_one_device():
    small = (f"data.seq_len={L}", "train.batch_size=4", "model.n_kv_heads=1")
    params = init_params(model_cfg(n_kv_heads=1))  # shared with the GQA test
    _, _, grads, loss = mesh_gradients(tiny_config(*small), jax.devices()[:1], params)
    setup, mesh_params, mesh_grads, mesh_loss = mesh_gradients(
        tiny_config(*small, "mesh.data=4", "mesh.tensor=2"), jax.devices(), params)
    assert dict(setup.mesh.shape)["tensor"] == 2
    assert setup.rules["kv_heads"] == setup.rules["act_kv_heads"] == () and setup.rules["heads"] == ("tensor",)
    attn = mesh_params["layers"]["attn"]
    assert attn["k"]["kernel"].sharding.spec[2] is None  # the single kv head is replicated
    assert attn["q"]["kernel"].sharding.spec[2] == "tensor"
    np.testing.assert_allclose(mesh_loss, loss, rtol=RTOL)
    assert_trees_close(mesh_grads, grads)


@pytest.mark.slow
def test_unrolled_layers_equal_scanned_layers():
    """model.scan_layers=false runs the same stacked parameters in a Python loop."""
    for remat in ("none", "full"):
        cfg = tiny_config(f"model.remat={remat}")
        cfg_loop = tiny_config(f"model.remat={remat}", "model.scan_layers=false")
        setup = build_setup(cfg, jax.devices()[:1])
        params = setup.init_state().params
        batch = packed_batch(cfg)
        loop_model = Transformer(cfg_loop.model)
        grads_of = jax.jit(lambda model, p, b: batch_gradients(build_family(model.cfg), model, p, lm_batch(b), 0.0, 1),
                           static_argnums=0)
        grads, m = grads_of(setup.model, params, batch)
        grads_loop, m_loop = grads_of(loop_model, params, batch)
        np.testing.assert_allclose(m_loop["loss"], m["loss"], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads_loop), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(b))))
