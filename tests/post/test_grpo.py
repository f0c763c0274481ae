"""GRPO (`train.objective=grpo`): the loss the train step differentiates equals a hand computation on fixed
log-probabilities and advantages (per token and per sequence); through the command line a run from an SFT model
samples, scores and steps, evaluates on held-out prompts (logging responses), resumes after kill -9 with the
same rollouts and losses bit for bit (also PPO, whose adaptive KL coefficient must come back from the
checkpoint), LoRA trains only adapters (PPO: and the value head), and bad input (no prompts, a group of 1, a
reward function that cannot be imported or that raises) exits 2 naming the key before anything is written."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config
from test_cli import assert_usage_error, run_cli

from llmjax.models.families import build_family
from llmjax.post.rl.grpo import GRPOFamily, RolloutBatch
from llmjax.train.telemetry.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "experiments" / "data"


@pytest.mark.parametrize("normalise", ["token", "sequence"])
def test_grpo_loss_equals_hand_computation(normalise):
    cfg = tiny_config("train.objective=grpo", "rl.prompts=x.jsonl", "rl.reward_fn=a:b", "eval.every_steps=0",
                      f"rl.normalise={normalise}")
    base = build_family(cfg.model)
    fam = GRPOFamily(base, cfg)
    model = base.module()
    B, L = 4, 12
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, L), jnp.int32))["params"])
    rng = np.random.default_rng(0)
    inputs = rng.integers(1, 128, (B, L)).astype(np.int32)
    targets = np.concatenate([inputs[:, 1:], rng.integers(1, 128, (B, 1))], 1).astype(np.int32)
    lengths = np.array([8, 5, 11, 3])
    mask = ((np.arange(L)[None] >= 2) & (np.arange(L)[None] < lengths[:, None])).astype(np.float32)
    logits = np.asarray(jax.jit(model.apply)({"params": params}, inputs), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp = np.take_along_axis(logits, targets[..., None], -1)[..., 0] - logz
    old = logp + rng.normal(0, 0.3, (B, L))  # ratios on both sides of the clip range
    ref = logp + rng.normal(0, 0.2, (B, L))
    adv = np.array([1.2, -0.7, 0.3, -1.5])
    w = mask if normalise == "token" else mask / mask.sum(1, keepdims=True)
    batch = RolloutBatch(inputs=jnp.asarray(inputs), targets=jnp.asarray(targets),
                         segment_ids=jnp.ones((B, L), jnp.int32), positions=jnp.broadcast_to(jnp.arange(L), (B, L)),
                         weights=jnp.asarray(w, jnp.float32), old_logp=jnp.asarray(old, jnp.float32),
                         ref_logp=jnp.asarray(ref, jnp.float32), entropy=jnp.zeros((B, L)),
                         advantages=jnp.asarray(adv[:, None], jnp.float32), rewards=jnp.zeros((B, 1)))
    total, sums = jax.jit(lambda p, b: fam.loss(model, p, b, 0.0))(params, batch)
    want, clipped = 0.0, 0
    for i in range(B):
        for t in range(L):
            if not mask[i, t]:
                continue
            rho = math.exp(logp[i, t] - old[i, t])
            surr = -min(rho * adv[i], min(max(rho, 0.8), 1.2) * adv[i])
            lr = ref[i, t] - logp[i, t]
            want += w[i, t] * (surr + 0.04 * (math.exp(lr) - lr - 1))
            clipped += (rho > 1.2 and adv[i] > 0) or (rho < 0.8 and adv[i] < 0)
    assert float(total) == pytest.approx(want, rel=2e-5)
    m = fam.metrics(sums, jnp.sum(batch.weights))
    assert float(m["clip_fraction"]) == pytest.approx(clipped / mask.sum())
    assert 0 < clipped < mask.sum()
    # the step divides by the weights' sum: tokens (per token) or sequences (per sequence)
    assert float(jnp.sum(batch.weights)) == pytest.approx(mask.sum() if normalise == "token" else B)


TINY = [
    "model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.d_ff=128", "model.max_seq_len=128", "model.compute_dtype=float32",
    f"data.tokenizer={DATA / 'chat_tokenizer'}", "train.progress=false", "train.tensorboard=false",
    "optim.warmup_steps=1", "sample.max_new_tokens=0",
]
SFT = [f"data.path={DATA / 'sft_chat.jsonl'}", "train.objective=sft", "data.seq_len=128", "train.steps=4",
       "eval.every_steps=0", "checkpoint.every_steps=4", "train.batch_size=8", "optim.lr=3e-3"]
GRPO = ["train.objective=grpo", f"rl.prompts={DATA / 'rl_tasks.jsonl'}",
        "rl.reward_fn=llmjax.post.rl.rewards:exact_answer",
        "rl.samples_per_prompt=4", "rl.max_new_tokens=8", "data.seq_len=48", "train.batch_size=8", "train.steps=3",
        "eval.every_steps=0", "checkpoint.every_steps=1", "optim.lr=1e-3", "data.validation_fraction=0.2"]


PPO = ["train.objective=ppo", "rl.minibatches=2", "rl.ppo_epochs=2", "rl.kl_target=0.05", "rl.kl_horizon=16"]
OBJECTIVE = {"grpo": [], "ppo": PPO}


def grpo(workdir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmjax.cli", "train", "--workdir", str(workdir), *TINY, *GRPO,
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    sft = tmp_path_factory.mktemp("grpo") / "sft"
    out = run_cli("train", "--workdir", str(sft), *TINY, *SFT)
    assert out.returncode == 0, out.stderr
    return sft


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["grpo", "ppo"])
def test_rl_runs_and_resumes_bitwise_after_kill9(objective, sft_run, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    steps = ("train.steps=8", "checkpoint.every_steps=2", *OBJECTIVE[objective])
    # the uninterrupted run also evaluates on the held-out prompts (greedy rollouts, a few shown), which must
    # leave its training bit for bit as the resumed run's without evaluation
    out = grpo(full, f"train.init_from={sft_run}", *steps, "eval.every_steps=4")
    assert out.returncode == 0, out.stderr
    assert "rl step 0: 8 rollouts" in out.stderr
    assert out.stderr.count("eval: '") >= 3 and "(reward " in out.stderr, out.stderr
    ev = read_metrics(full / "metrics.jsonl", "eval")
    assert {4, 8} <= set(ev) and 0.0 <= ev[8]["eval_reward"] <= 1.0 and ev[8]["eval_response_length"] > 0
    proc = subprocess.Popen([sys.executable, "-m", "llmjax.cli", "train", "--workdir", str(resumed), *TINY, *GRPO,
                             f"train.init_from={sft_run}", *steps], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline, reached = time.time() + 600, False
    while time.time() < deadline and proc.poll() is None and not reached:
        m = resumed / "metrics.jsonl"
        reached = m.exists() and any(s >= 5 for s in read_metrics(m))  # checkpoint 2 (or 4) finished
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert reached and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    out = grpo(resumed, f"train.init_from={sft_run}", *steps)
    assert out.returncode == 0, out.stderr
    assert "resumed from" in out.stderr, out.stderr
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    keys = ("loss", "reward", "kl", "entropy", "response_length", "grad_norm")
    keys += ("kl_coef", "value_loss", "explained_variance") if objective == "ppo" else ()
    assert sorted(b) == list(range(8))
    assert [[a[k][x] for x in keys] for k in range(8)] == [[b[k][x] for x in keys] for k in range(8)]
    assert {"reward", "reward_std", "kl", "entropy", "clip_fraction", "approx_kl", "response_length"} <= set(a[0])
    if objective == "ppo":  # the coefficient adapted from step to step, and came back from the checkpoint
        assert len({a[k]["kl_coef"] for k in range(8)}) == 8, [a[k]["kl_coef"] for k in range(8)]
    assert a[0]["kl"] == 0.0 and a[7]["kl"] > 0.0  # the policy starts as the reference, then moves


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["grpo", "ppo"])
def test_rl_with_lora_trains_only_adapters(objective, sft_run, tmp_path):
    wd = tmp_path / "lora"
    (tmp_path / "len_reward.py").write_text("def length(prompt, response, record):\n"
                                            "    return float(len(response) % 5)\n")  # varies: the head learns
    out = grpo(wd, f"train.init_from={sft_run}", "lora.rank=4", "lora.targets=[q,v]", "train.steps=2",
               *OBJECTIVE[objective], "rl.reward_fn=len_reward:length", env={"PYTHONPATH": f"{tmp_path}:{ROOT}"})
    assert out.returncode == 0, out.stderr
    from llmjax.train.checkpoint.compat import saved_param_shapes

    names = set(saved_param_shapes(wd / "checkpoints" / "2") or {})
    adapters = {n for n in names if n.endswith(("/a", "/b"))}  # adapters only: A and B (PPO: + the value head)
    assert adapters and names - adapters == ({"score"} if objective == "ppo" else set()), names
    if objective == "ppo":  # the head starts at 0 (values 0: explained variance exactly 0), then it is trained
        m = read_metrics(wd / "metrics.jsonl")
        # 1 - var(returns - 0) / var(returns): zero up to the two reductions' rounding, whose order can follow the
        # buffers' alignment (seen once under tcmalloc: -1.2e-7)
        assert abs(m[0]["explained_variance"]) < 1e-6 and abs(m[1]["explained_variance"]) > 1e-6, m


@pytest.mark.slow
def test_grpo_bad_input_exits_2(sft_run, tmp_path):
    wd = tmp_path / "bad"
    no_prompts = tmp_path / "no_prompts.jsonl"
    no_prompts.write_text('{"question": "What is 1 plus 1?"}\n')
    assert_usage_error(grpo(wd, f"rl.prompts={no_prompts}"), "rl.prompts", "line 1", '"prompt"')
    assert_usage_error(grpo(wd, "rl.samples_per_prompt=1"), "rl.samples_per_prompt=1")
    assert_usage_error(grpo(wd, "rl.reward_fn=no_such_module:f"), "rl.reward_fn=no_such_module:f", "cannot import")
    fns = tmp_path / "fns"
    fns.mkdir()
    (fns / "bad_reward.py").write_text("def reward(prompt, response, record):\n    return record['missing']\n")
    err = assert_usage_error(grpo(wd, "rl.reward_fn=bad_reward:reward", env={"PYTHONPATH": f"{fns}:{ROOT}"}),
                             "rl.reward_fn=bad_reward:reward raised KeyError", "rl_tasks.jsonl line")
    assert "Traceback" not in err
    other = tmp_path / "other_vocab_rm"  # a reward-model workdir of another vocabulary (refused before its weights)
    (other / "checkpoints" / "0").mkdir(parents=True)
    (other / "config.yaml").write_text("train:\n  objective: reward\nmodel:\n  vocab_size: 256\n")
    assert_usage_error(grpo(wd, "rl.reward_fn=null", f"rl.reward_model={other}"), "rl.reward_model",
                       "another vocabulary", "256")
    assert not (wd / "checkpoints").exists() or not any((wd / "checkpoints").iterdir())


@pytest.mark.parametrize("objective", ["grpo", "ppo"])
def test_reward_model_in_several_processes_is_refused(objective):
    """Several processes score with rl.reward_fn; a reward model is refused naming the key, before reading data."""
    from llmjax.config import ConfigError
    from llmjax.train.objectives import objective_for

    cfg = tiny_config(f"train.objective={objective}", "rl.prompts=x.jsonl", "rl.reward_fn=null",
                      "rl.reward_model=rm", "eval.every_steps=0")
    with pytest.raises(ConfigError, match="rl.reward_model: .* runs in one process"):
        objective_for(cfg).open_data(cfg, build_family(cfg.model), process_count=2)
