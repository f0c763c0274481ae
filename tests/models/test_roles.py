"""Parameter roles come from logical axes: every preset's every leaf has one; decay, int8 and counts use them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from llmjax.config import PRESETS_DIR, load_config
from llmjax.infer.quantize import dequantize, nbytes, quantize, quantized_paths
from llmjax.models.roles import ROLES, contracted_axes, decay_mask, role_of
from llmjax.train.setup import model_abstract_params


def leaves_by_path(tree):
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("preset", sorted(p.name for p in PRESETS_DIR.glob("*.yaml")))
def test_every_leaf_of_every_preset_has_a_role(preset):
    cfg = load_config(PRESETS_DIR / preset)
    params = model_abstract_params(cfg.model)  # abstract: no memory even for the 47B preset
    roles = leaves_by_path(params.roles)
    assert roles and set(roles.values()) <= set(ROLES)
    for path, role in roles.items():
        if path.endswith("norm/scale") or path.endswith("norm/bias"):
            assert role == "norm", path
        elif path == "embed/embedding" or path == "pos_embed/embedding":
            assert role == "embedding", path
        elif path == "lm_head/kernel":
            assert role == "head", path
        elif "/experts/" in path:
            assert role == ("expert" if path.endswith("_kernel") else "bias"), path
        elif path.endswith("router/kernel"):
            assert role == "router", path
        elif path.endswith("/kernel"):
            assert role == "matrix", path
        elif path.endswith("/bias"):
            assert role == "bias", path


def test_role_rules():
    assert role_of(("layers", "embed", "heads", "head_dim")) == "matrix"
    assert role_of(("layers", "heads", "head_dim", "embed")) == "matrix"
    assert role_of(("layers", "heads", "head_dim")) == "bias"
    assert role_of(("layers", "expert", "embed", "mlp")) == "expert"
    assert role_of(("layers", "expert", "embed")) == "bias"
    assert role_of(("vocab", "embed")) == "embedding" and role_of(("embed", "vocab")) == "head"
    assert role_of(("layers", "norm")) == "norm" and role_of(("embed", "router")) == "router"
    with pytest.raises(ValueError, match="logical name"):
        role_of(("embed", None))
    # one int8 scale per output channel: contract what maps from (or to) the model width
    assert contracted_axes(("layers", "embed", "heads", "head_dim"), "matrix") == (1,)
    assert contracted_axes(("layers", "heads", "head_dim", "embed"), "matrix") == (1, 2)
    assert contracted_axes(("layers", "expert", "mlp", "embed"), "expert") == (2,)
    assert contracted_axes(("vocab", "embed"), "embedding") == (1,)
    assert contracted_axes(("embed", "router"), "router") is None


MOE = ("model.moe.num_experts=4", "model.moe.top_k=2", "model.use_bias=true", "model.position=learned")


def test_expert_kernels_are_weight_decayed():
    cfg = tiny_config(*MOE)
    params = model_abstract_params(cfg.model)
    mask = leaves_by_path(decay_mask(params.roles, decay_embeddings=False))
    for name in ("wi_0_kernel", "wi_1_kernel", "wo_kernel"):
        assert mask[f"layers/moe/experts/{name}"], name
    assert mask["layers/moe/router/kernel"] and mask["layers/attn/q/kernel"] and mask["lm_head/kernel"]
    assert not mask["layers/moe/experts/wo_bias"] and not mask["layers/attn_norm/scale"]
    assert not mask["embed/embedding"] and not mask["pos_embed/embedding"]
    assert leaves_by_path(decay_mask(params.roles, decay_embeddings=True))["pos_embed/embedding"]


@pytest.mark.slow
def test_weight_decay_reaches_expert_weights_in_training():
    """With zero gradients AdamW's update is -lr * wd * w: experts shrink, norms and biases do not."""
    from llmjax.train.optim import make_optimizer

    cfg = tiny_config(*MOE, "optim.weight_decay=0.5", "optim.warmup_steps=0", "optim.schedule=constant",
                      "optim.lr=0.1", "optim.clip_norm=0")
    abstract = model_abstract_params(cfg.model)
    tx = make_optimizer(cfg.optim, 10, abstract.roles)
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), abstract.shapes)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    u = leaves_by_path(updates)
    np.testing.assert_allclose(u["layers/moe/experts/wi_0_kernel"], -0.05, rtol=1e-6)
    np.testing.assert_allclose(u["layers/moe/experts/wo_bias"], 0.0)
    np.testing.assert_allclose(u["layers/mlp_norm/scale"], 0.0)


@pytest.mark.slow
def test_int8_quantizes_expert_kernels():
    cfg = tiny_config(*MOE)
    abstract = model_abstract_params(cfg.model)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), abstract.shapes)
    q = quantize(params, abstract.logical)
    paths = set(quantized_paths(q))
    for name in ("wi_0_kernel", "wi_1_kernel", "wo_kernel"):
        assert f"layers/moe/experts/{name}" in paths
    assert "layers/moe/router/kernel" not in paths and "layers/moe/experts/wo_bias" not in paths
    wi = q["layers"]["moe"]["experts"]["wi_0_kernel"]  # [N, X, D, F]: one scale per layer, expert, output
    assert wi["int8"].dtype == jnp.int8 and wi["scale"].shape == (2, 4, 1, cfg.model.d_ff)
    back = dequantize(q)
    w = params["layers"]["moe"]["experts"]["wo_kernel"]
    np.testing.assert_allclose(back["layers"]["moe"]["experts"]["wo_kernel"], w,
                               atol=float(jnp.abs(w).max()) / 127 + 1e-7)
    assert nbytes(q) < 0.4 * nbytes(params)


@pytest.mark.slow
def test_cli_eval_int8_on_an_moe_run_quantizes_the_experts(tmp_path, corpus):
    import subprocess
    import sys
    from pathlib import Path

    from helpers import tiny_train_overrides

    root = Path(__file__).resolve().parents[2]
    run = tmp_path / "run"

    def llmjax(*args):
        return subprocess.run([sys.executable, "-m", "llmjax.cli", *map(str, args)], cwd=root, capture_output=True,
                              text=True, timeout=600)

    r = llmjax("train", "--workdir", run, *tiny_train_overrides(corpus), "model.moe.num_experts=4", "train.steps=4",
               "eval.every_steps=0", "sample.max_new_tokens=0")
    assert r.returncode == 0, r.stderr
    assert "layers/moe/experts/wi_0_kernel (expert)" in r.stderr.split("weight decay on")[1].split("not decayed")[0]
    r = llmjax("eval", "--workdir", run, "--int8", "--batches", 1)
    assert r.returncode == 0, r.stderr
    saved = next(line for line in r.stdout.splitlines() if line.startswith("int8 weights"))
    assert "layers/moe/experts/wi_0_kernel" in saved and "layers/moe/experts/wo_kernel" in saved and "saved" in saved
    assert "router" not in saved
