"""PPO (`train.objective=ppo`): the per-token rewards (sequence reward at the last response token, k1 penalty on
every one), GAE and whitening equal a hand computation on fixed values; the loss the step differentiates (clipped
surrogate + value_coef x clipped value loss on a tiny model) equals a hand computation; one step is epochs x
minibatches updates (the optimizer counts them); bad PPO settings are refused naming the key, exit 2 from the
command line. Layouts: tests/post/test_grpo_layouts.py; resume and LoRA: tests/post/test_grpo.py."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config
from test_cli import assert_usage_error, run_cli

from llmjax.config import ConfigError
from llmjax.models.families import build_family
from llmjax.post.rl.ppo import PPOBatch, PPOFamily, ppo_targets

PPO = ["train.objective=ppo", "rl.prompts=x.jsonl", "rl.reward_fn=a:b", "eval.every_steps=0"]


def test_ppo_targets_equal_hand_computation():
    B, T = 3, 6
    rng = np.random.default_rng(1)
    mask = np.zeros((B, T), np.float32)
    mask[0, 1:5] = 1  # 4 response tokens then padding after the stop
    mask[1, 2:6] = 1  # runs to the end of the row (no stop)
    mask[2, 0:2] = 1
    old, ref = rng.normal(-2, 0.5, (B, T)), rng.normal(-2, 0.5, (B, T))
    values = rng.normal(0, 1, (B, T))
    rewards = np.array([1.5, -0.5, 2.0])
    beta, gamma, lam = 0.1, 0.9, 0.8
    out = ppo_targets(rewards, old.astype(np.float32), ref.astype(np.float32), values.astype(np.float32), mask,
                      beta, gamma, lam, whiten=False)
    want_r, want_a, want_ret = np.zeros((B, T)), np.zeros((B, T)), np.zeros((B, T))
    for i in range(B):
        pos = [t for t in range(T) if mask[i, t]]
        for t in pos:
            want_r[i, t] = -beta * (old[i, t] - ref[i, t]) + (rewards[i] if t == pos[-1] else 0.0)
        running = 0.0
        for j in reversed(range(len(pos))):
            t = pos[j]
            v_next = values[i, pos[j + 1]] if j + 1 < len(pos) else 0.0
            running = want_r[i, t] + gamma * v_next - values[i, t] + gamma * lam * running
            want_a[i, t], want_ret[i, t] = running, running + values[i, t]
    np.testing.assert_allclose(out["token_rewards"], want_r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["advantages"], want_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["returns"], want_ret, rtol=1e-5, atol=1e-6)
    white = ppo_targets(rewards, old.astype(np.float32), ref.astype(np.float32), values.astype(np.float32), mask,
                        beta, gamma, lam)["advantages"]
    a = want_a[mask > 0]
    np.testing.assert_allclose(white[mask > 0], (a - a.mean()) / (a.std() + 1e-8), rtol=1e-4, atol=1e-5)
    assert np.all(white[mask == 0] == 0)


def test_ppo_loss_equals_hand_computation():
    cfg = tiny_config(*PPO, "rl.value_coef=0.5", "rl.value_clip=0.3")
    fam = PPOFamily(build_family(cfg.model), cfg)
    model = fam.module()
    B, L = 3, 10
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, L), jnp.int32))["params"])
    params["score"] = jax.random.normal(jax.random.PRNGKey(1), params["score"].shape) * 0.3  # non-zero values
    rng = np.random.default_rng(0)
    inputs = rng.integers(1, 128, (B, L)).astype(np.int32)
    targets = np.concatenate([inputs[:, 1:], rng.integers(1, 128, (B, 1))], 1).astype(np.int32)
    mask = ((np.arange(L)[None] >= 2) & (np.arange(L)[None] < np.array([[8], [5], [10]]))).astype(np.float32)
    seg, pos = jnp.ones((B, L), jnp.int32), jnp.broadcast_to(jnp.arange(L), (B, L))
    apply = jax.jit(model.apply, static_argnames="return_score")
    logits = np.asarray(apply({"params": params}, inputs), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    logp = np.take_along_axis(logits, targets[..., None], -1)[..., 0] - logz
    values = np.asarray(apply({"params": params}, inputs, seg, pos, return_score=True), np.float64)
    old, old_v = logp + rng.normal(0, 0.3, (B, L)), values + rng.normal(0, 0.4, (B, L))
    adv, ret = rng.normal(0, 1, (B, L)), rng.normal(0, 1, (B, L))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    batch = PPOBatch(inputs=jnp.asarray(inputs), targets=jnp.asarray(targets), segment_ids=seg, positions=pos,
                     weights=f32(mask), old_logp=f32(old), ref_logp=f32(old), entropy=f32(np.zeros((B, L))),
                     old_values=f32(old_v), advantages=f32(adv), returns=f32(ret), rewards=f32(np.zeros((B, 1))),
                     kl_coef=f32(np.zeros((B, 1))))
    total, sums = jax.jit(lambda p, b: fam.loss(model, p, b, 0.0))(params, batch)
    want, clipped, v_clipped = 0.0, 0, 0
    for i in range(B):
        for t in range(L):
            if mask[i, t]:
                rho = math.exp(logp[i, t] - old[i, t])
                want += -min(rho * adv[i, t], min(max(rho, 0.8), 1.2) * adv[i, t])
                vc = old_v[i, t] + min(max(values[i, t] - old_v[i, t], -0.3), 0.3)
                want += 0.5 * 0.5 * max((values[i, t] - ret[i, t]) ** 2, (vc - ret[i, t]) ** 2)
                clipped += (rho > 1.2 and adv[i, t] > 0) or (rho < 0.8 and adv[i, t] < 0)
                v_clipped += abs(values[i, t] - old_v[i, t]) > 0.3
    assert float(total) == pytest.approx(want, rel=2e-5)
    m = fam.metrics(sums, jnp.sum(batch.weights))
    assert float(m["clip_fraction"]) == pytest.approx(clipped / mask.sum())
    assert 0 < clipped < mask.sum() and 0 < v_clipped < mask.sum()
    assert float(m["value_clip_fraction"]) == pytest.approx(v_clipped / mask.sum())
    assert fam.updates_per_step == cfg.rl.ppo_epochs * cfg.rl.minibatches


@pytest.mark.parametrize("override,needle", [
    ("rl.minibatches=3", "rl.minibatches=3 does not divide train.batch_size"),
    ("rl.ppo_epochs=0", "rl.ppo_epochs"),
    ("rl.gamma=1.5", "rl.gamma"),
    ("rl.lam=-0.1", "rl.lam"),
    ("rl.kl_target=0", "rl.kl_target"),
])
def test_bad_ppo_settings_are_refused(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        tiny_config(*PPO, "train.batch_size=8", override)


def test_bad_ppo_setting_exits_2_before_anything_runs(tmp_path):
    wd = tmp_path / "run"
    out = run_cli("train", "--workdir", str(wd), "train.objective=ppo", "rl.prompts=nowhere.jsonl",
                  "rl.reward_fn=a:b", "eval.every_steps=0", "train.batch_size=8", "rl.minibatches=3")
    assert_usage_error(out, "rl.minibatches=3")
    assert not (wd / "checkpoints").exists()
