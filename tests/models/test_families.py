"""Model families beyond the decoder: BERT-style encoder (masked LM) and T5-style encoder-decoder
(span corruption), each against hand-written references, on meshes against one device, and decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from llmjax.config import ConfigError, validate
from llmjax.data.stream.row_objectives import MaskedLM, SpanCorruption, corrupted_lengths, number_documents, uncorrupt
from llmjax.models.families import build_family
from llmjax.train.setup import build_setup

ENCODER = ("model.family=encoder", "model.position=learned")
ENC_DEC = ("model.family=encoder_decoder", "model.n_encoder_layers=3", "model.sentinels=16", "data.seq_len=32")


class Tok:
    """A stand-in tokenizer for objectives: 100 ids, EOS 3."""

    vocab_size, eos_id = 100, 3


# ----------------------------------------------------------------------------- objectives


def test_masked_lm_statistics_match_the_recipe():
    obj = MaskedLM(0.15, 0.8, 0.1, mask_id=127, eos_id=3, vocab=100, first_id=4)
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 100, 200_000).astype(np.int32)
    tokens[::50] = 3  # EOS is never selected
    ex = obj(number_documents(tokens, 3), np.random.default_rng(1))
    sel = ex["weights"] > 0
    assert not sel[tokens == 3].any()
    assert abs(sel.mean() / (tokens != 3).mean() - 0.15) < 0.005
    masked = ex["inputs"][sel] == 127
    kept = ex["inputs"][sel] == tokens[sel]
    assert abs(masked.mean() - 0.8) < 0.01
    assert abs(kept.mean() - (0.1 + 0.1 / 96)) < 0.01  # a random replacement is the same token 1/96 of the time
    assert (ex["inputs"][~sel] == tokens[~sel]).all() and (ex["targets"] == tokens).all()
    randoms = ex["inputs"][sel & (ex["inputs"] != 127) & (ex["inputs"] != tokens)]
    assert randoms.min() >= 4 and randoms.max() < 100


@pytest.mark.parametrize("n", [20, 63, 100, 511])
def test_span_corruption_round_trips(n):
    sentinels = [199 - i for i in range(60)]
    obj = SpanCorruption(0.15, 3.0, sentinels, start_id=200, eos_id=3)
    rng = np.random.default_rng(n)
    for seed in range(5):
        tokens = rng.integers(0, 130, n).astype(np.int32)  # below the sentinels; EOS (3) appears inside too
        ex = obj(number_documents(tokens, 3), np.random.default_rng(seed))
        enc, tgt = ex["encoder_inputs"], ex["decoder_targets"]
        assert (len(enc), len(tgt)) == corrupted_lengths(n, 0.15, 3.0)
        np.testing.assert_array_equal(uncorrupt(enc, tgt, sentinels), tokens)
        assert ex["decoder_inputs"][0] == 200 and (ex["decoder_inputs"][1:] == tgt[:-1]).all()
        assert enc[-1] == 3 and tgt[-1] == 3
    noise = corrupted_lengths(n, 0.15, 3.0)[1] - 1 - max(1, round(round(0.15 * n) / 3))
    assert noise == max(1, round(0.15 * n))


def test_span_corruption_raw_length_fills_the_encoder():
    obj = SpanCorruption(0.15, 3.0, list(range(100)), 0, 3)
    for seq_len in (16, 32, 512):
        n = obj.raw_length(seq_len)
        assert corrupted_lengths(n, 0.15, 3.0)[0] <= seq_len < corrupted_lengths(n + 1, 0.15, 3.0)[0]
    assert obj.raw_length(512) == 568 and obj.target_length(512) == 114  # T5's 568 -> 512 inputs, 114 targets


# ----------------------------------------------------------------------------- losses


def _params(setup):
    return setup.init_state().params


def test_mlm_loss_equals_hand_written_reference():
    cfg = tiny_config(*ENCODER)
    setup = build_setup(cfg, jax.devices()[:1])
    params = _params(setup)
    fam = setup.family
    rows = [number_documents(np.random.default_rng(i).integers(4, 120, 32).astype(np.int32), 3) for i in range(8)]
    obj = fam.objective(32, Tok)
    exs = [obj(r, np.random.default_rng(i)) for i, r in enumerate(rows)]
    batch = {k: np.stack([e[k] for e in exs]) for k in exs[0]}
    _, metrics = setup.jit_gradients()(params, setup.put_batch(batch))
    logits = np.asarray(setup.model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                                          batch["positions"]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    w = batch["weights"]
    np.testing.assert_allclose(float(metrics["loss"]), (nll * w).sum() / w.sum(), rtol=1e-5)
    # bidirectional: the first token's logits change when the last token changes
    other = batch["inputs"].copy()
    other[:, -1] = (other[:, -1] + 1) % 100
    moved = setup.model.apply({"params": params}, other, batch["segment_ids"], batch["positions"])
    assert not np.allclose(np.asarray(moved)[:, 0], logits[:, 0], atol=1e-6)


def test_family_keys_are_validated():
    for override, key in [("model.mask_prob=1.5", "model.mask_prob"), ("model.mask_prob=0", "model.mask_prob"),
                          ("model.mask_token_prob=0.95", "model.random_token_prob")]:
        with pytest.raises(ConfigError, match=key):
            validate(tiny_config(*ENCODER, override), 1)
    for override, key in [("model.noise_density=0", "model.noise_density"),
                          ("model.mean_span_length=0.5", "model.mean_span_length"),
                          ("model.n_encoder_layers=-1", "model.n_encoder_layers")]:
        with pytest.raises(ConfigError, match=key):
            validate(tiny_config(*ENC_DEC, override), 1)
    with pytest.raises(ConfigError, match="model.mask_prob"):  # a key of another family
        tiny_config("model.mask_prob=0.2")
    with pytest.raises(ConfigError, match="model.family"):
        tiny_config("model.family=rnn")
    with pytest.raises(ConfigError, match="mesh.pipeline"):
        validate(tiny_config(*ENC_DEC, "mesh.pipeline=2", "mesh.data=4"), 8)
    with pytest.raises(ConfigError, match="model.sentinels"):  # more spans per row (2) than sentinels
        validate(tiny_config(*ENC_DEC, "model.sentinels=1"), 1)
    validate(tiny_config(*ENC_DEC, "model.sentinels=2"), 1)
    # span corruption reads a row as one sequence: best-fit rows' padding would be corrupted with the text
    with pytest.raises(ConfigError, match="data.packing=best_fit: model.family=encoder_decoder"):
        validate(tiny_config(*ENC_DEC, "data.packing=best_fit"), 1)
    validate(tiny_config(*ENCODER, "data.packing=best_fit"), 1)  # masked LM never selects padding


def test_family_code_matches_its_spec():
    """The family classes read their capabilities from their `FamilySpec` (`llmjax.config.family_spec`): the
    spec names the class, and a family decodes (has `step`) exactly when its spec says so."""
    from llmjax.config import FAMILIES

    for name, spec in FAMILIES.items():
        cfg = tiny_config(f"model.family={name}", *(("model.sentinels=16",) if name == "encoder_decoder" else ()))
        family = build_family(cfg.model)
        assert family.name == name and family.spec is spec
        assert type(family).__name__ == spec.implementation.split(":")[1]
        assert hasattr(family, "step") == spec.decoding, name


# ----------------------------------------------------------------------------- layouts

LAYOUTS = {
    "data8": ("mesh.data=8",),
    "fsdp8": ("mesh.data=1", "mesh.fsdp=8"),
    "data2_fsdp2_tensor2": ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
}
STEPS = 3


def family_batch(cfg, seed=0):
    """A batch made by the family's own objective from random rows (documents of random lengths)."""
    fam = build_family(cfg.model)
    obj = fam.objective(cfg.data.seq_len, Tok)
    rng = np.random.default_rng(seed)
    n = obj.raw_length(cfg.data.seq_len)
    exs = []
    for i in range(cfg.train.batch_size):
        tokens = rng.integers(4, 100, n).astype(np.int32)
        tokens[rng.choice(n, 2, replace=False)] = 3
        exs.append(obj(number_documents(tokens, 3), np.random.default_rng([seed, i])))
    return {k: np.stack([e[k] for e in exs]) for k in exs[0]}


def run(cfg, devices):
    setup = build_setup(cfg, devices)
    state = setup.init_state()
    batch = setup.put_batch(family_batch(cfg))
    grads, _ = setup.jit_gradients()(state.params, batch)
    step = setup.jit_train_step()
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return jax.device_get(grads), losses


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for (path, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0],
                                 strict=True):
        scale = float(np.max(np.abs(y))) or 1.0
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * scale, err_msg=jax.tree_util.keystr(path))


FAMILY_LAYOUTS = [(fam, layout) for fam in ("encoder", "encoder_decoder") for layout in LAYOUTS] + [
    ("encoder", "pipeline2_data4")]
# The quick run (-m "not slow") keeps every encoder layout and encoder-decoder on data8; these take 10-40 s each.
SLOW_FAMILY_LAYOUTS = {("encoder_decoder", "fsdp8"), ("encoder_decoder", "data2_fsdp2_tensor2"),
                       ("encoder", "pipeline2_data4")}
FAMILY_OVERRIDES = {"encoder": ENCODER, "encoder_decoder": ENC_DEC}


@pytest.fixture(scope="module")
def references():
    return {fam: run(tiny_config(*FAMILY_OVERRIDES[fam]), jax.devices()[:1]) for fam in FAMILY_OVERRIDES}


@pytest.mark.parametrize("family, layout", [pytest.param(*case, marks=pytest.mark.slow) if case in SLOW_FAMILY_LAYOUTS
                                             else case for case in FAMILY_LAYOUTS])
def test_family_layouts_match_one_device(family, layout, references):
    extra = LAYOUTS.get(layout, ("mesh.pipeline=2", "mesh.data=4", "pipeline.microbatches=2"))
    grads, losses = run(tiny_config(*FAMILY_OVERRIDES[family], *extra), jax.devices())
    ref_grads, ref_losses = references[family]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    assert_trees_close(grads, ref_grads)


# ----------------------------------------------------------------------------- encoder-decoder decoding


@pytest.mark.slow
def test_teacher_forced_logits_equal_cached_decoding():
    from llmjax.infer.engine import Engine
    from llmjax.infer.sampling import SamplingParams

    cfg = tiny_config(*ENC_DEC)
    setup = build_setup(cfg, jax.devices()[:1])
    params = jax.tree.map(lambda p: p * 8.0 if p.ndim > 1 else p, _params(setup))  # far from uniform logits
    fam = setup.family
    engine = Engine(cfg.model, params)
    prompts = [list(np.random.default_rng(i).integers(4, 100, n)) for i, n in enumerate((5, 12, 9))]
    out = engine.generate(prompts, SamplingParams(max_new_tokens=7), return_logits=True)
    for p, g in zip(prompts, out, strict=True):
        assert len(g.tokens) == 7
        enc = jnp.asarray([p], jnp.int32)
        dec = jnp.asarray([[fam.start_id()] + g.tokens[:-1]], jnp.int32)
        logits = setup.model.apply({"params": params}, enc, jnp.ones_like(enc), jnp.arange(len(p))[None], dec,
                                   jnp.ones_like(dec), jnp.arange(dec.shape[1])[None])[0]
        np.testing.assert_allclose(g.logits, np.asarray(logits), rtol=1e-5, atol=1e-4 * float(jnp.abs(logits).max()))
    dev = engine.generate(prompts, SamplingParams(max_new_tokens=7))
    assert [g.tokens for g in dev] == [g.tokens for g in out]


# ----------------------------------------------------------------------------- kill -9 and resume


def _losses(workdir, kind="train", key="loss"):
    from llmjax.train.telemetry.metrics import read_metrics

    return {k: r[key] for k, r in read_metrics(workdir / "metrics.jsonl", kind).items()}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["encoder", "encoder_decoder"])
def test_kill9_then_resume_is_bitwise(family, tmp_path, corpus):
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from helpers import tiny_train_overrides

    root = Path(__file__).resolve().parents[2]
    extra = {"encoder": ["model.family=encoder", "model.position=learned", "model.max_seq_len=32"],
             "encoder_decoder": ["model.family=encoder_decoder", "model.sentinels=8"]}[family]
    steps = ["train.steps=30", "checkpoint.every_steps=10", "eval.every_steps=15", "sample.max_new_tokens=4"]

    def cmd(workdir):
        return [sys.executable, "-m", "llmjax.cli", "train", "--workdir", str(workdir), *tiny_train_overrides(corpus),
                *extra, *steps]

    ref = tmp_path / "ref"
    r = subprocess.run(cmd(ref), cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    proc = subprocess.Popen(cmd(run), cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and max(_losses(run), default=-1) >= 20 and (
                run / "checkpoints" / "10").is_dir():
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and max(_losses(run)) < 29
    r = subprocess.run(cmd(run), cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr
    assert _losses(run) == _losses(ref) and sorted(_losses(ref)) == list(range(30))
    assert _losses(run, "eval", "eval_loss") == _losses(ref, "eval", "eval_loss")
    if family == "encoder":
        acc = _losses(ref, "eval", "eval_mlm_accuracy")
        assert set(acc) == {0, 15, 30} and all(0 <= a <= 1 for a in acc.values())
