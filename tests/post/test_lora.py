"""LoRA: adapters only are trained and held by the optimizer, the merge is W + (alpha/r) A B, every parallel
layout equals one device (as for full fine-tuning, test_parallel / test_pipeline / test_moe), targets that
match nothing are refused, and the exports (merged, PEFT) give the adapted model's logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import LAYOUTS, RTOL, assert_trees_close, packed_batch, tiny_config

from llmjax.config import ConfigError
from llmjax.post.lora import LoraPlan
from llmjax.train.setup import build_setup, model_abstract_params

LORA = ("lora.rank=4", "lora.alpha=8", "lora.targets=[q,k,v,o,mlp]")
MOE = ("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.shared_experts=1", "lora.targets=[q,v,experts]")
EXTRA_LAYOUTS = {
    "pipe2_data2_tensor2_micro4": ("model.n_layers=4", "mesh.pipeline=2", "mesh.data=2", "mesh.tensor=2",
                                   "pipeline.microbatches=4"),
    "moe_expert4_data2": (*MOE, "mesh.expert=4", "mesh.data=2"),
}
STEPS = 3


def random_adapters(setup, seed=1):
    """Adapters with both A and B non-zero (at init B = 0, which would leave dA = 0), laid out as the state's."""
    rng = np.random.default_rng(seed)
    shapes = jax.tree.map(lambda s: s.shape, setup.abstract_state.params)
    values = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s)).astype(np.float32), shapes,
                          is_leaf=lambda x: isinstance(x, tuple))
    return jax.device_put(values, setup.state_shardings.params)


def run(cfg, devices):
    setup = build_setup(cfg, devices)
    state = setup.init_state()
    state = state.replace(params=random_adapters(setup))
    batch = setup.put_batch(packed_batch(cfg, seed=0))
    grads, _ = jax.device_get(setup.jit_gradients()(state.params, batch, state.frozen))
    step = setup.jit_train_step()
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return grads, losses


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(model: tuple[str, ...]):
        if model not in cache:
            cache[model] = run(tiny_config(*LORA, *model), jax.devices()[:1])
        return cache[model]

    return get


# The quick run (-m "not slow") keeps data2_fsdp2_tensor2; the layouts take 20-50 s each on 2 cores.
@pytest.mark.parametrize("layout", [
    name if name == "data2_fsdp2_tensor2" else pytest.param(name, marks=pytest.mark.slow)
    for name in [*LAYOUTS, *EXTRA_LAYOUTS]])
def test_lora_layout_matches_single_device(layout, references):
    extra = LAYOUTS.get(layout) or EXTRA_LAYOUTS[layout]
    model = tuple(x for x in extra if x.startswith(("model.", "lora.")))
    cfg = tiny_config(*LORA, *extra)
    grads, losses = run(cfg, jax.devices())
    ref_grads, ref_losses = references(model)
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    assert losses[-1] < losses[0]
    # atol 1e-5 of each tensor's largest entry (test_parallel: 1e-6): an adapter gradient contracts the full
    # weight gradient (dA = dW B^T), so its smallest entries are sums of many round-off-sized terms
    assert_trees_close(grads, ref_grads, atol=1e-5)


def test_adapters_sharded_like_their_base_matrices():
    cfg = tiny_config(*LORA, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    setup = build_setup(cfg)
    state = setup.init_state()
    q = state.params["layers"]["attn"]["q"]["kernel"]  # A [layers, embed, r], B [layers, r, heads, head_dim]
    assert q["a"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert q["b"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
    assert state.frozen["layers"]["attn"]["q"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp", "tensor", None)


@pytest.mark.slow
def test_only_adapters_train_and_the_optimizer_holds_only_adapters():
    cfg = tiny_config(*LORA, "mesh.data=8", "train.steps=3")
    setup = build_setup(cfg)
    state = setup.init_state()
    base = jax.device_get(state.frozen)
    adapter_shapes = {x.shape for x in jax.tree.leaves(state.params)}
    opt_arrays = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert opt_arrays and all(x.shape in adapter_shapes for x in opt_arrays)
    n_opt = sum(x.size for x in opt_arrays)
    assert n_opt == 2 * sum(x.size for x in jax.tree.leaves(state.params))  # Adam's two moments, adapters only
    before = jax.device_get(state.params)
    # step 0 computes the base model exactly (B = 0)
    merged = jax.device_get(setup.model_params(state))
    assert_trees_close(merged, base, rtol=0, atol=0)
    step = setup.jit_train_step()
    batch = setup.put_batch(packed_batch(cfg))
    for _ in range(3):
        state, _ = step(state, batch)
    after = jax.device_get(state)
    for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(after.frozen), strict=True):
        np.testing.assert_array_equal(x, y)  # the base never moves
    changed = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after.params),
                                                         strict=True)]
    assert all(changed)
    assert setup.checkpoint_state(state).frozen is None  # checkpoints hold the adapters only


def test_merge_is_base_plus_scaled_product():
    cfg = tiny_config(*LORA)
    ap = model_abstract_params(cfg.model)
    plan = LoraPlan(cfg.lora, ap.shapes, ap.logical, ap.roles)
    rng = np.random.default_rng(0)
    base = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), ap.shapes)
    adapters = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), plan.abstract(np.float32))
    merged = plan.merge(base, adapters)
    s = cfg.lora.alpha / cfg.lora.rank
    q = adapters["layers"]["attn"]["q"]["kernel"]  # [N, D, r], [N, r, H, E]
    want_q = base["layers"]["attn"]["q"]["kernel"] + s * np.einsum("ndr,nrhe->ndhe", q["a"], q["b"])
    o = adapters["layers"]["attn"]["o"]["kernel"]  # [N, H, E, r], [N, r, D]
    want_o = base["layers"]["attn"]["o"]["kernel"] + s * np.einsum("nher,nrd->nhed", o["a"], o["b"])
    np.testing.assert_allclose(merged["layers"]["attn"]["q"]["kernel"], want_q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(merged["layers"]["attn"]["o"]["kernel"], want_o, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(merged["embed"]["embedding"], base["embed"]["embedding"])
    assert {"/".join(t.path) for t in plan.targets} == {
        "layers/attn/q/kernel", "layers/attn/k/kernel", "layers/attn/v/kernel", "layers/attn/o/kernel",
        "layers/mlp/wi_0/kernel", "layers/mlp/wi_1/kernel", "layers/mlp/wo/kernel"}


def test_dropout_drops_input_features_of_the_adapter():
    cfg = tiny_config(*LORA, "lora.dropout=0.5")
    ap = model_abstract_params(cfg.model)
    plan = LoraPlan(cfg.lora, ap.shapes, ap.logical, ap.roles)
    base = jax.tree.map(lambda s: jnp.zeros(s.shape), ap.shapes)
    adapters = jax.tree.map(lambda s: jnp.ones(s.shape), plan.abstract(np.float32))
    q = plan.merge(base, adapters, jax.random.PRNGKey(0))["layers"]["attn"]["q"]["kernel"]  # [N, D, H, E]
    rows = np.asarray(q[0, :, 0, 0])  # per input feature: 0 (dropped) or 2 x the undropped value
    full = cfg.lora.alpha / cfg.lora.rank * cfg.lora.rank
    assert set(np.round(rows / full, 5)) == {0.0, 2.0}
    assert jnp.array_equal(q, plan.merge(base, adapters, jax.random.PRNGKey(0))["layers"]["attn"]["q"]["kernel"])


@pytest.mark.parametrize("targets,needle", [("[experts]", "no parameter of this model matches"),
                                            ("[q,experts]", "experts match no parameter"),
                                            ("[q,wq]", "each target is one of")])
def test_targets_that_match_nothing_are_refused(targets, needle):
    cfg = tiny_config(*LORA, f"lora.targets={targets}")
    with pytest.raises(ConfigError, match=needle):
        build_setup(cfg, jax.devices()[:1])
