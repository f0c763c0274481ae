"""Context parallelism (`mesh.context`) in whole train steps equals one device (loss over steps and
gradients, float32), and the config rules that refuse what it cannot run (exit 2, naming the key)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import RTOL, assert_trees_close, packed_batch, run, tiny_config

from llmjax.config import ConfigError
from llmjax.config.rules.validate import validate
from llmjax.config.schema import MeshConfig
from llmjax.models.families import LMBatch, batch_from_dict
from llmjax.models.families.base import BalancedLMBatch
from llmjax.parallel import context
from llmjax.parallel.mesh import build_mesh
from llmjax.parallel.rules import make_rules, use_sharding

LAYOUTS = {
    "data2_context4-all_gather": ("mesh.data=2", "mesh.context=4", "model.context_parallel=all_gather"),
    "context8-ring": ("mesh.context=8", "model.context_parallel=ring"),
    "context2_tensor2_fsdp2-ring": ("mesh.context=2", "mesh.tensor=2", "mesh.fsdp=2", "model.context_parallel=ring"),
}


@pytest.fixture(scope="module")
def reference():
    return run(tiny_config(), jax.devices()[:1])


@pytest.mark.slow  # two train-step compiles per layout
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_context_parallel_train_steps_match_one_device(layout, reference):
    """The loader's rows arrive balanced (`Setup.put_batch`): the model moves no tokens."""
    grads, losses = run(tiny_config(*LAYOUTS[layout]), jax.devices())
    ref_grads, ref_losses = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    assert losses[-1] < losses[0]
    assert_trees_close(grads, ref_grads)


@pytest.mark.parametrize(("overrides", "key"), [
    (("mesh.context=8", "data.seq_len=24"), "data.seq_len=24"),  # 24 % (2 x 8)
    (("mesh.context=4", "mesh.data=2", "model.family=encoder_decoder", "data.seq_len=64", "model.max_seq_len=64",
      "model.vocab_size=256"), "model.family=encoder_decoder"),
    (("mesh.context=2", "mesh.pipeline=2", "mesh.data=2"), "mesh.pipeline=2"),
    (("mesh.context=8", "mesh.rules={act_length: null}"), "mesh.rules.act_length"),
    (("mesh.context=8", "model.context_parallel=ring", "model.attention=cudnn", "model.compute_dtype=bfloat16"),
     "model.attention=cudnn does not return"),
])
def test_context_parallel_refused_before_compile(overrides, key):
    with pytest.raises(ConfigError, match=key.replace("{", r"\{").replace(".", r"\.")):
        validate(tiny_config(*overrides), 8)


def test_context_axis_accepted():
    assert validate(tiny_config("mesh.context=8"), 8)["context"] == 8
    assert validate(tiny_config("mesh.context=-1", "mesh.data=2"), 8)["context"] == 4
    # splash runs under both (all_gather: its mask built for the whole balanced sequence; ring: a kernel per kind of
    # chunk pair; tests/kernels/test_context.py)
    for mode in ("all_gather", "ring"):
        assert validate(tiny_config("mesh.context=8", "model.attention=splash", f"model.context_parallel={mode}"),
                        8)["context"] == 8


def test_host_balanced_rows_round_trip_and_match_the_device_order():
    """`balance_rows` (numpy, the loader's side) is the order `ContextPlan.balance` makes on device, and
    `unbalance_rows` inverts it."""
    x = np.arange(3 * 16 * 2).reshape(3, 16, 2)
    np.testing.assert_array_equal(context.unbalance_rows(context.balance_rows(x, 4), 4), x)
    order = np.concatenate([np.arange(2 * c, 2 * c + 2) for c in (0, 7, 1, 6, 2, 5, 3, 4)])
    np.testing.assert_array_equal(context.balance_rows(x, 4), x[:, order])
    mesh = build_mesh(MeshConfig(data=1, context=4), jax.devices()[:4])
    rules = make_rules(None, dict(mesh.shape))

    def on_device(a):
        with use_sharding(mesh, rules):
            split = context.plan(16)
            assert split is not None
            return split.balance(a)

    np.testing.assert_array_equal(jax.device_get(jax.jit(on_device)(x)), context.balance_rows(x, 4))


@pytest.mark.slow  # two gradient compiles on 8 devices: ~45 s at load 14
def test_loader_balanced_batch_equals_natural_order_on_device():
    """{data=2, context=4}: `put_batch` balances every field on the host (a `BalancedLMBatch`) and gives the
    gradients and loss that natural-order rows balanced by the model on device (`LMBatch`) give."""
    from llmjax.train.setup import build_setup

    cfg = tiny_config("mesh.data=2", "mesh.context=4")
    setup = build_setup(cfg, jax.devices())
    assert setup.batch_layout == (BalancedLMBatch, 4)
    rows = packed_batch(cfg, seed=1)
    balanced = setup.put_batch(rows)
    assert isinstance(balanced, BalancedLMBatch)
    np.testing.assert_array_equal(np.asarray(balanced.positions), context.balance_rows(rows["positions"], 4))
    natural = batch_from_dict(LMBatch, {k: jax.device_put(v, setup.batch_sharding) for k, v in rows.items()})
    params = setup.init_state().params
    gradients = setup.jit_gradients()
    (g_host, m_host), (g_dev, m_dev) = (jax.device_get(gradients(params, b)) for b in (balanced, natural))
    # one device's loss on the same rows first: were the two ever to differ (seen once in a full-suite run, 3e-4,
    # not reproduced in 110 repeated executions of each program at loads 1-14), it says which program is off
    one = build_setup(tiny_config(), jax.devices()[:1])
    m_one = jax.device_get(one.jit_gradients()(jax.device_get(params), one.put_batch(rows))[1])
    losses = {"host-balanced": m_host["loss"], "device-balanced": m_dev["loss"]}
    for name, loss in losses.items():
        np.testing.assert_allclose(loss, m_one["loss"], rtol=RTOL, err_msg=f"{name} vs one device ({losses})")
    np.testing.assert_allclose(m_host["loss"], m_dev["loss"], rtol=RTOL)
    assert float(m_host["tokens"]) == float(rows["weights"].sum())
    assert_trees_close(g_host, g_dev)
