"""Every mesh layout equals the single-device computation: loss for several steps and
gradients at step 0, float32, rtol 1e-5, on 8 virtual CPU devices."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import LAYOUTS, RTOL, assert_trees_close, run, tiny_config

from llmjax.train.setup import build_setup


@pytest.fixture(scope="module")
def reference():
    cfg = tiny_config()
    return run(cfg, jax.devices()[:1])


# The quick run (-m "not slow") keeps data8 and data2_fsdp2_tensor2 (all three axes); the others take 16-28 s each
# on 2 cores with a cold compilation cache.
SLOW_LAYOUTS = {"fsdp8", "tensor4_data2", "data2_fsdp2_tensor2_scanned"}


@pytest.mark.parametrize("layout", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_LAYOUTS else name
                                    for name in LAYOUTS])
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
