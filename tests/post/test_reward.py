"""Reward models (`train.objective=reward`): the loss on a batch equals a hand computation (head on the last
token's hidden state, Bradley-Terry with and without a margin); through the command line a reward model
trained from an SFT run (train.init_from) ranks chosen over rejected better than at its start, `llmjax
reward` scores records as the model does, and the Hugging Face export (`LlamaForSequenceClassification`)
scores them the same in transformers; bad input exits 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config
from test_cli import assert_usage_error, run_cli

from llmjax.models.families import build_family
from llmjax.post.dpo import PreferenceBatch
from llmjax.post.rl.reward import RewardFamily
from llmjax.train.telemetry.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "experiments" / "data"
B, L = 4, 16


def pair_batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    f = {}
    for side in ("chosen", "rejected"):
        n = rng.integers(6, L, B)
        seg = (np.arange(L)[None] < n[:, None]).astype(np.int32)
        f[f"{side}_inputs"] = (rng.integers(1, cfg.model.vocab_size, (B, L)) * seg).astype(np.int32)
        f[f"{side}_targets"] = rng.integers(1, cfg.model.vocab_size, (B, L)).astype(np.int32)
        f[f"{side}_segment_ids"] = seg
        f[f"{side}_positions"] = np.where(seg > 0, np.arange(L)[None], 0).astype(np.int32)
        f[f"{side}_weights"] = ((np.arange(L)[None] >= 3) & (seg > 0)).astype(np.float32)
    f["weights"] = np.array([[1], [1], [1], [0]], np.float32)  # the last pair is padding
    f["ref_chosen"] = np.zeros((B, 1), np.float32)
    f["ref_rejected"] = np.zeros((B, 1), np.float32)
    return PreferenceBatch(**{k: jnp.asarray(v) for k, v in f.items()})


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_reward_loss_equals_hand_computation(margin):
    cfg = tiny_config()
    family = RewardFamily(build_family(cfg.model), margin)
    model = family.module()
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, L), jnp.int32))["params"])
    assert params["score"].shape == (cfg.model.d_model, 1)
    decoder = build_family(cfg.model).module()
    decoder_params = {k: v for k, v in params.items() if k != "score"}
    b = pair_batch(cfg)
    rewards = {}
    for side in ("chosen", "rejected"):
        seg = np.asarray(getattr(b, f"{side}_segment_ids"))
        hidden = np.asarray(jax.jit(lambda p, *a: decoder.apply({"params": p}, *a, return_hidden=True))(
            decoder_params, getattr(b, f"{side}_inputs"), getattr(b, f"{side}_segment_ids"),
            getattr(b, f"{side}_positions")), np.float64)
        last = seg.sum(1) - 1
        rewards[side] = hidden[np.arange(B), last] @ np.asarray(params["score"], np.float64)[:, 0]
    w = [1, 1, 1, 0]
    losses = [-math.log(1 / (1 + math.exp(-(c - r - margin))))
              for c, r in zip(rewards["chosen"], rewards["rejected"], strict=True)]
    total, sums = jax.jit(lambda p, batch: family.loss(model, p, batch, 0.0))(params, b)
    assert float(total) == pytest.approx(sum(x * wi for x, wi in zip(losses, w, strict=True)), rel=1e-5)
    m = family.metrics(sums, jnp.asarray(3.0))
    c, r = rewards["chosen"][:3], rewards["rejected"][:3]
    assert float(m["accuracy"]) == pytest.approx(np.mean(c > r))
    assert float(m["reward_chosen"]) == pytest.approx(c.mean(), rel=1e-4, abs=1e-6)
    assert float(m["reward_rejected_std"]) == pytest.approx(r.std(), rel=1e-3, abs=1e-5)


TINY = [
    "model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.d_ff=128", "model.max_seq_len=128", "model.compute_dtype=float32",
    f"data.tokenizer={DATA / 'chat_tokenizer'}",
    "data.validation_fraction=0.1", "train.batch_size=8", "train.progress=false", "train.tensorboard=false",
    "optim.warmup_steps=1", "sample.max_new_tokens=0", "optim.lr=3e-3",
]
SFT = [f"data.path={DATA / 'sft_chat.jsonl'}", "train.objective=sft", "data.seq_len=128", "train.steps=4",
       "eval.every_steps=0", "checkpoint.every_steps=4"]
REWARD = [f"data.path={DATA / 'dpo_pairs.jsonl'}", "train.objective=reward", "data.seq_len=64", "train.steps=16",
          "eval.every_steps=16", "eval.batches=0", "checkpoint.every_steps=16"]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    sft, rm = root / "sft", root / "rm"
    for wd, args in ((sft, SFT), (rm, [*REWARD, f"train.init_from={sft}"])):
        out = run_cli("train", "--workdir", str(wd), *TINY, *args)
        assert out.returncode == 0, out.stderr
    pairs = [json.loads(line) for line in (DATA / "dpo_pairs.jsonl").read_text().splitlines()[:6]]
    records = root / "records.jsonl"
    records.write_text("".join(json.dumps({"prompt": p["prompt"], "response": p[s]}) + "\n"
                               for p in pairs for s in ("chosen", "rejected")))
    return sft, rm, records


@pytest.mark.slow
def test_reward_model_trains_from_sft_and_scores(reward_run, tmp_path):
    sft, rm, records = reward_run
    ev = read_metrics(rm / "metrics.jsonl", "eval")
    assert ev[16]["eval_loss"] < ev[0]["eval_loss"] and ev[16]["eval_accuracy"] > ev[0]["eval_accuracy"]
    assert {"accuracy", "reward_chosen", "reward_chosen_std", "reward_rejected", "reward_rejected_std"} <= set(
        read_metrics(rm / "metrics.jsonl")[15])
    out = run_cli("reward", "--workdir", str(rm), "--data", str(records))
    assert out.returncode == 0, out.stderr
    scores = [json.loads(line)["reward"] for line in out.stdout.splitlines()]
    assert len(scores) == 12 and len(set(scores)) == 12
    # bad input: a record without a response (named), a workdir that is not a reward model, an existing --output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "response": "x"}\n{"prompt": "hi"}\n')
    assert_usage_error(run_cli("reward", "--workdir", str(rm), "--data", str(bad)), f"{bad} line 2", "response")
    assert_usage_error(run_cli("reward", "--workdir", str(sft), "--data", str(records)), "train.objective=sft",
                       "not a reward model")
    kept = tmp_path / "kept.jsonl"
    kept.write_text("keep\n")
    assert_usage_error(run_cli("reward", "--workdir", str(rm), "--data", str(records), "--output", str(kept)),
                       "--output")
    assert kept.read_text() == "keep\n"


@pytest.mark.slow
@pytest.mark.hf
def test_hf_export_scores_the_same_in_transformers(reward_run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, rm, records = reward_run
    out = run_cli("reward", "--workdir", str(rm), "--data", str(records))
    ours = [json.loads(line)["reward"] for line in out.stdout.splitlines()]
    hf_dir = tmp_path / "hf"
    out = run_cli("convert", "to-hf", str(rm), str(hf_dir))
    assert out.returncode == 0, out.stderr
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    model = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    theirs = []
    for line in records.read_text().splitlines():
        rec = json.loads(line)
        ids = tok.apply_chat_template([{"role": "user", "content": rec["prompt"]},
                                       {"role": "assistant", "content": rec["response"]}], tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        with torch.no_grad():
            theirs.append(float(model(torch.tensor([list(ids)])).logits[0, 0]))
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
