"""Every mesh layout equals the single-device computation: loss for several steps and
gradients at step 0, float32, rtol 1e-5, on 8 virtual CPU devices."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import packed_batch, tiny_config

from llmjax.train.setup import build_setup

LAYOUTS = {
    "data8": ("mesh.data=8",),
    "fsdp8": ("mesh.data=1", "mesh.fsdp=8"),
    "tensor4_data2": ("mesh.data=2", "mesh.tensor=4"),
    "data2_fsdp2_tensor2": ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
    # tiny_config runs the layers as a Python loop (the default preset); check nn.scan too.
    "data2_fsdp2_tensor2_scanned": ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.scan_layers=true"),
}
STEPS = 3
RTOL, ATOL = 1e-5, 1e-6  # atol is relative to the largest entry of each tensor


def run(cfg, devices):
    """Gradients at step 0 and the losses of STEPS optimizer steps on fixed batches."""
    setup = build_setup(cfg, devices)
    state = setup.init_state()
    batches = [setup.put_batch(packed_batch(cfg, seed=0))] * STEPS  # one batch, so the loss must fall
    grads, _ = setup.jit_gradients()(state.params, batches[0])
    grads = jax.device_get(grads)
    step = setup.jit_train_step()
    losses = []
    for b in batches:
        state, metrics = step(state, b)
        losses.append(float(metrics["loss"]))
    return grads, losses


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        scale = float(np.max(np.abs(y))) or 1.0
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * scale, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def reference():
    cfg = tiny_config()
    return run(cfg, jax.devices()[:1])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_device(layout, reference):
    assert jax.device_count() == 8
    cfg = tiny_config(*LAYOUTS[layout])
    grads, losses = run(cfg, jax.devices())
    ref_grads, ref_losses = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    assert losses[-1] < losses[0]  # it trains
    assert_trees_close(grads, ref_grads)
    # Parameters after Adam steps are not compared elementwise: Adam divides by sqrt(v), so
    # entries whose gradients are round-off-sized move by +-lr either way. Losses capture it.


def test_params_are_sharded_as_the_rules_say():
    cfg = tiny_config("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    setup = build_setup(cfg)
    state = setup.init_state()
    q = state.params["layers"]["attn"]["q"]["kernel"]  # [layers, embed, heads, head_dim]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)
    mu = state.opt_state  # optimizer moments follow their parameters
    leaves = [x for x in jax.tree.leaves(mu) if getattr(x, "shape", None) == q.shape]
    assert leaves and all(x.sharding.spec == q.sharding.spec for x in leaves)


def test_gradient_accumulation_equals_one_pass(reference):
    cfg = tiny_config("optim.grad_accum_steps=4", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    grads, losses = run(cfg, jax.devices())
    ref_grads, ref_losses = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    assert_trees_close(grads, ref_grads)
