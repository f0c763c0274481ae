"""Context parallelism (`mesh.context`) in whole train steps equals one device (loss over steps and
gradients, float32), and the config rules that refuse what it cannot run (exit 2, naming the key)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import RTOL, assert_trees_close, run, tiny_config

from llmjax.config import ConfigError
from llmjax.config.rules.validate import validate

LAYOUTS = {
    "data2_context4-all_gather": ("mesh.data=2", "mesh.context=4", "model.context_parallel=all_gather"),
    "context2_tensor2_fsdp2-ring": ("mesh.context=2", "mesh.tensor=2", "mesh.fsdp=2", "model.context_parallel=ring"),
}


@pytest.fixture(scope="module")
def reference():
    return run(tiny_config(), jax.devices()[:1])


@pytest.mark.slow  # two train-step compiles per layout
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_context_parallel_train_steps_match_one_device(layout, reference):
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
    (("mesh.context=8", "model.context_parallel=ring", "model.attention=splash"),
     "model.context_parallel=ring with model.attention=splash"),
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
    # splash runs under all_gather (its mask built for the whole balanced sequence: tests/kernels/test_context.py)
    assert validate(tiny_config("mesh.context=8", "model.attention=splash", "model.context_parallel=all_gather"),
                    8)["context"] == 8
