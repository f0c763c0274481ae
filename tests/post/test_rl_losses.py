"""The RLHF math (`llmjax.post.rl.losses`) against hand computations on fixed numbers: the Bradley-Terry
reward loss, PPO's clipped surrogate at and around its clipping boundaries, the clipped value loss, GAE,
the k1/k3 KL estimators, the adaptive KL controller, GRPO's group advantages and its loss under per-token
and per-sequence normalisation."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.post.rl import losses as L


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_bradley_terry_loss_with_and_without_margin():
    rc, rr = jnp.array([2.0, -1.0, 0.5]), jnp.array([1.0, 1.0, 0.5])
    want = [-math.log(sigmoid(1.0)), -math.log(sigmoid(-2.0)), math.log(2.0)]
    np.testing.assert_allclose(L.bradley_terry_loss(rc, rr), want, rtol=1e-6)
    # a margin of 0.5 asks for a larger gap: -log sigmoid(gap - 0.5)
    want_m = [-math.log(sigmoid(0.5)), -math.log(sigmoid(-2.5)), -math.log(sigmoid(-0.5))]
    np.testing.assert_allclose(L.bradley_terry_loss(rc, rr, 0.5), want_m, rtol=1e-6)


def test_kl_estimators():
    logp, ref = jnp.array([-1.0, -2.0, -0.5]), jnp.array([-1.5, -1.0, -0.5])
    np.testing.assert_allclose(L.kl_k1(logp, ref), [0.5, -1.0, 0.0], rtol=1e-6)
    # k3 = e^{ref - logp} - (ref - logp) - 1
    want = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1, 0.0]
    np.testing.assert_allclose(L.kl_k3(logp, ref), want, rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(L.kl_k3(logp, ref)) >= 0)


@pytest.mark.parametrize("ratio,adv,want,clipped", [
    (1.0, 2.0, -2.0, False),              # on-policy: -A
    (1.1, 2.0, -2.2, False),              # inside the trust region
    (1.1999, 2.0, -2.3998, False),        # just inside 1 + eps: not clipped
    (1.2001, 2.0, -2.4, True),            # just outside: clipped at 1.2 A
    (1.5, 2.0, -1.2 * 2.0, True),         # above 1 + eps with A > 0: clipped to 1.2 A
    (1.5, -2.0, 3.0, False),              # above 1 + eps with A < 0: the unclipped (worse) term wins
    (0.5, -2.0, 0.8 * 2.0, True),         # below 1 - eps with A < 0: clipped to 0.8 |A|
    (0.5, 2.0, -1.0, False),              # below 1 - eps with A > 0: unclipped -rho A
    (0.8001, -1.0, 0.8001, False),        # just inside 1 - eps
    (0.7999, -1.0, 0.8, True),            # just outside: clipped at 0.8 |A|
])
def test_ppo_surrogate_clipping_boundaries(ratio, adv, want, clipped):
    old = jnp.array([[-1.0]])
    logp = old + math.log(ratio)
    loss, active = L.ppo_surrogate(logp, old, jnp.array([[adv]]), 0.2)
    np.testing.assert_allclose(loss, [[want]], rtol=1e-5)
    assert bool(active[0, 0]) == clipped


def test_clipped_value_loss():
    v, old, ret = jnp.array([1.0, 1.0, 0.0, 2.0]), jnp.array([0.5, 1.0, 1.0, 1.9]), jnp.array([2.0, 0.0, 1.0, 2.0])
    # V=1 from 0.5 with clip 0.2 -> clipped V=0.7: max((1-2)^2, (0.7-2)^2)=1.69
    # V=1 == old: both 1.0; V=0 from 1 -> clipped 0.8: max(1, 0.04)=1; V=2 from 1.9 -> 2.0 (inside): 0
    want = [0.5 * 1.69, 0.5 * 1.0, 0.5 * 1.0, 0.0]
    np.testing.assert_allclose(L.clipped_value_loss(v, old, ret, 0.2), want, rtol=1e-6, atol=1e-7)


def test_gae_by_hand():
    gamma, lam = 0.9, 0.8
    r = jnp.array([[0.0, 0.0, 1.0, 0.0], [0.5, 2.0, 0.0, 0.0]])
    v = jnp.array([[0.1, 0.2, 0.3, 9.0], [1.0, 1.0, 7.0, 7.0]])
    m = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = L.gae(r, v, m, gamma, lam)
    # row 0: three tokens, V after the last = 0
    d2 = 1.0 - 0.3
    d1 = 0.0 + gamma * 0.3 - 0.2
    d0 = 0.0 + gamma * 0.2 - 0.1
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    # row 1: two tokens
    e1 = 2.0 - 1.0
    e0 = 0.5 + gamma * 1.0 - 1.0
    b1 = e1
    b0 = e0 + gamma * lam * b1
    want = np.array([[a0, a1, a2, 0.0], [b0, b1, 0.0, 0.0]])
    np.testing.assert_allclose(adv, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ret, (want + np.asarray(v)) * np.asarray(m), rtol=1e-6, atol=1e-7)
    # lambda = 1, gamma = 1: advantages are the reward-to-go minus the value
    adv1, _ = L.gae(r, v, m, 1.0, 1.0)
    np.testing.assert_allclose(adv1[0, :3], [1.0 - 0.1, 1.0 - 0.2, 1.0 - 0.3], rtol=1e-6)


def test_adaptive_kl_controller():
    # above target: grows by e n / H with e clipped to 0.2
    assert L.adaptive_kl_coef(0.1, 0.3, 0.1, 10, 100) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    # slightly above: e = 0.05
    assert L.adaptive_kl_coef(0.1, 0.105, 0.1, 100, 100) == pytest.approx(0.1 * 1.05)
    # below target: shrinks, e clipped to -0.2
    assert L.adaptive_kl_coef(0.1, 0.0, 0.1, 50, 100) == pytest.approx(0.1 * (1 - 0.1))
    assert L.adaptive_kl_coef(0.1, 0.1, 0.1, 50, 100) == pytest.approx(0.1)


def test_group_advantages():
    r = jnp.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = L.group_advantages(r, 4)
    std = math.sqrt((4 * 0.25) / 3)  # ddof 1 over (1, 0, 0, 1)
    np.testing.assert_allclose(adv[:4], [0.5 / (std + 1e-6), -0.5 / (std + 1e-6), -0.5 / (std + 1e-6),
                                         0.5 / (std + 1e-6)], rtol=1e-5)
    np.testing.assert_allclose(adv[4:], 0.0, atol=1e-7)  # a group of equal rewards teaches nothing
    np.testing.assert_allclose(L.group_advantages(r, 2, scale=False), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], atol=1e-7)
    with pytest.raises(ValueError, match="group_size=1"):
        L.group_advantages(r, 1)


def _grpo_by_hand(logp, old, ref, rewards, mask, G, eps, beta, normalise):
    B, T = len(logp), len(logp[0])
    adv = []
    for g in range(B // G):
        rs = rewards[g * G:(g + 1) * G]
        mu = sum(rs) / G
        sd = math.sqrt(sum((x - mu) ** 2 for x in rs) / (G - 1))
        adv += [(x - mu) / (sd + 1e-6) for x in rs]
    per_seq, total, count = [], 0.0, 0
    for i in range(B):
        s, n = 0.0, 0
        for t in range(T):
            if not mask[i][t]:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            surr = -min(rho * adv[i], min(max(rho, 1 - eps), 1 + eps) * adv[i])
            lr = ref[i][t] - logp[i][t]
            s += surr + beta * (math.exp(lr) - lr - 1)
            n += 1
        total, count = total + s, count + n
        per_seq.append(s / n)
    return total / count if normalise == "token" else sum(per_seq) / B


@pytest.mark.parametrize("normalise", ["token", "sequence"])
def test_grpo_loss_by_hand(normalise):
    rng = np.random.default_rng(0)
    B, T, G = 4, 5, 2
    old = rng.normal(-2, 0.5, (B, T))
    logp = old + rng.normal(0, 0.3, (B, T))  # some ratios beyond 1 +- 0.2
    ref = old + rng.normal(0, 0.2, (B, T))
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    rewards = [1.0, 0.0, 0.2, 0.7]
    want = _grpo_by_hand(logp.tolist(), old.tolist(), ref.tolist(), rewards, mask.tolist(), G, 0.2, 0.04, normalise)
    loss, metrics = L.grpo_loss(jnp.asarray(logp, jnp.float32), jnp.asarray(old, jnp.float32),
                                jnp.asarray(ref, jnp.float32), jnp.asarray(rewards), jnp.asarray(mask), G, 0.2,
                                0.04, normalise)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    ratio = np.exp(logp - old)
    assert 0 < float(metrics["clip_fraction"]) < 1
    # the clipped share by hand: rho outside [0.8, 1.2] on the side where the advantage pushes further
    adv = np.repeat(np.asarray(L.group_advantages(jnp.asarray(rewards), G)), T).reshape(B, T)
    clip = ((ratio > 1.2) & (adv > 0)) | ((ratio < 0.8) & (adv < 0))
    assert float(metrics["clip_fraction"]) == pytest.approx(clip[mask > 0].mean(), rel=1e-6)


def test_token_vs_sequence_normalisation_weighs_lengths_differently():
    per_token = jnp.array([[1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 1], [1, 0, 0, 0]])
    s, n = L.normalised_sum(per_token, mask, "token")
    assert float(s / n) == pytest.approx((4 + 3) / 5)
    s, n = L.normalised_sum(per_token, mask, "sequence")
    assert float(s / n) == pytest.approx((1 + 3) / 2)


def test_entropy_from_logits():
    np.testing.assert_allclose(L.entropy_from_logits(jnp.zeros((2, 4))), [math.log(4)] * 2, rtol=1e-6)
    p = np.array([0.7, 0.2, 0.1])
    np.testing.assert_allclose(L.entropy_from_logits(jnp.log(jnp.asarray(p))), -(p * np.log(p)).sum(), rtol=1e-5)
