"""μP (model.parametrization=mup): exact equality with standard parametrisation at the base width,
per-role init and learning-rate multipliers, the attention scale, the coordinate check, bad input."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from helpers import packed_batch, tiny_config

from llmjax.config import ConfigError, validate
from llmjax.models import mup
from llmjax.scaling import mup_check as C
from llmjax.scaling.mup_check_report import table
from llmjax.train.setup import build_setup


def _train(cfg, steps: int = 3):
    setup = build_setup(cfg, jax.devices()[:1])
    state, step = setup.init_state(), setup.jit_train_step()
    init = jax.device_get(state.params)
    losses = []
    for i in range(steps):
        state, metrics = step(state, setup.put_batch(packed_batch(cfg, seed=i)))
        losses.append(float(metrics["loss"]))
    return init, jax.device_get(state.params), losses


@pytest.mark.slow
def test_mup_at_the_base_width_is_standard_parametrisation_exactly():
    base = ["optim.weight_decay=0.1", "model.n_heads=4", "model.n_kv_heads=2"]
    standard = _train(tiny_config(*base))
    at_base = _train(tiny_config(*base, "model.parametrization=mup", "model.mup_base_width=64"))
    for a, b in zip(jax.tree.leaves(standard[:2]), jax.tree.leaves(at_base[:2]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert standard[2] == at_base[2]
    # and away from the base width it is not
    away = _train(tiny_config(*base, "model.parametrization=mup", "model.mup_base_width=32"))
    assert away[2] != standard[2]


@pytest.mark.slow
def test_init_and_learning_rate_multipliers_by_role():
    """At 4x the base width: hidden matrices init x 1/2 and lr x 1/4, the head init and lr x 1/4, the embedding
    x 1 (measured on real parameters and one Adam step)."""
    cfg = tiny_config("model.parametrization=mup", "model.mup_base_width=16", "optim.clip_norm=0",
                      "optim.weight_decay=0", "optim.schedule=constant", "optim.warmup_steps=0", "optim.lr=1e-3",
                      "optim.eps=1e-15")
    setup = build_setup(cfg, jax.devices()[:1])
    state = setup.init_state()
    p0 = jax.device_get(state.params)
    std = cfg.model.init_std
    assert np.std(p0["embed"]["embedding"]) == pytest.approx(std, rel=0.05)
    assert np.std(p0["layers"]["attn"]["q"]["kernel"]) == pytest.approx(std / 2, rel=0.05)
    assert np.std(p0["layers"]["mlp"]["wi_0"]["kernel"]) == pytest.approx(std / 2, rel=0.05)
    assert np.std(p0["lm_head"]["kernel"]) == pytest.approx(std / 4, rel=0.05)
    state, _ = setup.jit_train_step()(state, setup.put_batch(packed_batch(cfg)))
    p1 = jax.device_get(state.params)
    step = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), p1, p0)  # Adam's first step: lr x sign(g)
    lr = cfg.optim.lr
    assert step["embed"]["embedding"] == pytest.approx(lr, rel=1e-3)
    assert step["layers"]["attn"]["q"]["kernel"] == pytest.approx(lr / 4, rel=1e-3)
    assert step["layers"]["mlp"]["wo"]["kernel"] == pytest.approx(lr / 4, rel=1e-3)
    assert step["lm_head"]["kernel"] == pytest.approx(lr / 4, rel=1e-3)
    assert step["layers"]["attn_norm"]["scale"] == pytest.approx(lr, rel=1e-3)


def test_attention_scale():
    m = tiny_config("model.parametrization=mup", "model.mup_base_width=64", "model.d_model=256").model
    assert mup.base_head_dim(m) == 16 and m.resolved_head_dim == 64  # 4 heads grow wider
    assert mup.attention_scale(m) == pytest.approx(4 / 64)  # sqrt(E_base) / E
    fixed = dataclasses.replace(m, head_dim=16, n_heads=16, n_kv_heads=8)  # more heads of a fixed width
    assert mup.attention_scale(fixed) == pytest.approx(16 ** -0.5)
    assert mup.attention_scale(dataclasses.replace(m, parametrization="standard")) is None


@pytest.fixture(scope="module")
def coordinate_check():
    cfg = tiny_config("model.mup_base_width=64", "optim.lr=1e-2", "optim.weight_decay=0", "train.batch_size=8",
                      "data.seq_len=16", "model.vocab_size=128")
    return C.coordinate_check(cfg, [64, 128, 256, 512], 4)


def _layer_outputs(names):
    """Each block's output (the residual stream) and the logits."""
    return [n for n in names if (n.startswith("layer") and "/" not in n) or n == "lm_head"]


@pytest.mark.slow
def test_coordinate_check_mup_flat_standard_grows(coordinate_check):
    check = coordinate_check
    names = _layer_outputs(C.spread(check, "mup"))
    assert names == ["layer0", "layer1", "lm_head"]
    mup_spread = C.spread(check, "mup")
    standard_growth = C.growth(check, "standard")
    assert all(mup_spread[n] < 2.0 for n in names), {n: mup_spread[n] for n in names}
    assert all(standard_growth[n] > 2.0 for n in names), {n: standard_growth[n] for n in names}
    # the blocks' outputs grow by orders of magnitude under standard parametrisation with Adam
    assert min(standard_growth[n] for n in ("layer0", "layer1")) > 20
    text = table(check)
    assert "max/min" in text and "layer1/mlp/wo" in text


def test_mup_refuses_what_its_rules_do_not_cover():
    with pytest.raises(ConfigError, match="optim.name=adafactor"):
        validate(tiny_config("model.parametrization=mup", "optim.name=adafactor"), 1)
    with pytest.raises(ConfigError, match="tie_embeddings"):
        validate(tiny_config("model.parametrization=mup", "model.tie_embeddings=true"), 1)
    with pytest.raises(ConfigError, match="model.parametrization"):
        validate(tiny_config("model.parametrization=mu"), 1)
    with pytest.raises(ConfigError, match="lora.rank > 0"):
        validate(tiny_config("model.parametrization=mup", "lora.rank=4"), 1)
    with pytest.raises(ConfigError, match="model.attention_scale_dim=24"):
        validate(tiny_config("model.parametrization=mup", "model.attention_scale_dim=24"), 1)
    with pytest.raises(ConfigError, match="--widths: 33"):
        C.coordinate_check(tiny_config("model.d_ff=96"), [64, 33], 1)  # d_ff 96 x 33 / 64 is not whole
    with pytest.raises(ConfigError, match="model.d_model=50 is not divisible by model.n_heads"):
        C.coordinate_check(tiny_config(), [64, 50], 1)


def test_mup_export_to_hugging_face_only_at_the_base_head_dim():
    from llmjax.interop.hf_config import check_exportable

    at_base = tiny_config("model.parametrization=mup", "model.mup_base_width=64").model
    check_exportable(at_base)  # 1/sqrt(E) there: Llama's attention
    with pytest.raises(ConfigError, match="attention scale"):
        check_exportable(dataclasses.replace(at_base, mup_base_width=32))


@pytest.mark.parametrize("args, needle", [(["--widths", "64,abc"], "--widths"), (["--steps", "0"], "--steps"),
                                          (["--parametrizations", "mup,sp"], "--parametrizations"),
                                          (["optim.name=adafactor"], "optim.name=adafactor")])
def test_mup_check_cli_usage_errors_exit_2(args, needle):
    from helpers import run_llmjax

    r = run_llmjax("mup-check", "--out", "/nonexistent/never-written", *args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
