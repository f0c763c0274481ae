"""DPO: the loss on a batch equals a hand computation (sigmoid and IPO), beta -> 0 behaves as its limit, bad
records are named by line, and chosen-vs-rejected accuracy rises on the example dataset (full and LoRA)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config
from test_cli import run_cli

from llmjax.config import ConfigError
from llmjax.config.post_training import DPOConfig
from llmjax.data.post.preference_data import PreferenceData
from llmjax.models.families import build_family
from llmjax.post.dpo import PreferenceBatch, PreferenceObjective
from llmjax.train.telemetry.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "experiments" / "data"
B, L = 4, 16


def batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    f = {}
    for side in ("chosen", "rejected"):
        n = rng.integers(6, L, B)
        f[f"{side}_inputs"] = rng.integers(1, cfg.model.vocab_size, (B, L)).astype(np.int32)
        f[f"{side}_targets"] = rng.integers(1, cfg.model.vocab_size, (B, L)).astype(np.int32)
        f[f"{side}_segment_ids"] = (np.arange(L)[None] < n[:, None]).astype(np.int32)
        f[f"{side}_positions"] = np.where(f[f"{side}_segment_ids"] > 0, np.arange(L)[None], 0).astype(np.int32)
        w = (np.arange(L)[None] >= 3) & (f[f"{side}_segment_ids"] > 0)  # the "response": positions 3..n-1
        f[f"{side}_weights"] = w.astype(np.float32)
    f["weights"] = np.array([[1], [1], [1], [0]], np.float32)  # the last pair is padding
    f["ref_chosen"] = rng.normal(-40, 3, (B, 1)).astype(np.float32)
    f["ref_rejected"] = rng.normal(-40, 3, (B, 1)).astype(np.float32)
    return PreferenceBatch(**{k: jnp.asarray(v) for k, v in f.items()})


@pytest.fixture(scope="module")
def model_and_params():
    cfg = tiny_config()
    family = build_family(cfg.model)
    model = family.module()
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, L), jnp.int32))["params"]
    import flax.linen as nn

    return cfg, family, model, nn.meta.unbox(params)


def by_hand(family, model, params, b, beta, kind):
    """Summed log-probabilities from the logits with numpy, then the loss formula."""
    logp = {}
    for side in ("chosen", "rejected"):
        logits = np.asarray(model.apply({"params": params}, getattr(b, f"{side}_inputs"),
                                        getattr(b, f"{side}_segment_ids"), getattr(b, f"{side}_positions")),
                            np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        tgt = np.take_along_axis(logits, np.asarray(getattr(b, f"{side}_targets"))[..., None], -1)[..., 0]
        logp[side] = ((tgt - logz) * np.asarray(getattr(b, f"{side}_weights"))).sum(1)
    h = (logp["chosen"] - np.asarray(b.ref_chosen)[:, 0]) - (logp["rejected"] - np.asarray(b.ref_rejected)[:, 0])
    loss = (h - 1 / (2 * beta)) ** 2 if kind == "ipo" else np.log1p(np.exp(-beta * h))
    w = np.asarray(b.weights)[:, 0]
    rc = beta * (logp["chosen"] - np.asarray(b.ref_chosen)[:, 0])
    rr = beta * (logp["rejected"] - np.asarray(b.ref_rejected)[:, 0])
    return (w * loss).sum() / w.sum(), (w * (rc - rr)).sum() / w.sum(), (w * (rc > rr)).sum() / w.sum()


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_loss_equals_hand_computation(model_and_params, kind):
    cfg, family, model, params = model_and_params
    b = batch(cfg)
    objective = PreferenceObjective(family, DPOConfig(beta=0.1, loss=kind))
    total, sums = objective.loss(model, params, b, 0.0)
    m = objective.metrics(sums, jnp.sum(b.weights))
    loss, margin, accuracy = by_hand(family, model, params, b, 0.1, kind)
    np.testing.assert_allclose(float(m["loss"]), loss, rtol=1e-5)
    np.testing.assert_allclose(float(m["reward_margin"]), margin, rtol=1e-5, atol=1e-6)
    assert float(m["reward_accuracy"]) == accuracy
    ev = objective.eval_metrics({k: float(v) for k, v in objective.eval_sums(model, params, b).items()})
    np.testing.assert_allclose(ev["eval_loss"], loss, rtol=1e-5)


@pytest.mark.slow
def test_beta_to_zero_is_log2_and_half_beta_likelihood_ratio(model_and_params):
    """beta -> 0: every pair's loss -> log 2, and the gradient -> -beta/2 x the gradient of the mean log-ratio h."""
    cfg, family, model, params = model_and_params
    b = batch(cfg)
    beta = 1e-4
    objective = PreferenceObjective(family, DPOConfig(beta=beta))
    _, sums = objective.loss(model, params, b, 0.0)
    np.testing.assert_allclose(float(sums["dpo_sum"] / 3), np.log(2), rtol=1e-4)
    grad = jax.grad(lambda p: objective.loss(model, p, b, 0.0)[0])(params)

    def h_sum(p):
        pc, pr, _ = objective.logprobs(model, p, b)
        return jnp.sum(b.weights[:, 0] * ((pc - b.ref_chosen[:, 0]) - (pr - b.ref_rejected[:, 0])))

    want = jax.tree.map(lambda g: -beta / 2 * g, jax.grad(h_sum)(params))
    for x, y in zip(jax.tree.leaves(grad), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(x, y, rtol=2e-3, atol=1e-3 * float(np.max(np.abs(y))))


def test_bad_pairs_are_named_by_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = (DATA / "dpo_pairs.jsonl").read_text().splitlines()[:3]
    path.write_text("\n".join([*good, '{"prompt": "hi", "chosen": "yes"}']) + "\n")
    cfg = tiny_config("model.vocab_size=512", f"data.path={path}", f"data.tokenizer={DATA / 'chat_tokenizer'}",
                      "train.objective=dpo", "train.batch_size=2", "eval.every_steps=0")
    with pytest.raises(ConfigError, match="line 4: expected"):
        PreferenceData(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("lora.rank=8", "lora.alpha=16", "lora.targets=[q,k,v,o,mlp]",
                                        "optim.lr=3e-3")], ids=["full", "lora"])
def test_accuracy_rises_on_the_example_dataset(tmp_path, extra):
    workdir = tmp_path / "run"
    result = run_cli("train", "--config", str(ROOT / "experiments/configs/dpo_small.yaml"), "--workdir",
                     str(workdir), "model.d_model=64", "model.n_layers=2", "model.d_ff=128", "train.steps=30",
                     "eval.every_steps=30", "checkpoint.every_steps=0", "train.progress=false",
                     "train.tensorboard=false", "sample.max_new_tokens=0", "optim.lr=2e-3", *extra)
    assert result.returncode == 0, result.stderr
    ev = read_metrics(workdir / "metrics.jsonl", "eval")
    assert ev[0]["eval_loss"] == pytest.approx(np.log(2), rel=1e-5)  # the policy starts as the reference
    assert ev[0]["eval_reward_accuracy"] == 0.0
    assert ev[30]["eval_reward_accuracy"] > 0.7 and ev[30]["eval_loss"] < ev[0]["eval_loss"]
    assert (workdir / "dpo_reference.npz").is_file()
    tr = read_metrics(workdir / "metrics.jsonl")
    assert {"reward_margin", "reward_accuracy", "reward_chosen", "reward_rejected"} <= set(tr[29])
