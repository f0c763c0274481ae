"""Low-precision matmuls (`llmjax.kernels.matmul`): bfloat16 backward matmuls with float32 accumulation.

The custom VJP's gradients equal jax's autodiff of the float32 reference within bfloat16 rounding; float32
operands give the plain jax ops (the same jaxpr); and the lowered bfloat16 train step has no float32 x float32
dot left while the float32 step has no bfloat16 one."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.kernels import matmul

CASES = [  # (a shape, b shape, dot_general dims): Linear's 2-D matmul, attention's batched q.k and p.v
    ((24, 32), (32, 16), (((1,), (0,)), ((), ()))),
    ((2, 3, 20, 8), (2, 3, 12, 8), (((3,), (3,)), ((0, 1), (0, 1)))),
    ((2, 3, 20, 12), (2, 3, 12, 8), (((3,), (2,)), ((0, 1), (0, 1)))),
    ((5, 2, 7), (3, 5, 4), (((0,), (1,)), ((), ()))),  # contraction first, output transposed
]


def _operands(a_shape, b_shape, seed=0):
    ka, kb = jax.random.split(jax.random.key(seed))
    return jax.random.normal(ka, a_shape, jnp.float32), jax.random.normal(kb, b_shape, jnp.float32)


@pytest.mark.parametrize("a_shape,b_shape,dims", CASES)
def test_bf16_gradients_equal_float32_autodiff(a_shape, b_shape, dims):
    a, b = _operands(a_shape, b_shape)
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), jax.eval_shape(lambda: jax.lax.dot_general(a, b, dims)).shape)

    def loss(fn, x, y):
        return jnp.sum(fn(x, y) * w)

    ours = jax.jit(jax.grad(lambda x, y: loss(lambda p, q: matmul.dot_general(p, q, dims), x, y),
                            argnums=(0, 1)))(a16, b16)
    # reference: jax's autodiff of the same product on the float32-cast bfloat16 operands
    ref = jax.jit(jax.grad(lambda x, y: loss(lambda p, q: jax.lax.dot_general(p, q, dims), x, y),
                           argnums=(0, 1)))(a16.astype(jnp.float32), b16.astype(jnp.float32))
    for got, want in zip(ours, ref, strict=True):
        assert got.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(want)))
        # the cotangent and the result are rounded to bfloat16 (8 bits): a few units of 2^-8 of the largest entry
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), atol=3e-2 * scale, rtol=0)
    fwd, plain = jax.jit(lambda x, y: (matmul.dot_general(x, y, dims), jax.lax.dot_general(
        x, y, dims, preferred_element_type=jnp.float32)))(a16, b16)
    assert fwd.dtype == jnp.float32
    np.testing.assert_array_equal(fwd, plain)


def test_einsum_form_equals_dot_general_form():
    a, b = _operands((2, 5, 3, 4), (2, 6, 3, 4))
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    spec = "blke,bske->bkls"

    def loss(x, y):
        return jnp.sum(jnp.sin(matmul.einsum(spec, x, y)))

    ga = jax.jit(jax.grad(loss, argnums=(0, 1)))(a16, b16)
    gr = jax.jit(jax.grad(lambda x, y: jnp.sum(jnp.sin(jnp.einsum(spec, x, y))), argnums=(0, 1)))(
        a16.astype(jnp.float32), b16.astype(jnp.float32))
    for got, want in zip(ga, gr, strict=True):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2 * float(jnp.max(jnp.abs(want))))


def test_dims_to_spec():
    assert matmul.dims_to_spec((((1,), (0,)), ((), ())), 2, 2) == "ab,bd->ad"
    assert matmul.dims_to_spec((((3,), (3,)), ((0, 1), (0, 1))), 4, 4) == "abcd,abgd->abcg"


def test_float32_operands_take_the_plain_ops():
    """float32 (and mixed) operands: exactly the jaxpr of jax's own ops, so float32 training is unchanged."""
    a, b = _operands((6, 8), (8, 4))
    dims = (((1,), (0,)), ((), ()))

    def text(fn):
        return str(jax.make_jaxpr(jax.grad(lambda x, y: jnp.sum(fn(x, y)), argnums=(0, 1)))(a, b))

    plain = text(lambda x, y: jax.lax.dot_general(x, y, dims, preferred_element_type=jnp.float32))
    assert text(lambda x, y: matmul.dot_general(x, y, dims)) == plain
    assert "custom_vjp" not in plain
    assert text(lambda x, y: matmul.einsum("ij,jk->ik", x, y)) == text(
        lambda x, y: jnp.einsum("ij,jk->ik", x, y, preferred_element_type=jnp.float32))
    assert not matmul.low_precision(a.astype(jnp.bfloat16), b)


DOT = re.compile(r"stablehlo\.dot_general %[\w#]+, %[\w#]+.*?: \(tensor<(?:\d+x)*(\w+)>, tensor<(?:\d+x)*(\w+)>\)")


def _dot_operand_types(cfg):
    from llmjax.bench import random_batch
    from llmjax.train.setup import build_setup

    setup = build_setup(cfg, jax.devices()[:1])
    state = jax.eval_shape(setup.init_state)
    batch = setup.put_batch(random_batch(cfg, cfg.train.batch_size, seed=0))
    text = setup.jit_train_step().lower(state, batch).as_text()
    return [m.groups() for m in DOT.finditer(text)]


@pytest.mark.parametrize("compute", ["bfloat16", "float32"])
def test_lowered_step_dots_are_in_the_compute_dtype(compute):
    """The jitted train step as lowered (before XLA's passes): with model.compute_dtype=bfloat16 every dot,
    forward and backward (q, k, v, o, MLP, attention scores and values, LM head), takes bfloat16 operands
    (before the fix the backward ones took float32); with float32 every dot is float32 x float32."""
    from tests.helpers import tiny_config

    cfg = tiny_config(f"model.compute_dtype={compute}", "model.attention=xla")
    types = _dot_operand_types(cfg)
    want = {"bfloat16": "bf16", "float32": "f32"}[compute]
    assert len(types) >= 3 * 7 * cfg.model.n_layers, types  # forward + 2 backward dots of 7 per layer at least
    assert all(t == (want, want) for t in types), sorted(set(types))
