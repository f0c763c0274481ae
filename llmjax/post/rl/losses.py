"""The math of RLHF as pure functions (jnp, float32; no model, no mesh): reward-model, PPO and GRPO losses.

Shapes: B sequences (rollouts or preference pairs), T response positions. `mask` [B, T] is 1 on the
response tokens a loss counts and 0 on padding (after the stop token, or beyond `rl.max_new_tokens`).
Log-probabilities are those of the sampled tokens: `logp` under the policy being trained, `old_logp`
under the policy that sampled the rollout (the behaviour policy, constant), `ref_logp` under the frozen
reference (the starting model).

- Reward model (Bradley & Terry 1952; Ouyang et al. 2022): loss = -log sigmoid(r_chosen - r_rejected - m)
  with an optional margin m (Touvron et al. 2023, Llama 2).
- PPO (Schulman et al. 2017): ratio rho = exp(logp - old_logp); per token
  loss = -min(rho A, clip(rho, 1 - eps, 1 + eps) A) = max(-rho A, -clip(rho) A). The clipped branch
  is the active one (its gradient zero) when rho > 1 + eps with A > 0 or rho < 1 - eps with A < 0:
  `clip_fraction` counts those tokens. Value loss: 0.5 max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2).
- GAE (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t (V = 0 after the last response token),
  A_t = delta_t + gamma lambda A_{t+1}; returns R_t = A_t + V_t.
- KL estimators of KL(pi || ref) from samples of pi (Schulman 2020, "Approximating KL divergence"), with
  log r = ref_logp - logp: k1 = -log r (unbiased, can be negative: the per-token KL penalty in the reward),
  k3 = (r - 1) - log r (unbiased, >= 0, low variance: GRPO's KL term in the loss).
- Adaptive KL coefficient (Ziegler et al. 2019): e = clip(KL / target - 1, -0.2, 0.2),
  beta <- beta (1 + e n / horizon) after n rollouts' worth of steps.
- GRPO (Shao et al. 2024, DeepSeekMath): no critic; a group of G samples of one prompt gets the
  advantage A_i = (r_i - mean(r)) / (std(r) + eps) (std with ddof 1, as torch.std; needs G >= 2),
  the same for every token of sample i, and the clipped surrogate plus kl_coef k3.

Normalisation of a token loss over a batch (`normalise`): "token" divides the sum over all response
tokens of the batch by their number (DAPO, Yu et al. 2025; Dr. GRPO, Liu et al. 2025); "sequence"
averages each sequence's mean token loss (the original GRPO). The default is "token": under the
sequence mean a token of a long response weighs less than one of a short response, which biases
training towards long wrong answers (their penalty is diluted) and short right ones; the token sum is
also a plain sum with a count, so it adds up exactly over microbatches and data shards like every
other loss of the trainer.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Normalise = Literal["token", "sequence"]


def bradley_terry_loss(r_chosen: jax.Array, r_rejected: jax.Array, margin: jax.Array | float = 0.0) -> jax.Array:
    """[B] reward-model loss -log sigmoid(r_chosen - r_rejected - margin) per pair (rewards [B], margin scalar
    or [B])."""
    return -jax.nn.log_sigmoid(r_chosen - r_rejected - margin)


def kl_k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token k1 estimate of KL(pi || ref): logp - ref_logp (same shape as the inputs)."""
    return logp - ref_logp


def kl_k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """Per-token k3 estimate of KL(pi || ref): exp(ref_logp - logp) - (ref_logp - logp) - 1 (>= 0)."""
    log_r = ref_logp - logp
    return jnp.exp(log_r) - log_r - 1.0


def ppo_surrogate(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, clip_eps: float
                  ) -> tuple[jax.Array, jax.Array]:
    """Per-token clipped surrogate loss and whether its clipped branch is active ([B, T] each, float32).
    `advantages` [B, T] (PPO's GAE) or [B, 1] (GRPO's per sequence)."""
    ratio = jnp.exp(logp - old_logp)
    unclipped = -ratio * advantages
    clipped = -jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    active = ((ratio > 1.0 + clip_eps) & (advantages > 0)) | ((ratio < 1.0 - clip_eps) & (advantages < 0))
    return jnp.maximum(unclipped, clipped), active.astype(jnp.float32)


def clipped_value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, clip: float) -> jax.Array:
    """Per-token value loss 0.5 max((V - R)^2, (V_old + clip(V - V_old, -clip, clip) - R)^2) ([B, T])."""
    v_clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    return 0.5 * jnp.maximum(jnp.square(values - returns), jnp.square(v_clipped - returns))


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
        ) -> tuple[jax.Array, jax.Array]:
    """(advantages, returns) [B, T] by generalised advantage estimation over each row's response tokens
    (`mask` 1 on them, a prefix of the row); the value after the last response token is 0 (the episode ends).
    Padding positions get 0."""
    mask = mask.astype(jnp.float32)
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    deltas = (rewards + gamma * next_values * next_mask - values) * mask

    def back(carry: jax.Array, x: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        delta, m, nm = x
        adv = delta + gamma * lam * carry * nm
        return adv * m, adv * m

    _, adv_TB = jax.lax.scan(back, jnp.zeros(rewards.shape[0], jnp.float32),
                             (deltas.T, mask.T, next_mask.T), reverse=True)
    adv = adv_TB.T
    return adv, (adv + values) * mask


def adaptive_kl_coef(coef: float, kl: float, target: float, n_steps: int, horizon: int) -> float:
    """The next KL coefficient of the adaptive controller (module docstring): grows when the measured KL is
    above `target`, shrinks below it, by at most 20% x n_steps / horizon."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)


def group_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-6, scale: bool = True) -> jax.Array:
    """[N] GRPO advantages of rewards [N] whose consecutive runs of `group_size` (>= 2) are the samples of one
    prompt: reward minus its group's mean, divided by the group's std (ddof 1) + eps when `scale`."""
    if group_size < 2:
        raise ValueError(f"group_size={group_size}: a group needs at least 2 samples to normalise")
    g = rewards.reshape(-1, group_size)
    centred = g - jnp.mean(g, axis=1, keepdims=True)
    if scale:
        centred = centred / (jnp.std(g, axis=1, keepdims=True, ddof=1) + eps)
    return centred.reshape(-1)


def normalised_sum(per_token: jax.Array, mask: jax.Array, normalise: Normalise) -> tuple[jax.Array, jax.Array]:
    """(sum, count) whose ratio is the batch's loss: "token" -> (sum of masked tokens, number of tokens),
    "sequence" -> (sum over sequences of their mean token value, number of non-empty sequences)."""
    mask = mask.astype(jnp.float32)
    if normalise == "token":
        return jnp.sum(per_token * mask), jnp.sum(mask)
    n = jnp.sum(mask, axis=1)
    per_seq = jnp.sum(per_token * mask, axis=1) / jnp.maximum(n, 1.0)
    return jnp.sum(per_seq), jnp.sum((n > 0).astype(jnp.float32))


def policy_loss_sums(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None, advantages: jax.Array,
                     mask: jax.Array, clip_eps: float, kl_coef: float, normalise: Normalise = "token"
                     ) -> dict[str, jax.Array]:
    """Sums of the clipped-surrogate policy loss (+ kl_coef k3 to the reference when `ref_logp` is given and
    kl_coef > 0) and its diagnostics over a batch ([B, T] inputs, `advantages` [B, T] or [B, 1]):
    {"loss_sum", "count"} (loss = ratio, `normalise`), and per-token sums over the mask "clip_sum",
    "approx_kl_sum" (k3 of the behaviour policy to the current one), "kl_sum" (k3 to the reference),
    "token_sum" (the number of tokens)."""
    surrogate, active = ppo_surrogate(logp, old_logp, advantages, clip_eps)
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else jnp.zeros_like(logp)
    per_token = surrogate + kl_coef * kl if ref_logp is not None else surrogate
    loss_sum, count = normalised_sum(per_token, mask, normalise)
    m = mask.astype(jnp.float32)
    return {"loss_sum": loss_sum, "count": count, "clip_sum": jnp.sum(active * m),
            "approx_kl_sum": jnp.sum(kl_k3(logp, old_logp) * m), "kl_sum": jnp.sum(kl * m),
            "token_sum": jnp.sum(m)}


def grpo_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None, rewards: jax.Array,
              mask: jax.Array, group_size: int, clip_eps: float = 0.2, kl_coef: float = 0.04,
              normalise: Normalise = "token") -> tuple[jax.Array, dict[str, jax.Array]]:
    """GRPO's loss over rollouts [B, T] (B = prompts x group_size, a prompt's samples consecutive) with rewards
    [B]: (loss, metrics: clip_fraction, approx_kl, kl, advantage std)."""
    adv = group_advantages(rewards, group_size)
    sums = policy_loss_sums(logp, old_logp, ref_logp, adv[:, None], mask, clip_eps, kl_coef, normalise)
    n = jnp.maximum(sums["token_sum"], 1.0)
    return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0), {
        "clip_fraction": sums["clip_sum"] / n, "approx_kl": sums["approx_kl_sum"] / n, "kl": sums["kl_sum"] / n,
        "advantage_std": jnp.std(adv)}


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Per-position entropy [..., ] of the categorical distributions `logits` [..., V] (nats)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
