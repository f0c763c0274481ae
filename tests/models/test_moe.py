"""Mixture-of-Experts in float32: the layer against a per-expert reference (forward and gradients),
capacity vs dropless dispatch, dropped tokens, the router losses by hand, accounting, training
through the train step, and a data/fsdp/tensor mesh against one device."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import family_loss, packed_batch, tiny_config

import llmjax.train.telemetry.metrics as M
from llmjax.config import ConfigError, MoEConfig, validate
from llmjax.models.moe import MoE, capacity
from llmjax.models.transformer import Transformer
from llmjax.train.setup import build_setup, model_abstract_params

RTOL, ATOL = 1e-5, 1e-6  # atol is relative to the largest entry of each tensor
B, L, X = 2, 8, 4  # T = 16 tokens, 4 experts
BASE = dataclasses.replace(tiny_config().model, d_model=16, d_ff=32)
ACTS = {"swiglu": jax.nn.silu, "geglu": jax.nn.gelu, "gelu": jax.nn.gelu, "relu": jax.nn.relu}


def moe_cfg(mlp="swiglu", use_bias=False, **moe):
    return dataclasses.replace(BASE, mlp=mlp, use_bias=use_bias, moe=MoEConfig(**{"num_experts": X, **moe}))


def layer_inputs(cfg, seed=0):
    """x [B, L, D] and random params of MoE(cfg), drawn at a scale that makes routing decisive."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((B, L, cfg.d_model)), jnp.float32)
    shapes = jax.eval_shape(MoE(cfg).init, jax.random.PRNGKey(0), x)["params"]
    shapes = jax.tree.map(lambda b: b.value if hasattr(b, "value") else b, shapes,
                          is_leaf=lambda b: hasattr(b, "value"))
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32), shapes)
    return x, params


def assert_close(a, b, rtol=RTOL, atol=ATOL, err_msg=""):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * (float(np.max(np.abs(b))) or 1.0), err_msg=err_msg)


def assert_trees_close(a, b):
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        assert_close(x, y, err_msg=jax.tree_util.keystr(path))


def reference_choices(cfg, x, params):
    """Per-token expert choices by numpy argsort (independent of the layer's top_k)."""
    logits = np.asarray(x).reshape(-1, cfg.d_model) @ np.asarray(params["router"]["kernel"])
    return np.argsort(-logits, axis=-1, kind="stable")[:, : cfg.moe.top_k]


def reference_layer(cfg, x, params, choices, keep=None):
    """Loop over experts: out_t = sum over chosen (and kept) experts e of w_te * expert_e(x_t), + shared MLP."""
    moe = cfg.moe
    x_TD = x.reshape(-1, cfg.d_model)
    logits = x_TD @ params["router"]["kernel"]
    scores = jax.nn.softmax(logits, -1) if moe.score == "softmax" else jax.nn.sigmoid(logits)
    w_TK = jnp.take_along_axis(scores, jnp.asarray(choices), axis=-1)
    if moe.renormalize:
        w_TK = w_TK / jnp.sum(w_TK, -1, keepdims=True)
    if keep is not None:
        w_TK = w_TK * jnp.asarray(keep, jnp.float32)
    act, ex = ACTS[cfg.mlp], params["experts"]
    bias = (lambda name, e: ex[name + "_bias"][e]) if cfg.use_bias else (lambda name, e: 0.0)
    out = jnp.zeros_like(x_TD)
    for e in range(moe.num_experts):
        h = act(x_TD @ ex["wi_0_kernel"][e] + bias("wi_0", e))
        if cfg.mlp in ("swiglu", "geglu"):
            h = h * (x_TD @ ex["wi_1_kernel"][e] + bias("wi_1", e))
        y = h @ ex["wo_kernel"][e] + bias("wo", e)
        gate = jnp.sum(jnp.where(jnp.asarray(choices) == e, w_TK, 0.0), axis=-1)
        out = out + gate[:, None] * y
    if moe.shared_experts:
        sh = params["shared"]
        b = (lambda n: sh[n]["bias"]) if cfg.use_bias else (lambda n: 0.0)
        h = act(x_TD @ sh["wi_0"]["kernel"] + b("wi_0"))
        if cfg.mlp in ("swiglu", "geglu"):
            h = h * (x_TD @ sh["wi_1"]["kernel"] + b("wi_1"))
        out = out + h @ sh["wo"]["kernel"] + b("wo")
    return out.reshape(x.shape)


VARIANTS = {
    "swiglu_softmax_top2": dict(),
    "gelu_sigmoid_top1_bias_shared": dict(mlp="gelu", use_bias=True, score="sigmoid", top_k=1, renormalize=False,
                                          shared_experts=2),
    "geglu_softmax_top3_norenorm": dict(mlp="geglu", top_k=3, renormalize=False),
}


# The quick run (-m "not slow") leaves out the two dropless cases that take 12-13 s each on 2 cores.
SLOW_LAYER_CASES = {("swiglu_softmax_top2", "dropless"), ("gelu_sigmoid_top1_bias_shared", "dropless")}


@pytest.mark.parametrize("variant, capacity_factor", [
    pytest.param(variant, factor, id=f"{variant}-{name}",
                 marks=[pytest.mark.slow] if (variant, name) in SLOW_LAYER_CASES else [])
    for variant in VARIANTS for factor, name in ((0.0, "dropless"), (100.0, "capacity_nodrop"))])
def test_layer_matches_per_expert_reference(variant, capacity_factor):
    cfg = moe_cfg(capacity_factor=capacity_factor, **VARIANTS[variant])
    x, params = layer_inputs(cfg)
    choices = reference_choices(cfg, x, params)
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32)
    layer = MoE(cfg)

    def f(p, x):
        y, aux = layer.apply({"params": p}, x)
        return jnp.sum(y * cot), (y, aux)

    (_, (y, aux)), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)
    ref_f = lambda p, x: jnp.sum(reference_layer(cfg, x, p, choices) * cot)  # noqa: E731
    ref_y = reference_layer(cfg, x, params, choices)
    ref_grads = jax.grad(ref_f, argnums=(0, 1))(params, x)
    assert_close(y, ref_y)
    assert_trees_close(grads, ref_grads)
    assert float(aux["dropped_fraction"]) == 0.0


@pytest.mark.slow
def test_capacity_equals_dropless_when_nothing_drops():
    x, params = layer_inputs(moe_cfg())
    y_dropless, _ = MoE(moe_cfg()).apply({"params": params}, x)
    # The tightest capacity at which nothing drops here: the most loaded expert's count in any sequence.
    choices = reference_choices(moe_cfg(), x, params).reshape(B, L * 2)
    most = max(np.bincount(row, minlength=X).max() for row in choices)
    factor = most * X / (L * 2)
    assert capacity(L, 2, X, factor) == most
    y_cap, aux = MoE(moe_cfg(capacity_factor=factor)).apply({"params": params}, x)
    assert float(aux["dropped_fraction"]) == 0.0
    assert_close(y_cap, y_dropless)


def test_over_capacity_assignments_are_dropped():
    cfg = moe_cfg(capacity_factor=0.5)
    x, params = layer_inputs(cfg)
    T, K = B * L, cfg.moe.top_k
    C = capacity(L, K, X, 0.5)  # per sequence: capacity groups are sequences
    choices = reference_choices(cfg, x, params)
    # GShard priority within each sequence: every token's first choice (in token order), then every second choice.
    keep = np.zeros((T, K), bool)
    for b in range(B):
        fill = np.zeros(X, int)
        for k in range(K):
            for t in range(b * L, (b + 1) * L):
                if fill[choices[t, k]] < C:
                    keep[t, k], fill[choices[t, k]] = True, fill[choices[t, k]] + 1
    y, aux = MoE(cfg).apply({"params": params}, x)
    assert 0 < float(aux["dropped_fraction"]) == pytest.approx(1 - keep.mean())
    assert_close(y, reference_layer(cfg, x, params, choices, keep))
    dropped_tokens = ~keep.any(axis=1)
    assert dropped_tokens.any()
    np.testing.assert_array_equal(np.asarray(y).reshape(T, -1)[dropped_tokens], 0.0)  # residual only


def test_router_losses_by_hand():
    cfg = moe_cfg()
    x, params = layer_inputs(cfg)
    _, aux = MoE(cfg).apply({"params": params}, x)
    logits = np.asarray(x, np.float64).reshape(-1, cfg.d_model) @ np.asarray(params["router"]["kernel"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    choices = reference_choices(cfg, x, params)
    load = np.bincount(choices.ravel(), minlength=X) / choices.size
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(aux["load"], load, rtol=1e-6)
    np.testing.assert_allclose(aux["lb_loss"], X * np.sum(load * probs.mean(0)), rtol=1e-5)
    np.testing.assert_allclose(aux["z_loss"], np.mean(lse**2), rtol=1e-5)
    # A zero router: uniform probabilities, so lb = 1 whatever the load, and z = log(X)^2.
    params["router"]["kernel"] = jnp.zeros_like(params["router"]["kernel"])
    _, aux = MoE(cfg).apply({"params": params}, x)
    np.testing.assert_allclose(aux["lb_loss"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(aux["z_loss"], math.log(X) ** 2, rtol=1e-6)


def test_router_jitter_only_with_an_rng():
    cfg = moe_cfg(router_jitter=0.5)
    x, params = layer_inputs(cfg)
    y_plain, _ = MoE(moe_cfg()).apply({"params": params}, x)
    y_eval, _ = MoE(cfg).apply({"params": params}, x)
    y_train, _ = MoE(cfg).apply({"params": params}, x, rngs={"router": jax.random.PRNGKey(3)})
    np.testing.assert_array_equal(y_eval, y_plain)
    assert not np.allclose(y_train, y_plain)


@pytest.mark.slow
def test_model_loss_includes_weighted_router_losses():
    cfg = tiny_config("model.moe.num_experts=4", "model.moe.aux_loss_weight=0.5", "model.moe.z_loss_weight=0.25")
    model = Transformer(cfg.model)
    batch = jax.tree.map(jnp.asarray, packed_batch(cfg, rows=2))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["inputs"])["params"]
    params = jax.tree.map(lambda b: b.value, params, is_leaf=lambda b: hasattr(b, "value"))
    total, sums = jax.jit(lambda p, b: family_loss(model, p, b))(params, batch)
    w = float(jnp.sum(batch["weights"]))
    lb, rz = float(sums["moe_aux_sum"]) / w, float(sums["moe_z_sum"]) / w
    assert lb > 0.9 and rz > 0  # lb is about 1 at init (near-uniform router)
    np.testing.assert_allclose(float(total), float(sums["nll_sum"]) + (0.5 * lb + 0.25 * rz) * w, rtol=1e-6)
    assert sums["moe_load_sum"].shape == (cfg.model.n_layers, 4)


def test_config_validation():
    ok = tiny_config("model.moe.num_experts=4", "model.moe.top_k=2")
    validate(ok, 1)
    for override, key in [("model.moe.top_k=5", "model.moe.top_k"), ("model.moe.every=3", "model.moe.every"),
                          ("model.moe.score=relu", "model.moe.score"),
                          ("model.moe.shared_experts=-1", "model.moe.shared_experts")]:
        with pytest.raises(ConfigError, match=key):
            validate(tiny_config("model.moe.num_experts=4", override), 1)
    validate(tiny_config("model.moe.top_k=5"), 1)  # dense: the MoE keys are ignored


def test_param_counts_and_flops_count_active_experts():
    cfg = tiny_config("model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.shared_experts=1").model
    params = model_abstract_params(cfg)
    counts = M.param_counts(params.shapes, params.logical, cfg)
    D, F, N = cfg.d_model, cfg.d_ff, cfg.n_layers
    experts = N * 8 * 3 * D * F
    assert counts["active"] == counts["total"] - experts + experts * 2 // 8
    assert M.param_counts(params.shapes, params.logical)["active"] == counts["total"]
    dense = dataclasses.replace(cfg, moe=MoEConfig())
    # Per layer: the dense MLP's 3*D*F becomes (top_k + shared) * 3*D*F plus the router D*X.
    assert M.matmul_params(cfg) == M.matmul_params(dense) + N * (2 * 3 * D * F + D * 8)
    assert M.flops_per_token(cfg, 32) - M.flops_per_token(dense, 32) == 6 * N * (2 * 3 * D * F + D * 8)


def train(cfg, steps=3):
    """Losses and last metrics of `steps` train steps on one fixed batch, one device."""
    setup = build_setup(cfg, jax.devices()[:1])
    state, batch = setup.init_state(), setup.put_batch(packed_batch(cfg, seed=0))
    step = setup.jit_train_step()
    losses, metrics = [], None
    for _ in range(steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(metrics)


def gradients(cfg, devices):
    setup = build_setup(cfg, devices)
    grads, metrics = setup.jit_gradients()(setup.init_state().params, setup.put_batch(packed_batch(cfg, seed=0)))
    return jax.device_get(grads), jax.device_get(metrics)


MOE_MODEL = ("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.shared_experts=1")


@pytest.mark.slow
def test_moe_model_trains_and_logs():
    losses, metrics = train(tiny_config(*MOE_MODEL, "model.moe.router_jitter=0.01"))
    assert losses[-1] < losses[0]
    for key in ("moe_aux_loss", "moe_z_loss", "moe_dropped_fraction", "moe_load/layer1/expert3",
                "moe_load_max/layer0", "moe_lb_loss/layer1", "moe_z_loss/layer0", "moe_dropped/layer1"):
        assert np.isfinite(metrics[key]), key
    loads = [metrics[f"moe_load/layer0/expert{j}"] for j in range(4)]
    np.testing.assert_allclose(sum(loads), 1.0, rtol=1e-5)
    assert metrics["moe_dropped_fraction"] == 0.0


@pytest.mark.slow
def test_router_jitter_reaches_scanned_layers():
    cfg = tiny_config(*MOE_MODEL, "model.moe.router_jitter=0.5", "model.scan_layers=true").model
    model, tokens = Transformer(cfg), jnp.asarray(np.arange(16).reshape(2, 8) % 100 + 1, jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"]
    params = jax.tree.map(lambda b: b.value * 8.0 if b.value.ndim > 2 else b.value, params,
                          is_leaf=lambda b: hasattr(b, "value"))
    apply = jax.jit(lambda p, r: model.apply({"params": p}, tokens, rngs={"router": r}))
    plain = jax.jit(lambda p: model.apply({"params": p}, tokens))(params)
    a, b = apply(params, jax.random.PRNGKey(1)), apply(params, jax.random.PRNGKey(2))
    assert not np.allclose(a, plain) and not np.allclose(a, b)


@pytest.mark.parametrize("variant", [pytest.param("dropless_scanned", marks=pytest.mark.slow), "capacity_unrolled"])
def test_moe_mesh_matches_single_device(variant):
    """Gradients and metrics (loss, router losses, load, dropped fraction) on {data=2, fsdp=2, tensor=2}."""
    assert jax.device_count() == 8
    extra = ("model.scan_layers=true",) if variant == "dropless_scanned" else ("model.moe.capacity_factor=1.0",)
    ref_grads, ref_metrics = gradients(tiny_config(*MOE_MODEL, *extra), jax.devices()[:1])
    grads, metrics = gradients(tiny_config(*MOE_MODEL, *extra, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
                               jax.devices())
    assert set(metrics) == set(ref_metrics)
    for key in metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=RTOL, atol=1e-7, err_msg=key)
    assert (ref_metrics["moe_dropped_fraction"] > 0) == (variant == "capacity_unrolled")
    assert_trees_close(grads, ref_grads)


def expert_load_spread(aux_loss_weight: float, steps: int = 40) -> tuple[float, float]:
    """Train a tiny 8-expert top-2 model on fresh random batches; -> (coefficient of variation of the
    expert load, largest expert share), averaged over the MoE layers, at the last step."""
    cfg = tiny_config("model.moe.num_experts=8", "model.moe.top_k=2", f"model.moe.aux_loss_weight={aux_loss_weight}",
                      "model.moe.z_loss_weight=0", f"train.steps={steps}")
    setup = build_setup(cfg, jax.devices()[:1])
    state, step = setup.init_state(), setup.jit_train_step()
    for i in range(steps):
        state, metrics = step(state, setup.put_batch(packed_batch(cfg, seed=i)))
    metrics = jax.device_get(metrics)
    loads = np.array([[metrics[f"moe_load/layer{layer}/expert{e}"] for e in range(8)] for layer in range(2)])
    return float(np.mean(loads.std(axis=1) * 8)), float(np.mean(loads.max(axis=1)))


@pytest.mark.slow
def test_load_balancing_loss_spreads_the_load():
    """Measured here: without the loss the load's coefficient of variation is about 1.17 (the busiest
    expert takes 42% of the assignments, uniform is 12.5%); with weight 0.1 it is about 0.35 (20%)."""
    cv_off, max_off = expert_load_spread(0.0)
    cv_on, max_on = expert_load_spread(0.1)
    assert cv_on < 0.6 * cv_off and max_on < max_off, (cv_off, cv_on, max_off, max_on)


EP_MODEL = ("model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.shared_experts=1", "train.batch_size=8")


@functools.cache
def one_device_gradients(extra: tuple[str, ...]):
    return gradients(tiny_config(*EP_MODEL, *extra), jax.devices()[:1])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dropless", "capacity"])
@pytest.mark.parametrize("layout", [("mesh.expert=8", "mesh.data=1"), ("mesh.expert=4", "mesh.data=2"),
                                    ("mesh.expert=2", "mesh.data=2", "mesh.tensor=2")],
                         ids=["expert8", "expert4_data2", "expert2_data2_tensor2"])
def test_expert_parallel_matches_single_device(layout, mode):
    """Experts split over the `expert` axis (all-to-all in shard_map) equal one device: loss, router
    statistics and gradients. The capacity variant drops some assignments, identically."""
    assert jax.device_count() == 8
    extra = ("model.moe.capacity_factor=1.0",) if mode == "capacity" else ("model.scan_layers=true",)
    ref_grads, ref_metrics = one_device_gradients(extra)
    cfg = tiny_config(*EP_MODEL, *extra, *layout)
    setup = build_setup(cfg, jax.devices())
    lowered = setup.jit_gradients().lower(setup.init_state().params, setup.put_batch(packed_batch(cfg, seed=0)))
    assert "all_to_all" in lowered.as_text()  # tokens travel to their experts' devices
    grads, metrics = gradients(cfg, jax.devices())
    for key in ref_metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=RTOL, atol=1e-7, err_msg=key)
    assert (ref_metrics["moe_dropped_fraction"] > 0) == (mode == "capacity")
    assert_trees_close(grads, ref_grads)


@pytest.mark.slow
def test_cached_decoding_equals_full_forward():
    """The KV-cache path (`Engine`) runs MoE layers too: dropless routing is per token, so it is exact.

    every=2 (one group of a dense and an MoE block) covers the grouped cache layout and the MoE block."""
    every = 2
    from llmjax.infer.engine import Engine
    from llmjax.infer.sampling import SamplingParams

    cfg = tiny_config(*MOE_MODEL, "model.scan_layers=true", f"model.moe.every={every}")
    model = Transformer(cfg.model)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(lambda b: b.value * 8.0 if b.value.ndim > 2 else b.value, params,
                          is_leaf=lambda b: hasattr(b, "value"))
    prompts = [[5, 17, 3], [9, 40, 2, 77, 31, 8]]
    out = Engine(cfg.model, params).generate(prompts, SamplingParams(max_new_tokens=6), return_logits=True)
    for p, g in zip(prompts, out, strict=True):
        full = model.apply({"params": params}, jnp.asarray([p + g.tokens], jnp.int32))[0]
        ref = np.asarray(full[len(p) - 1: len(p) - 1 + len(g.tokens)])
        np.testing.assert_allclose(g.logits, ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())


@pytest.mark.slow
def test_moe_every_second_layer():
    """every=2: a scan over groups (dense block, MoE block); equals the blocks applied one by one."""
    from llmjax.models.attention import MaskSpec
    from llmjax.models.blocks import Block, StackInputs
    from llmjax.models.families import build_family

    cfg = tiny_config(*MOE_MODEL, "model.n_layers=4", "model.moe.every=2", "model.scan_layers=true")
    model = Transformer(cfg.model)
    batch = jax.tree.map(jnp.asarray, packed_batch(cfg, rows=2))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["inputs"])["params"]
    params = jax.tree.map(lambda b: b.value, params, is_leaf=lambda b: hasattr(b, "value"))
    layers = params["layers"]
    assert set(layers) == {"block_0", "block_1"}
    assert "mlp" in layers["block_0"] and "moe" in layers["block_1"] and "mlp" not in layers["block_1"]
    assert layers["block_1"]["moe"]["experts"]["wo_kernel"].shape[0] == 2  # one entry per group
    args = (batch["inputs"], batch["segment_ids"], batch["positions"])
    scanned = jax.jit(lambda p: model.apply({"params": p}, *args))(params)
    unrolled_model = Transformer(dataclasses.replace(cfg.model, scan_layers=False))
    unrolled = jax.jit(lambda p: unrolled_model.apply({"params": p}, *args))(params)
    assert_close(unrolled, scanned)

    def by_hand(p):  # embed, then layer i = group i // 2, block i % 2, then the head
        x = jnp.take(p["embed"]["embedding"], batch["inputs"], axis=0)
        inputs = StackInputs(batch["positions"], MaskSpec.self_attention(batch["segment_ids"]))
        for i in range(4):
            block_params = jax.tree.map(lambda a, g=i // 2: a[g], p["layers"][f"block_{i % 2}"])
            x, _ = Block(cfg.model, "moe" if i % 2 else "mlp").apply({"params": block_params}, x, inputs)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.model.norm_eps) * p["final_norm"]["scale"]
        return x @ p["lm_head"]["kernel"]

    assert_close(jax.jit(by_hand)(params), scanned)
    total, sums = jax.jit(lambda p, b: family_loss(model, p, b))(params, batch)
    metrics = build_family(cfg.model).metrics(sums, jnp.sum(batch["weights"]))
    assert "moe_load/layer1/expert0" in metrics and "moe_load/layer3/expert3" in metrics
    assert "moe_load/layer0/expert0" not in metrics and "moe_load/layer2/expert0" not in metrics
    D, F = cfg.model.d_model, cfg.model.d_ff
    dense = dataclasses.replace(cfg.model, moe=MoEConfig())
    assert M.matmul_params(cfg.model) == M.matmul_params(dense) + 2 * (2 * 3 * D * F + D * 4)  # 2 MoE layers


def test_workdirs_saved_before_moe_still_resume(tmp_path):
    """A config.yaml written before `model.moe` existed reads as dense; a changed MoE model is refused."""
    import yaml

    from llmjax.config import to_dict
    from llmjax.train.loop import check_resumable

    (tmp_path / "checkpoints").mkdir()
    cfg = tiny_config()
    old = to_dict(cfg)
    del old["model"]["moe"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    check_resumable(cfg, tmp_path)
    with pytest.raises(ConfigError, match="model.moe"):
        check_resumable(tiny_config("model.moe.num_experts=4"), tmp_path)
