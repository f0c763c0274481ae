"""Chunked cross-entropy (`model.loss_chunk`) equals the dense loss and its gradients (float32,
rtol 1e-5), with token weights and the z-loss, tied and untied heads, on one device and sharded;
and XLA's memory analysis of the train step shows the temporaries falling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import packed_batch, tiny_config

from llmjax.kernels.cross_entropy import token_losses
from llmjax.train.setup import build_setup

RTOL = 1e-5


def assert_close(x, y):
    y = np.asarray(y)
    np.testing.assert_allclose(np.asarray(x), y, rtol=RTOL, atol=RTOL * (float(np.max(np.abs(y))) or 1.0))


def dense_losses(x, head, targets, vocab_axis):
    logits = jnp.einsum("bld,dv->blv", x, head if vocab_axis == 1 else head.T)
    logz = jax.nn.logsumexp(logits, axis=-1)
    return logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0], logz


@pytest.mark.parametrize("vocab_axis", [1, 0])
@pytest.mark.parametrize("chunk", [7, 16, 40])
def test_chunked_equals_dense(vocab_axis, chunk):
    B, L, D, V = 2, 19, 8, 50
    rng = np.random.default_rng(chunk)
    x = jnp.asarray(rng.standard_normal((B, L, D), dtype=np.float32))
    head = jnp.asarray(rng.standard_normal((D, V) if vocab_axis == 1 else (V, D), dtype=np.float32))
    targets = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
    weights = jnp.asarray(rng.uniform(0, 1, (B, L)), jnp.float32)

    def loss(fn):
        def total(x, head):
            nll, logz = fn(x, head)
            return jnp.sum(weights * (nll + 1e-2 * jnp.square(logz)))
        return total

    chunked = lambda x, h: token_losses(x, h, targets, chunk, vocab_axis)  # noqa: E731
    dense = lambda x, h: dense_losses(x, h, targets, vocab_axis)  # noqa: E731
    for a, b in zip(jax.jit(chunked)(x, head), dense(x, head), strict=True):
        assert_close(a, b)
    got = jax.jit(jax.grad(loss(chunked), argnums=(0, 1)))(x, head)
    for a, b in zip(got, jax.grad(loss(dense), argnums=(0, 1))(x, head), strict=True):
        assert_close(a, b)


def gradients(cfg, devices):
    setup = build_setup(cfg, devices)
    state = setup.init_state()
    batch = packed_batch(cfg, seed=1)
    batch["weights"] = (batch["segment_ids"] != 3).astype(np.float32)  # some tokens weigh 0
    grads, metrics = setup.jit_gradients()(state.params, setup.put_batch(batch))
    return jax.device_get(grads), {k: float(v) for k, v in jax.device_get(metrics).items()}


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ("model.tie_embeddings=false",),
    ("model.tie_embeddings=true", "mesh.data=2", "mesh.tensor=2"),
    ("model.tie_embeddings=false", "mesh.data=1", "mesh.fsdp=4"),
])
def test_train_gradients_equal_dense_loss(overrides):
    common = ("train.z_loss=1e-3", *overrides)
    n = 4 if any(o.startswith("mesh.") for o in overrides) else 1
    dense_grads, dense_metrics = gradients(tiny_config(*common[:2]), jax.devices()[:1])
    grads, metrics = gradients(tiny_config(*common, "model.loss_chunk=12"), jax.devices()[:n])
    for key in ("loss", "z_loss"):
        np.testing.assert_allclose(metrics[key], dense_metrics[key], rtol=RTOL)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(dense_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-6 * float(np.max(np.abs(b))),
                                   err_msg=jax.tree_util.keystr(path))


def train_step_temporaries(*overrides: str) -> int:
    cfg = tiny_config("model.vocab_size=16384", "data.seq_len=128", "model.max_seq_len=128", *overrides)
    setup = build_setup(cfg, jax.devices()[:1])
    compiled = setup.jit_train_step().lower(setup.abstract_state, setup.abstract_batch()).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_chunked_loss_shrinks_train_step_temporaries():
    """8 x 128 tokens x 16384 vocab: the float32 logits alone are 64 MiB."""
    dense = train_step_temporaries()
    chunked = train_step_temporaries("model.loss_chunk=16")
    assert dense > 3 * chunked, (dense, chunked)
