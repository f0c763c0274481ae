"""Float8 matmuls (`model.matmul_dtype=fp8`, llmjax.kernels.fp8) on CPU, where XLA emulates them.

- quantize / dequantize: the e4m3 and e5m2 rounding bounds at any magnitude, saturation, zeros;
- fp8_matmul / fp8_ragged_dot: forward and gradients equal the products of the dequantized
  float8 operands (e4m3 forward, e5m2 output gradient), to float32 rounding;
- a whole small model (dense; capacity MoE in the slow set): loss and gradients within the
  stated tolerance of float32 (TOLERANCES below), and its lowered step has exactly the expected
  float8 dots (embedding, LM head, attention scores and router stay float32);
- the config key and the backend check (ConfigError naming `model.matmul_dtype`).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import LAYOUTS, RTOL, assert_trees_close, family_loss, packed_batch, tiny_config

from llmjax.config import ConfigError, MoEConfig
from llmjax.kernels import fp8
from llmjax.kernels.fp8 import E4M3, E5M2, dequantize, fp8_matmul, fp8_ragged_dot
from llmjax.kernels.fp8 import quantize as _quantize
from llmjax.models.transformer import Transformer
from llmjax.train.setup import build_setup

# Float8 vs float32 on the tiny model (d_model 64, 2 layers, its init, 8 x 32 packed tokens): the stated tolerances.
# Measured: loss within 4e-5 (relative), gradient norm within 0.3 %, smallest per-parameter gradient cosine
# 0.994 (dense), 0.991 (capacity MoE), 0.981 (dense + dropless MoE, measured once, not a case: slow on CPU).
TOLERANCES = {"loss_rel": 1e-3, "grad_norm_rel": 0.02, "grad_cosine": 0.97}
# Relative rounding error of a normal float8 number: half a unit in the last place, 2^-(mantissa bits + 1).
REL = {E4M3: 2.0 ** -4, E5M2: 2.0 ** -3}
quantize = jax.jit(_quantize, static_argnums=1)  # one compile per shape, not one per eager op


@pytest.mark.parametrize("qdtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("magnitude", [1e-30, 1.0, 1e30])
def test_round_trip_within_the_format_bound_at_any_magnitude(qdtype, magnitude):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 48)) * magnitude, jnp.float32)
    q, scale = quantize(x, qdtype)
    assert q.dtype == qdtype and scale.shape == ()
    fmax = float(jnp.finfo(qdtype).max)
    np.testing.assert_allclose(float(jnp.max(jnp.abs(q.astype(jnp.float32)))), fmax)  # amax -> the largest value
    back = dequantize(q, scale)
    # normal float8 numbers: relative bound; below the smallest normal, the subnormal spacing (absolute)
    tiny = float(jnp.finfo(qdtype).smallest_normal) * float(scale)
    err = np.abs(np.asarray(back - x))
    assert np.all(err <= REL[qdtype] * np.abs(np.asarray(x)) + tiny), float(np.max(err / np.abs(np.asarray(x))))


def test_saturation_zeros_and_exact_values():
    assert bool(jnp.isnan(jnp.float32(1000.0).astype(E4M3)))  # e4m3fn overflows to NaN: clipping is needed
    x = jnp.asarray([448.0, -448.0, 1.0, 0.5, 0.0], jnp.float32)  # amax 448: scale 1, every value exact
    q, scale = quantize(x, E4M3)
    assert float(scale) == 1.0
    np.testing.assert_array_equal(np.asarray(dequantize(q, scale)), np.asarray(x))
    spread = jnp.asarray([3e38, -3e38, 1.0, -2.5], jnp.float32)  # an outlier: the rest flush, nothing overflows
    q, scale = quantize(spread, E4M3)
    assert np.all(np.isfinite(np.asarray(q.astype(jnp.float32))))
    np.testing.assert_allclose(np.asarray(dequantize(q, scale))[:2], [3e38, -3e38], rtol=2.0 ** -4)
    q, scale = quantize(jnp.zeros((4, 4)), E5M2)  # all zeros: scale 1, zeros, and zero gradients
    assert float(scale) == 1.0 and not np.any(np.asarray(q.astype(jnp.float32)))
    gx, gw = jax.grad(lambda a, b: jnp.sum(fp8_matmul(a, b)), argnums=(0, 1))(jnp.zeros((4, 8)), jnp.ones((8, 2)))
    np.testing.assert_allclose(np.asarray(gx), 2.0, rtol=1e-6)  # ones [4, 2] @ ones [2, 8]
    assert not np.any(np.asarray(gw))


def qdq(x, qdtype):
    return dequantize(*quantize(x, qdtype))


@pytest.mark.parametrize("batch", [(), (3,)], ids=["2d", "batched"])
def test_fp8_matmul_is_the_product_of_the_float8_operands(batch):
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (*batch, 16, 32), jnp.bfloat16)
    w = 0.1 * jax.random.normal(k[1], (*batch, 32, 8), jnp.float32)
    g = 1e-3 * jax.random.normal(k[2], (*batch, 16, 8), jnp.float32)
    y, vjp = jax.vjp(fp8_matmul, x, w)
    assert y.dtype == jnp.float32
    xd, wd, gd = qdq(x, E4M3), qdq(w, E4M3), qdq(g, E5M2)
    mm = lambda a, b: jnp.matmul(a, b, precision="highest")  # noqa: E731
    np.testing.assert_allclose(np.asarray(y), np.asarray(mm(xd, wd)), rtol=1e-5, atol=1e-6)
    dx, dw = vjp(g)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(mm(gd, jnp.swapaxes(wd, -1, -2))),
                               rtol=1e-2, atol=1e-6)  # dx is rounded to bfloat16
    np.testing.assert_allclose(np.asarray(dw), np.asarray(mm(jnp.swapaxes(xd, -1, -2), gd)), rtol=1e-5, atol=1e-9)


def test_fp8_ragged_dot_is_the_grouped_product_of_the_float8_operands():
    k = jax.random.split(jax.random.key(1), 3)
    x, w = jax.random.normal(k[0], (24, 16)), jax.random.normal(k[1], (3, 16, 8))
    g = jax.random.normal(k[2], (24, 8))
    sizes = jnp.asarray([5, 0, 15], jnp.int32)  # an empty group; rows 20-23 belong to none
    y, vjp = jax.vjp(lambda a, b: fp8_ragged_dot(a, b, sizes), x, w)
    xd, wd, gd = qdq(x, E4M3), qdq(w, E4M3), qdq(g, E5M2)
    group = np.repeat(np.arange(4), [5, 0, 15, 4])  # group 3: past the groups
    want_y = np.zeros((24, 8), np.float32)
    want_dx = np.zeros((24, 16), np.float32)
    want_dw = np.zeros((3, 16, 8), np.float32)
    for r in range(20):
        want_y[r] = np.asarray(xd)[r] @ np.asarray(wd)[group[r]]
        want_dx[r] = np.asarray(gd)[r] @ np.asarray(wd)[group[r]].T
        want_dw[group[r]] += np.outer(np.asarray(xd)[r], np.asarray(gd)[r])
    dx, dw = vjp(g)
    for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


MODELS = {  # dropless MoE: its step is lowered in the next test and its grouped matmul unit-tested above
    "dense": {},
    "capacity_moe": pytest.param({"moe": MoEConfig(num_experts=4, top_k=2, capacity_factor=2.0)},
                                 marks=pytest.mark.slow),
}


def loss_and_grads(model_cfg, params, batch):
    model = Transformer(model_cfg)
    return jax.jit(jax.value_and_grad(lambda p: family_loss(model, p, batch)[0]))(params)


@pytest.mark.parametrize("changes", list(MODELS.values()), ids=list(MODELS))
def test_small_model_in_fp8_is_within_tolerance_of_float32(changes):
    cfg = tiny_config()
    m32 = dataclasses.replace(cfg.model, **changes)
    m8 = dataclasses.replace(m32, matmul_dtype="fp8")
    batch = packed_batch(cfg)
    params = Transformer(m32).init(jax.random.PRNGKey(0), jnp.asarray(batch["inputs"]))["params"]
    params = jax.tree.map(lambda b: getattr(b, "value", b), params, is_leaf=lambda b: hasattr(b, "value"))
    (l32, g32), (l8, g8) = loss_and_grads(m32, params, batch), loss_and_grads(m8, params, batch)
    assert abs(float(l8) - float(l32)) <= TOLERANCES["loss_rel"] * abs(float(l32))
    n32, n8 = float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(g32)))), \
        float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(g8))))
    assert abs(n8 - n32) <= TOLERANCES["grad_norm_rel"] * n32
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g32), jax.tree.leaves(g8), strict=True):
        a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
        if np.linalg.norm(a) == 0:
            continue
        cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert cos >= TOLERANCES["grad_cosine"], (jax.tree_util.keystr(path), cos)
    assert float(l8) != float(l32)  # the float8 path really ran


def dot_operand_types(hlo: str) -> list[str]:
    """The operand element types of every dot_general in StableHLO text, e.g. 'f8E4M3FN,f8E4M3FN'."""
    found = re.findall(r"stablehlo\.dot_general .*?: \(tensor<(?:\d+x)*(\w+)>, tensor<(?:\d+x)*(\w+)>\)", hlo)
    return [",".join(t) for t in found]


def test_only_the_dense_and_expert_matmuls_are_float8():
    """The lowered gradient of a 2-layer model with a dense MLP in layer 1 and dropless MoE in layer 2: 4 attention
    projections per layer, the 3 MLP and the 3 grouped expert matmuls (lowered to dots on CPU) in e4m3 forward and
    twice that e5m2 x e4m3 backward; everything else (attention scores, LM head, router) in float32."""
    cfg = tiny_config()
    m8 = dataclasses.replace(cfg.model, matmul_dtype="fp8", moe=MoEConfig(num_experts=4, top_k=2, every=2))
    batch = packed_batch(cfg)
    model = Transformer(m8)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.asarray(batch["inputs"]))["params"]
    params = jax.tree.map(lambda b: getattr(b, "value", b), params, is_leaf=lambda b: hasattr(b, "value"))
    hlo = jax.jit(jax.grad(lambda p: family_loss(model, p, batch)[0])).lower(params).as_text()
    types = dot_operand_types(hlo)
    fwd = types.count("f8E4M3FN,f8E4M3FN")
    bwd = sum(t in ("f8E5M2,f8E4M3FN", "f8E4M3FN,f8E5M2") for t in types)
    n = 4 * 2 + 3 + 3
    assert (fwd, bwd) == (n, 2 * n), types
    others = [t for t in types if "f8" not in t]
    assert others and all(t == "f32,f32" for t in others), types
    # the LM head [D, V] = [64, 128] and the router [D, X] = [64, 4] are among the float32 dots
    assert re.search(r"tensor<64x128xf32>\) -> tensor<256x128xf32>", hlo)
    assert re.search(r"tensor<64x4xf32>\) -> tensor<256x4xf32>", hlo)


def test_config_key_and_backend_check(monkeypatch):
    assert tiny_config("model.matmul_dtype=fp8").model.matmul_dtype == "fp8"
    with pytest.raises(ConfigError, match="model.matmul_dtype"):
        tiny_config("model.matmul_dtype=int8")
    fp8.check_backend(jax.devices())  # CPUs compile float8 (emulated)

    def unsupported(*_args):
        raise RuntimeError("UNIMPLEMENTED: F8E4M3FN dot is not supported on this backend")

    monkeypatch.setattr(fp8, "fp8_matmul", unsupported)
    with pytest.raises(ConfigError, match=r"model\.matmul_dtype=fp8: the cpu backend .*F8E4M3FN dot is not supported"):
        fp8.check_backend(jax.devices())


@pytest.mark.slow
def test_h100_deviceless_compile_emits_float8_dots():
    """With jax's CUDA plugin installed (no GPU needed): the gradient of fp8_matmul compiled for an H100 has
    e4m3 x e4m3 (forward) and e5m2 x e4m3 / e4m3 x e5m2 (backward) dots. benchmarks/fp8_hlo.py does the same
    for the whole train step."""
    from llmjax.planner.gpu import cuda_plugin_installed, gpu_devices

    if not cuda_plugin_installed():
        pytest.skip("jax's CUDA plugin is not installed (pip install 'llmjax[gpu-compile]')")
    from jax.sharding import SingleDeviceSharding

    _, devices = gpu_devices("h100-1", "h100", 1)
    s = SingleDeviceSharding(devices[0])
    x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16, sharding=s)
    w = jax.ShapeDtypeStruct((512, 1024), jnp.float32, sharding=s)
    step = jax.value_and_grad(lambda a, b: jnp.sum(fp8_matmul(a, b) ** 2), argnums=(0, 1))
    hlo = jax.jit(step).lower(x, w).compile().as_text()
    types = dict(re.findall(r"%([\w.-]+) = (\w+)\[", hlo))
    dots = {(types.get(a), types.get(b)) for a, b in re.findall(r" dot\(%([\w.-]+), %([\w.-]+)", hlo)}
    assert {("f8e4m3fn", "f8e4m3fn"), ("f8e5m2", "f8e4m3fn"), ("f8e4m3fn", "f8e5m2")} <= dots, dots


# ----------------------------------------------------------------------------- fp8 under mesh layouts

# A per-tensor scale is the global amax under GSPMD (module docstring of llmjax.kernels.fp8), so a sharded step
# quantizes with the same scales as one device. With fsdp alone every row's activations are computed as on one
# device, so only the batch reductions of the gradients change order: the single-device tolerance holds. With
# tensor parallelism the attention and MLP outputs are partial sums over the tensor axis, so activations differ
# in their last float32 bits, and an operand that sits on a float8 rounding boundary can round the other way
# (one e4m3 step is 6-12 % of the value, an e5m2 step 12-25 %): a few gradient entries move by such a step.
# Measured (tiny model, 8 x 32 packed tokens): loss within 3e-7 (relative) in both layouts; gradients
# {fsdp=4} within 5e-7 of each tensor's largest entry; {data=2, fsdp=2, tensor=2} within 3e-3 of it, with the
# relative L2 error of every tensor at most FP8_TP_GRAD_L2 below.
FP8_LAYOUTS = {"fsdp4": (("mesh.data=1", "mesh.fsdp=4"), 4), "data2_fsdp2_tensor2": (LAYOUTS["data2_fsdp2_tensor2"], 8)}
FP8_TP_GRAD_ATOL, FP8_TP_GRAD_L2 = 1e-2, 2e-3


def fp8_gradients(cfg, devices):
    """(loss, gradients) of the train step's gradient function (jit_gradients) at init, on `devices`."""
    setup = build_setup(cfg, devices)
    state = setup.init_state()
    grads, metrics = setup.jit_gradients()(state.params, setup.put_batch(packed_batch(cfg, seed=0)))
    return float(metrics["loss"]), jax.device_get(grads)


@pytest.fixture(scope="module")
def fp8_reference():
    return fp8_gradients(tiny_config("model.matmul_dtype=fp8"), jax.devices()[:1])


# the quick run (-m "not slow") keeps the three-axis layout; fsdp alone is in the slow set
FP8_CASES = [pytest.param(k, marks=pytest.mark.slow) if k == "fsdp4" else k for k in FP8_LAYOUTS]


@pytest.mark.parametrize("layout", FP8_CASES)
def test_fp8_step_under_mesh_layouts_equals_one_device(layout, fp8_reference):
    overrides, n = FP8_LAYOUTS[layout]
    loss, grads = fp8_gradients(tiny_config("model.matmul_dtype=fp8", *overrides), jax.devices()[:n])
    ref_loss, ref_grads = fp8_reference
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
    if "tensor" not in layout:
        assert_trees_close(grads, ref_grads)  # the single-device tolerance (rtol 1e-5, atol 1e-6 x largest entry)
        return
    assert_trees_close(grads, ref_grads, rtol=0.0, atol=FP8_TP_GRAD_ATOL)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads), strict=True):
        rel = float(np.linalg.norm(np.asarray(a) - b) / (np.linalg.norm(b) or 1.0))
        assert rel <= FP8_TP_GRAD_L2, (jax.tree_util.keystr(path), rel)
