"""Inference: KV-cache decoding equals the full forward pass; sampling rules; beam search;
batched equals one-by-one; int8 weights; sharded cache; `llmjax generate | eval` end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config, tiny_train_overrides

from llmjax.config import ConfigError
from llmjax.infer.beam_search import beam_search
from llmjax.infer.engine import Engine
from llmjax.infer.quantize import dequantize, nbytes, quantize
from llmjax.infer.sampling import SamplingParams, candidates, sample
from llmjax.models.transformer import Transformer
from llmjax.parallel.mesh import build_mesh
from llmjax.parallel.rules import make_rules
from llmjax.train.setup import model_abstract_params

ROOT = Path(__file__).resolve().parents[2]


def make_params(cfg, scale=8.0):
    """Random params with larger matrices than at init, so the logits are far from uniform."""
    model = Transformer(cfg.model)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))["params"])
    return model, jax.tree.map(lambda p: p * scale if p.ndim > 1 else p, params)


PROMPTS = [list(np.random.default_rng(0).integers(4, 128, n)) for n in (3, 11, 6)]


@pytest.fixture(scope="module", params=["scan", pytest.param("unrolled", marks=pytest.mark.slow)])  # 13-19 s a test
def setup(request):
    cfg = tiny_config(f"model.scan_layers={'true' if request.param == 'scan' else 'false'}")
    model, params = make_params(cfg)
    return cfg, model, params, Engine(cfg.model, params)


def test_cached_logits_equal_full_forward_at_every_step(setup):
    cfg, model, params, engine = setup
    sp = SamplingParams(max_new_tokens=12)
    batched = engine.generate(PROMPTS, sp, return_logits=True)
    for p, g in zip(PROMPTS, batched, strict=True):
        assert len(g.tokens) == 12
        full = model.apply({"params": params}, jnp.asarray([p + g.tokens], jnp.int32))[0]
        ref = np.asarray(full[len(p) - 1: len(p) - 1 + len(g.tokens)])
        np.testing.assert_allclose(g.logits, ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())


class _Chars:
    """A stand-in tokenizer: token t is the character chr(97 + t % 26)."""

    def decode(self, ids):
        return "".join(chr(97 + int(t) % 26) for t in ids)


def test_device_loop_equals_host_loop(setup):
    """The on-device while_loop decodes exactly what the host loop of jitted steps decodes: greedy and
    sampled, rows stopping at EOS at different steps, stop strings cut the same tokens and text."""
    _, _, _, engine = setup
    free = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10), device_loop=False)
    eos = free[1].tokens[3]
    tok = _Chars()
    stop = tok.decode(free[2].tokens[4:6])
    for sp in (SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9,
                                                                 seed=5),
               SamplingParams(max_new_tokens=10, stop=(stop,))):
        for eos_id in (None, eos):
            dev = engine.generate(PROMPTS, sp, eos_id, tokenizer=tok, device_loop=True)
            host = engine.generate(PROMPTS, sp, eos_id, tokenizer=tok, device_loop=False)
            assert [(g.tokens, g.text, g.finish) for g in dev] == [(g.tokens, g.text, g.finish) for g in host]
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=10), eos, device_loop=True)
    assert out[1].finish == "eos" and out[1].tokens == free[1].tokens[:3]


def test_batched_equals_one_by_one(setup):
    _, _, _, engine = setup
    for sp in (SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=8, temperature=1.0, top_k=8, seed=3)):
        batched = engine.generate(PROMPTS, sp)
        assert [g.tokens for g in batched] == [engine.generate([p], sp)[0].tokens for p in PROMPTS]


def test_top_k_and_top_p_stay_inside_their_sets():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 50)) * 3, jnp.float32)
    order = np.argsort(-np.asarray(logits), axis=-1)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    keys = [jax.random.PRNGKey(i) for i in range(200)]
    draws_k = np.stack([np.asarray(sample(logits, k, 1.0, top_k=5)) for k in keys])
    draws_p = np.stack([np.asarray(sample(logits, k, 1.0, top_p=0.6)) for k in keys])
    for b in range(4):
        assert set(draws_k[:, b]) <= set(order[b, :5])
        assert len(set(draws_k[:, b])) > 1
        cum = np.cumsum(probs[b, order[b]])
        nucleus = set(order[b, : int(np.searchsorted(cum, 0.6) + 1)])  # smallest prefix with mass >= 0.6
        assert set(draws_p[:, b]) <= nucleus
    vals, ids = candidates(logits, 1.0, top_k=5, top_p=0.6)
    assert vals.shape == (4, 5) and np.isfinite(np.asarray(vals)[:, 0]).all()


@pytest.mark.slow
def test_temperature_to_zero_is_greedy_and_seed_reproduces(setup):
    _, _, _, engine = setup
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8))
    cold = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1e-5, seed=7))
    assert [g.tokens for g in cold] == [g.tokens for g in greedy]
    sp = SamplingParams(max_new_tokens=8, temperature=1.5, top_p=0.95, seed=11)
    a, b = engine.generate(PROMPTS, sp), engine.generate(PROMPTS, sp)
    other = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.5, top_p=0.95, seed=12))
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in other]


@pytest.mark.slow
def test_one_beam_is_greedy_and_more_beams_score_at_least_as_well(setup):
    _, model, params, engine = setup
    sp = SamplingParams(max_new_tokens=8)
    greedy = engine.generate(PROMPTS[:1], sp)[0]
    one = beam_search(engine, PROMPTS[0], SamplingParams(max_new_tokens=8, beams=1), None, None, None, 0)
    assert one.tokens == greedy.tokens
    four = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=8, beams=4))[0]
    assert len(four.tokens) == 8 and four.score >= one.score - 1e-4

    def score(tokens):  # summed log-probability under a full forward pass
        seq = PROMPTS[0] + tokens
        logp = jax.nn.log_softmax(model.apply({"params": params}, jnp.asarray([seq], jnp.int32))[0], axis=-1)
        return float(sum(logp[len(PROMPTS[0]) - 1 + i, t] for i, t in enumerate(tokens)))

    assert score(four.tokens) == pytest.approx(four.score, abs=1e-3)


def test_beams_and_prompts_are_checked_against_the_cache_memory_they_imply(setup, monkeypatch):
    """--beams 100000 grew to 21.8 GB and was OOM-killed: now refused from shapes alone, naming the value and
    the bound ($LLMJAX_MEMORY_LIMIT, else the devices' memory: the RAM for CPU devices)."""
    cfg, _, _, engine = setup
    prompt = [PROMPTS[0]]
    monkeypatch.delenv("LLMJAX_MEMORY_LIMIT", raising=False)
    with pytest.raises(ConfigError, match=r"^--beams 100000000 \(--max-new-tokens 8\): generating needs about .* GiB "
                                          r"\(a KV cache of .* for 100,000,000 row\(s\) of 64 slots.*RAM"):
        engine.generate(prompt, SamplingParams(max_new_tokens=8, beams=10**8))
    monkeypatch.setenv("LLMJAX_MEMORY_LIMIT", "64MiB")
    with pytest.raises(ConfigError, match=r"^--beams 100000 .*more than LLMJAX_MEMORY_LIMIT=64MiB \(0.0625 GiB"):
        engine.generate(prompt, SamplingParams(max_new_tokens=8, beams=100_000))
    with pytest.raises(ConfigError, match=r"^200,000 prompt\(s\) with --max-new-tokens 10000000000: .*a KV cache"):
        engine.generate(prompt * 200_000, SamplingParams(max_new_tokens=10**10))
    cache, need = engine.memory_needed(3, 11, 64)
    shapes = jax.eval_shape(lambda: engine.new_cache(3, 64, 16))
    assert cache == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes)) and need > 2 * cache
    engine.check_memory(2, 11, 64, "--beams 2")  # what the beam search test runs fits


def test_eos_stops_a_row():
    cfg = tiny_config()
    _, params = make_params(cfg)
    engine = Engine(cfg.model, params)
    free = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6))
    eos = free[1].tokens[2]  # make row 1's third token the EOS
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6), eos_id=eos)
    assert out[1].tokens == free[1].tokens[:2] and out[1].finish == "eos"


def test_invalid_sampling_values_and_prompts():
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0), dict(top_p=1.5), dict(beams=0),
                dict(max_new_tokens=0), dict(beams=2, temperature=0.7)):
        with pytest.raises(ConfigError):
            SamplingParams(**bad).validate()
    cfg = tiny_config()
    engine = Engine(cfg.model, make_params(cfg)[1])
    with pytest.raises(ConfigError, match="empty"):
        engine.check_prompts([[]])
    with pytest.raises(ConfigError, match="context"):
        engine.check_prompts([[5] * cfg.model.max_seq_len])


@pytest.mark.slow
def test_int8_weights():
    cfg = tiny_config()
    model, params = make_params(cfg, scale=1.0)
    q = quantize(params, model_abstract_params(cfg.model).logical)
    assert q["layers"]["attn"]["o"]["kernel"]["int8"].dtype == jnp.int8
    assert q["layers"]["attn"]["o"]["kernel"]["scale"].shape == (2, 1, 1, 64)  # per layer, per output channel
    assert q["layers"]["attn_norm"]["scale"].dtype == jnp.float32  # norms stay float
    assert nbytes(q) < 0.3 * nbytes(params)
    back = dequantize(q)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True):
        np.testing.assert_allclose(b, a, atol=float(jnp.abs(a).max()) / 127 + 1e-7)
    toks = jnp.asarray(np.random.default_rng(0).integers(4, 128, (2, 32)), jnp.int32)

    def loss(p):
        logp = jax.nn.log_softmax(model.apply({"params": p}, toks[:, :-1]), axis=-1)
        return -float(jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1).mean())

    assert abs(loss(back) - loss(params)) < 0.01 * loss(params)


def test_sharded_cache_matches_single_device():
    cfg = tiny_config()
    model, params = make_params(cfg)
    ref = Engine(cfg.model, params).generate(PROMPTS, SamplingParams(max_new_tokens=5), return_logits=True)
    mesh_cfg = tiny_config("mesh.data=2", "mesh.tensor=2").mesh
    mesh = build_mesh(mesh_cfg, jax.devices()[:4])
    rules = make_rules(mesh_cfg.rules, dict(mesh.shape), cfg.model.n_kv_heads)
    engine = Engine(cfg.model, params, mesh, rules)
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5), return_logits=True)
    assert engine.batch_multiple == 2
    _, cache, _ = engine.prefill(PROMPTS, 64)
    k = cache["layers"]["k"]
    assert k.sharding.spec[1] == "data" and k.sharding.spec[3] == "tensor"
    for a, b in zip(ref, out, strict=True):
        assert a.tokens == b.tokens
        np.testing.assert_allclose(b.logits, a.logits, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- CLI


def llmjax(*args):
    return subprocess.run([sys.executable, "-m", "llmjax.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    workdir = tmp_path_factory.mktemp("run")
    r = llmjax("train", "--workdir", workdir, *tiny_train_overrides(corpus), "train.steps=10",
               "eval.every_steps=0", "sample.max_new_tokens=0")
    assert r.returncode == 0, r.stderr
    return workdir


@pytest.mark.slow
def test_cli_generate_and_eval(trained, tmp_path):
    r = llmjax("generate", "--workdir", trained, "--prompt", "def main(", "--max-new-tokens", 8)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def main(") and "restored step 10" in r.stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\n\nclass A:\n")
    r = llmjax("generate", "--workdir", trained, "--prompt-file", prompts, "--temperature", 0.8, "--top-k", 20,
               "--top-p", 0.9, "--seed", 1, "--max-new-tokens", 6)
    assert r.returncode == 0, r.stderr
    assert "=== 1 ===\nimport os" in r.stdout and "=== 2 ===\nclass A:" in r.stdout
    r = llmjax("eval", "--workdir", trained, "--int8")
    assert r.returncode == 0, r.stderr
    for word in ("perplexity", "bits/byte", "int8 weights", "saved"):
        assert word in r.stdout


@pytest.mark.slow
def test_cli_bad_input_exits_2(trained, tmp_path):
    cases = [
        (("generate", "--workdir", tmp_path, "--prompt", "x"), "config.yaml"),
        (("eval", "--workdir", tmp_path / "missing"), "not a directory"),
        (("generate", "--workdir", trained, "--prompt", ""), "empty"),
        (("generate", "--workdir", trained), "give a prompt"),
        (("generate", "--workdir", trained, "--prompt", "x", "--top-p", "1.5"), "--top-p"),
        (("generate", "--workdir", trained, "--prompt", "x", "--temperature", "-1"), "--temperature"),
        (("generate", "--workdir", trained, "--prompt", " ".join(map(str, range(300)))), "context"),
        (("generate", "--workdir", trained, "--prompt", "x", "--beams", "100000000"), "--beams 100000000"),
        (("bench-generate", "--workdir", trained, "--batch", "100000000", "--prompt-len", "8", "--new-tokens", "8"),
         "--batch 100000000"),
    ]
    (tmp_path / "config.yaml").write_text((trained / "config.yaml").read_text())
    cases[0] = (cases[0][0], "no checkpoint")
    for args, message in cases:
        r = llmjax(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
