"""int4 weights: group-wise bound, packing, GPTQ against round-to-nearest, and `--quant int4 | int4-gptq` end to end
on a tiny trained workdir (logits and loss close to float, bad group sizes refused before compiling)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from llmjax import cli
from llmjax.infer.gptq import gptq_matrix
from llmjax.infer.int4 import Int4Weight, grouped, pack, quantize_leaf, unpack
from llmjax.infer.quantize import QuantOptions, dequantize, nbytes, quantize, quantize_int4
from llmjax.train.setup import model_abstract_params


def test_pack_round_trip():
    pack_, unpack_ = (jax.jit(f, static_argnums=1) for f in (pack, unpack))
    codes = jnp.asarray(np.random.default_rng(0).integers(-8, 8, (4, 10, 6)), jnp.int32)
    for axis in (0, 1, 2):
        packed = pack_(codes, axis)
        assert packed.dtype == jnp.uint8 and packed.shape[axis] == codes.shape[axis] // 2
        np.testing.assert_array_equal(unpack_(packed, axis), codes)
    lo, hi = np.meshgrid(np.arange(-8, 8), np.arange(-8, 8))  # every pair of codes: every byte, once
    pairs = jnp.asarray(np.stack([lo.ravel(), hi.ravel()], 1).ravel(), jnp.int32)
    packed = pack_(pairs, 0)
    assert sorted(np.asarray(packed).tolist()) == list(range(256))
    np.testing.assert_array_equal(unpack_(packed, 0), pairs)
    with pytest.raises(ValueError, match="odd"):
        pack(codes[:3], 0)


def test_int4_is_within_half_a_scale_of_every_weight_and_a_seventh_of_float32():
    abstract = model_abstract_params(tiny_config().model)  # random weights of the tiny model's shapes (no init)
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32), abstract.shapes)
    logical = abstract.logical
    q = jax.jit(lambda p: quantize_int4(p, logical, 32))(params)
    back = jax.jit(dequantize)(q)
    int4 = [x for x in jax.tree.leaves(q, is_leaf=lambda x: isinstance(x, Int4Weight)) if isinstance(x, Int4Weight)]
    assert len(int4) == 9  # embedding, q, k, v, o, wi_0, wi_1, wo, lm_head: the leaves int8 quantizes
    assert q["layers"]["attn_norm"]["scale"].dtype == jnp.float32
    o = q["layers"]["attn"]["o"]["kernel"]  # [layers, heads, head_dim, embed]: 64 inputs in 2 groups of 32
    assert o.packed.shape == (2, 2, 16, 64) and o.scale.shape == (2, 2, 1, 64) and o.group_size == 32
    flat_w = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_q = jax.tree.leaves(q, is_leaf=lambda x: isinstance(x, Int4Weight))
    for (path, w), x, b in zip(flat_w, flat_q, jax.tree.leaves(back), strict=True):
        w, b = np.asarray(w), np.asarray(b)
        if not isinstance(x, Int4Weight):
            np.testing.assert_array_equal(b, w)
            continue
        err = grouped(np.abs(w - b), x.start, x.stop, 32)  # type: ignore[arg-type]
        assert np.all(err <= np.asarray(x.scale) / 2 * (1 + 1e-6)), jax.tree_util.keystr(path)
    int8 = jax.eval_shape(lambda p: quantize(p, logical), params)
    assert nbytes(q) < 0.16 * nbytes(params) and nbytes(q) < 0.6 * nbytes(int8)


def test_gptq_has_lower_output_error_than_round_to_nearest():
    """On correlated inputs (as activations are), GPTQ's compensated codes give a smaller ||XW - XW_q|| on the
    calibration data than rounding each weight to nearest on the same grid and group size."""
    rng = np.random.default_rng(0)
    n_in, n_out, T, g = 128, 64, 1024, 32
    X = rng.normal(size=(T, n_in)) @ (rng.normal(size=(n_in, n_in)) / np.sqrt(n_in)) + rng.normal(size=(1, n_in))
    W = rng.normal(size=(n_in, n_out)).astype(np.float32) * 0.05
    codes, scales = gptq_matrix(W, 2 * X.T @ X / T, g)
    assert codes.min() >= -7 and codes.max() <= 7 and scales.shape == (n_in // g, n_out)
    gptq = (codes.reshape(-1, g, n_out) * scales[:, None]).reshape(n_in, n_out)
    rtn = np.asarray(jax.jit(lambda w: dequantize({"w": quantize_leaf(w, (0,), g)})["w"])(W))
    e_gptq, e_rtn = np.linalg.norm(X @ (W - gptq)), np.linalg.norm(X @ (W - rtn))
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)  # measured 0.6x
    assert np.abs(W - gptq).max() < 4 * np.abs(W - rtn).max()  # the weights themselves stay close


# ----------------------------------------------------------------------------- end to end (tiny workdir)


def _llmjax(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    out = capsys.readouterr()
    return code, out.out, out.err


def test_int4_logits_stay_close_to_float(eval_run):
    from llmjax.infer.sampling import SamplingParams
    from llmjax.infer.workdir_model import Loaded

    workdir, _, _ = eval_run
    loaded = Loaded(workdir)
    prompts = [list(np.random.default_rng(0).integers(4, 500, n)) for n in (5, 12)]
    sp = SamplingParams(max_new_tokens=6)
    ref = loaded.engine().generate(prompts, sp, return_logits=True)
    for method in ("int4",):  # int4-gptq: its loss in test_cli_generate_and_eval_int4
        out = loaded.engine(QuantOptions(method, 32)).generate(prompts, sp, return_logits=True)
        for a, b in zip(ref, out, strict=True):
            n = min(len(a.tokens), len(b.tokens))
            A, B = (x[:n] - x[:n].mean(-1, keepdims=True) for x in (a.logits, b.logits))  # logits up to a shift
            rel = np.linalg.norm(B - A) / np.linalg.norm(A)
            P, Q = (np.exp(x - x.max(-1, keepdims=True)) for x in (A, B))
            tv = 0.5 * np.abs(P / P.sum(-1, keepdims=True) - Q / Q.sum(-1, keepdims=True)).sum(-1).max()
            # tolerances: 8% relative L2 error of the (centred) logits, 0.05 total variation of the next-token
            # distribution (measured on a 30-step tiny run: int4 2.5-2.8% and 0.011, int4-gptq 0.8-1.3% and
            # 0.004-0.011; int8 0.2% and 0.001)
            assert rel < 0.08 and tv < 0.05, (method, rel, tv)


@pytest.mark.slow
def test_cli_generate_and_eval_int4(eval_run, capsys):
    workdir, _, _ = eval_run
    code, out, err = _llmjax(capsys, "generate", "--workdir", workdir, "--prompt", "def main(", "--max-new-tokens",
                             4, "--quant", "int4", "--quant-group-size", 32)
    assert code == 0, err
    assert out.startswith("def main(")
    code, out, err = _llmjax(capsys, "eval", "--workdir", workdir, "--quant", "int8,int4,int4-gptq",
                             "--quant-group-size", 32, "--calib-sequences", 16, "--batches", 2)
    assert code == 0, err
    change = {m: float(re.search(rf"^{m} weights: .*; loss ([-+.\d]+), bits/byte", out, re.M).group(1))
              for m in ("int8", "int4", "int4-gptq")}
    saved = {m: float(re.search(rf"^{m} weights: .*?([\d.]+)% saved", out, re.M).group(1)) for m in change}
    assert saved["int4"] > saved["int8"] + 8 and saved["int4-gptq"] == saved["int4"], out
    for m, d in change.items():
        assert abs(d) < 0.05, (m, d, out)  # limit: 0.05 nats on this 10-step model (measured |change| < 0.01)
    assert "calibrating on 2 training batches (16 sequences)" in err


def test_bad_group_sizes_exit_2_before_compiling(eval_run, capsys):
    workdir, _, _ = eval_run
    cases = [
        (("eval", "--workdir", workdir, "--quant", "int4"),
         "--quant-group-size 128 does not divide the input width 64"),
        (("generate", "--workdir", workdir, "--prompt", "x", "--quant", "int4-gptq", "--quant-group-size", 48),
         "--quant-group-size 48 does not divide"),
        (("bench-generate", "--workdir", workdir, "--quant", "int4", "--quant-group-size", 0), "--quant-group-size"),
        (("eval", "--workdir", workdir, "--quant", "int4", "--quant-group-size", 7), "positive even"),
        (("eval", "--workdir", workdir, "--quant", "int5"), "--quant: unknown method 'int5'"),
        (("eval", "--workdir", workdir, "--quant", "int4-gptq", "--calib-sequences", 0), "--calib-sequences"),
    ]
    for argv, needle in cases:
        code, _, err = _llmjax(capsys, *argv)
        assert code == 2 and needle in err and "Traceback" not in err, (argv, err)


def test_int4_and_int8_under_a_tensor_sharded_inference_mesh(eval_run, tmp_path):
    """Inference shards a run's parameters over its `mesh.tensor` (`llmjax.infer.workdir_model.inference_mesh`:
    rows over `data`, heads over `tensor`; fsdp is not used at inference). With tensor=2 on the 8 devices
    (data=4), quantizing the sharded parameters (what `--quant int8|int4` runs) gives bitwise the codes and scales
    of quantizing them on one device, and the int4 model's evaluation sums on a batch under the mesh equal one
    device's (rtol 1e-5)."""
    import re
    import shutil

    from helpers import packed_batch

    from llmjax.infer.workdir_model import Loaded
    from llmjax.models.families import batch_from_dict
    from llmjax.train.step import make_eval_step

    workdir, _, _ = eval_run
    sharded = tmp_path / "run"
    shutil.copytree(workdir, sharded)
    text = (sharded / "config.yaml").read_text()
    mesh_block = re.search(r"^mesh:\n(?:  .*\n)+", text, re.M)
    assert mesh_block and "  tensor: 1\n" in mesh_block.group(0)
    text = text.replace(mesh_block.group(0), mesh_block.group(0).replace("  tensor: 1\n", "  tensor: 2\n"))
    (sharded / "config.yaml").write_text(text)
    loaded = Loaded(sharded)
    assert dict(loaded.mesh.shape)["tensor"] == 2 and dict(loaded.mesh.shape)["data"] == 4
    q_kernel = loaded.params["layers"]["attn"]["q"]["kernel"]  # [layers, embed, heads, head_dim]: heads split
    assert "tensor" in jax.tree.leaves(tuple(q_kernel.sharding.spec)), q_kernel.sharding.spec
    assert q_kernel.addressable_shards[0].data.shape[2] == q_kernel.shape[2] // 2

    one = jax.devices()[0]
    host = jax.device_put(jax.device_get(loaded.params), one)
    logical, family = loaded.abstract.logical, loaded.family
    arrays = packed_batch(loaded.cfg, seed=3, rows=8)
    step = make_eval_step(family, family.module())
    ref_eval = jax.jit(lambda p, b: step(dequantize(p), b))
    for method, quant in (("int8", lambda p: quantize(p, logical)),
                          ("int4", lambda p: quantize_int4(p, logical, 32))):
        got = loaded.quantized(QuantOptions(method, 32))  # the sharded path of --quant
        want = jax.jit(quant)(host)
        got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
        assert len(got_leaves) == len(want_leaves) and jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(got_leaves, want_leaves, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=method)
        if method == "int8":  # int8's sharded evaluation is the same step as int4's (dequantize, then the model)
            continue
        sums = loaded.eval_step(got, lambda p: dequantize(p))(arrays)
        ref = ref_eval(want, batch_from_dict(family.batch_type, {k: jax.device_put(v, one) for k, v in arrays.items()}))
        assert float(sums["weight_sum"]) == float(ref["weight_sum"]) == 8 * loaded.cfg.data.seq_len
        np.testing.assert_allclose(float(sums["nll_sum"]), float(ref["nll_sum"]), rtol=1e-5, err_msg=method)
