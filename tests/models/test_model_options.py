"""The model options current open models need (sliding windows per layer, RoPE scaling, q/k/v biases,
QK-norm, (1 + w) norms, embedding scale, sandwich norms, soft-capping) in training: every layout (data,
fsdp, tensor, pipeline) equals the single device, losses and gradients at rtol 1e-5; a local layer never
sees past its window; the chunked attention kernel gives the reference's logits; the options reach the
parameter tree and the validation refuses what they cannot combine with."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import RTOL, assert_trees_close, run, tiny_config

from llmjax.config import ConfigError, validate
from llmjax.models.families import build_family
from llmjax.models.rope import dynamic_inverse_frequencies, static_inverse_frequencies

# Gemma 2-like (local/global every other layer, sandwich norms, soft-capping, (1 + w) norms, sqrt(d)
# embeddings, GeGLU) with Qwen's q/k/v biases and QK-norm and a yarn RoPE, on 4 layers: window 5 < seq 32.
OPTIONS = (
    "model.n_layers=4", "model.sliding_window=5", "model.global_every=2", "model.post_norms=true",
    "model.attn_softcap=20", "model.logit_softcap=15", "model.norm_scale_offset=1", "model.scale_embeddings=true",
    "model.mlp=geglu", "model.qkv_bias=true", "model.qk_norm=true", "model.attention_scale_dim=24",
    "model.rope_scaling.type=yarn", "model.rope_scaling.factor=4", "model.rope_scaling.original_max_seq_len=8",
)
LAYOUTS = {
    "data2_tensor2": ("mesh.data=2", "mesh.tensor=2"),
    "fsdp2_tensor2": ("mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2"),
    "pipe2_data2_micro2": ("mesh.pipeline=2", "mesh.data=2", "pipeline.microbatches=2"),
}


@pytest.fixture(scope="module")
def reference():
    return run(tiny_config(*OPTIONS), jax.devices()[:1])


def test_options_shape_the_parameters():
    cfg = tiny_config(*OPTIONS)
    params = build_family(cfg.model).module().init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    layers = nn.unbox(params)["layers"]
    assert set(layers) == {"block_0", "block_1"}  # local and global layers alternate: units of two blocks
    block = layers["block_0"]
    assert {"attn_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm"} <= set(block)
    assert block["attn"]["q"]["bias"].shape == (2, 4, 16) and "bias" not in block["attn"]["o"]
    assert block["attn"]["q_norm"]["scale"].shape == (2, 16)
    np.testing.assert_array_equal(block["attn_norm"]["scale"], 0.0)  # (1 + w) norms start at w = 0


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_device(layout, reference):
    grads, losses = run(tiny_config(*OPTIONS, *LAYOUTS[layout]), jax.devices()[:4])
    ref_grads, ref_losses = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    assert losses[-1] < losses[0]
    # atol 1e-5 of each tensor's largest entry: the k bias gradient is a near-cancelling sum (a constant
    # shift of k only matters through RoPE and QK-norm), whose round-off depends on the reduction order
    assert_trees_close(grads, ref_grads, atol=1e-5)


def logits(cfg, tokens, params=None):
    model = build_family(cfg.model).module()
    params = params or nn.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
    return np.asarray(jax.jit(model.apply)({"params": params}, tokens)), params


@pytest.mark.slow
def test_a_local_layer_never_sees_past_its_window():
    cfg = tiny_config("model.n_layers=1", "model.sliding_window=4")
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 128, (1, 16)), jnp.int32)
    base, params = logits(cfg, tokens)
    changed, _ = logits(cfg, tokens.at[0, 3].set((tokens[0, 3] + 1) % 128), params)
    diff = np.abs(changed - base).max(axis=-1)[0]
    assert np.all(diff[:3] == 0) and np.all(diff[3:7] > 1e-4)  # positions 3..6 see token 3
    assert np.all(diff[7:] == 0)  # position 7 and later: token 3 is 4+ back


@pytest.mark.slow
def test_chunked_kernel_equals_reference_with_windows():
    opts = ("model.n_layers=2", "model.sliding_window=5", "model.global_every=2", "model.attention_block_q=8",
            "model.attention_block_kv=8")
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 128, (2, 32)), jnp.int32)
    ref, params = logits(tiny_config(*opts), tokens)
    out, _ = logits(tiny_config(*opts, "model.attention=chunked"), tokens, params)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_rope_scalings_reduce_to_plain_rope_where_they_should():
    from llmjax.config import RopeScalingConfig

    plain = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    dyn = dynamic_inverse_frequencies(10000.0, 16, 4.0, 32, jnp.arange(32)[None])  # within L0: unscaled
    np.testing.assert_allclose(np.asarray(dyn), plain, rtol=1e-6)
    longer = dynamic_inverse_frequencies(10000.0, 16, 4.0, 32, jnp.arange(64)[None])
    assert np.all(np.asarray(longer)[1:] < plain[1:])  # past L0 the base grows: lower frequencies
    linear, m = static_inverse_frequencies(10000.0, 16, RopeScalingConfig("linear", 4.0), 32)
    np.testing.assert_allclose(linear, plain / 4) and m == 1.0
    llama3, _ = static_inverse_frequencies(10000.0, 16, RopeScalingConfig("llama3", 8.0), 32)
    assert llama3[0] == plain[0] and np.isclose(llama3[-1], plain[-1] / 8)  # high kept, low divided


@pytest.mark.parametrize("overrides, key", [
    (("model.rope_scaling.type=llama3", "model.position=learned"), "model.rope_scaling.type=llama3 needs"),
    (("model.rope_scaling.type=llama3", "model.rope_scaling.high_freq_factor=0.5"), "high_freq_factor"),
    (("model.rope_scaling.type=linear", "model.rope_scaling.factor=0.5"), "model.rope_scaling.factor"),
    (("model.global_every=2",), "model.global_every=2 needs model.sliding_window"),
    (("model.attn_softcap=5", "model.attention=chunked"), "model.attn_softcap"),
    (("model.logit_softcap=5", "model.loss_chunk=8"), "model.logit_softcap"),
    (("model.sliding_window=4", "model.family=encoder"), "model.sliding_window"),
    (("model.norm_scale_offset=2",), "model.norm_scale_offset"),
])
def test_invalid_combinations_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        validate(tiny_config(*overrides), 1)
