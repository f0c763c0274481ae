"""PPO (`train.objective=ppo`): proximal policy optimisation with a value head, on GRPO's rollouts.

The model is the causal-LM family's decoder plus a value head `score` [D, 1] on the final-norm hidden
states (`ValueDecoder`: the reward model's `ScoredDecoder` with the head starting at zero, so the first
values are 0), one set of parameters trained jointly by one optimizer (with LoRA the head is trained
whole alongside the adapters, as every head with the `score` axis: `llmjax.post.lora.WHOLE_AXES`).
The value of position t is read where the policy predicts target t, so values line up with the
log-probabilities.

One train step is one rollout batch: the prompts of step k are sampled, scored and packed exactly as
GRPO's (`llmjax.post.rl.rollout.Rollouts.rollouts`: same keys per (seed, step, row), same reward
function or reward model, same frozen reference), then `ppo_targets` forms per-token rewards (the
sequence reward at the last response token, minus kl_coef x k1(policy, reference) on every response
token), GAE advantages and returns (`rl.gamma`, `rl.lam`; 0 after the stop token) and whitens the
advantages over the batch (`rl.whiten`). Inside the one jitted step (`make_train_step`) the batch is
used for `rl.ppo_epochs` passes of `rl.minibatches` optimizer updates each, the rows of each pass in a
permutation drawn from the step's key (the seed's key folded with the step); each update minimises the
clipped surrogate + `rl.value_coef` x the clipped value loss (`rl.value_clip`), per response token.
The optimizer's schedule counts updates (train.steps x epochs x minibatches). With `rl.kl_target` the
KL coefficient adapts after each rollout batch to its measured k1 per token (Ziegler et al. 2019,
`losses.adaptive_kl_coef`, horizon `rl.kl_horizon` rollouts); it is kept in the prompt iterator's
checkpointed state, so a resumed run continues with the same coefficient bit for bit.

Logged per step: loss, policy_loss, value_loss (means over the updates), clip_fraction, approx_kl (k3 of
the rollout policy to the updated one), value_clip_fraction, and of the rollouts: reward mean/std, kl
(k1 per response token to the reference, what the penalty and the controller use), kl_coef, entropy,
explained_variance (of the returns by the rollout values), response_length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from llmjax.config import Config
from llmjax.models.families.base import LMBatch, ModelFamily, Sums, forward
from llmjax.models.layers import logical_init
from llmjax.parallel.rules import constrain
from llmjax.post.rl.grpo import GroupRelative
from llmjax.post.rl.losses import adaptive_kl_coef, clipped_value_loss, gae, kl_k1, kl_k3, ppo_surrogate
from llmjax.post.rl.reward import HEAD, ScoredDecoder
from llmjax.post.rl.rollout import Rollouts
from llmjax.train.step import PARAMS_KEY, TrainState, batch_gradients

if TYPE_CHECKING:
    pass

SEQ = ("inputs", "targets", "segment_ids", "positions")
PPO_KEY = 0x50_50  # folded into the step's key for the minibatch permutations


class ValueDecoder(ScoredDecoder):
    """`ScoredDecoder` whose head (the value head) starts at zero."""

    def setup(self) -> None:
        nn.share_scope(self, self.decoder)
        self.score = self.param(HEAD, logical_init(nn.initializers.zeros_init(), ("embed", "score")),
                                (self.d_model, 1), self.param_dtype)


@struct.dataclass
class PPOBatch:
    """Rollouts after their prompts, [B, L] each (`LMBatch`'s fields, `weights` 1 on the response tokens), the
    rollout policy's and the reference's log-probabilities, the rollout policy's entropy and values, the GAE
    advantages (whitened) and returns; per row [B, 1] the sequence reward and the KL coefficient used."""

    inputs: jax.Array
    targets: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    weights: jax.Array
    old_logp: jax.Array
    ref_logp: jax.Array
    entropy: jax.Array
    old_values: jax.Array
    advantages: jax.Array
    returns: jax.Array
    rewards: jax.Array
    kl_coef: jax.Array

    FIELDS: ClassVar[dict[str, Any]] = {**{k: np.int32 for k in SEQ}, **{k: np.float32 for k in (
        "weights", "old_logp", "ref_logp", "entropy", "old_values", "advantages", "returns", "rewards", "kl_coef")}}
    ROW_FIELDS: ClassVar[tuple[str, ...]] = ("rewards", "kl_coef")

    def sequences(self) -> LMBatch:
        return LMBatch(**{k: getattr(self, k) for k in SEQ}, weights=self.weights)


def ppo_targets(rewards: np.ndarray, old_logp: np.ndarray, ref_logp: np.ndarray, values: np.ndarray,
                mask: np.ndarray, kl_coef: float, gamma: float, lam: float, whiten: bool = True
                ) -> dict[str, np.ndarray]:
    """PPO's per-token targets of B rollouts over T positions (float32 numpy [B, T] but `rewards` [B]; `mask` 1
    on each row's response tokens, one contiguous run): "token_rewards" = -kl_coef k1(old, ref) on every response
    token + the sequence reward on its last one; "advantages" (GAE, whitened over the batch's response tokens
    when `whiten`), "returns" (advantages before whitening + values); all 0 off the mask."""
    m = mask.astype(np.float32)
    last = m.shape[1] - 1 - np.argmax(m[:, ::-1] > 0, axis=1)  # each row's last response position
    final = np.zeros_like(m)
    final[np.arange(len(m)), last] = np.where(m.sum(1) > 0, rewards, 0.0)
    token_rewards = (-kl_coef * np.asarray(kl_k1(jnp.asarray(old_logp), jnp.asarray(ref_logp))) * m + final)
    adv, returns = (np.asarray(x) for x in gae(jnp.asarray(token_rewards, jnp.float32),
                                               jnp.asarray(values * m, jnp.float32), jnp.asarray(m), gamma, lam))
    if whiten:
        n = max(float(m.sum()), 1.0)
        mean = float((adv * m).sum()) / n
        std = float(np.sqrt(((adv - mean) ** 2 * m).sum() / n))
        adv = (adv - mean) / (std + 1e-8) * m
    return {"token_rewards": token_rewards.astype(np.float32), "advantages": adv.astype(np.float32),
            "returns": returns.astype(np.float32)}


class PPOFamily:
    """The family contract for PPO over `family` (a causal LM) with a value head; unknown attributes are the
    family's."""

    batch_type = PPOBatch

    def __init__(self, family: ModelFamily, cfg: Config):
        self.family, self.rl = family, cfg.rl
        self.updates_per_step = cfg.rl.ppo_epochs * cfg.rl.minibatches

    def __getattr__(self, name: str) -> Any:
        return getattr(self.family, name)

    def module(self, pipeline: Any = None) -> nn.Module:
        return ValueDecoder(self.family.module(pipeline), self.family.cfg.d_model,
                            jnp.dtype(self.family.cfg.param_dtype))

    def example_shapes(self, seq_len: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        return {k: ((1,) if k in PPOBatch.ROW_FIELDS else (seq_len,), dt) for k, dt in PPOBatch.FIELDS.items()}

    def values(self, model: nn.Module, params: Any, seqs: LMBatch, rng: jax.Array | None = None) -> jax.Array:
        """[B, L] float32 value head at every input position."""
        return forward(model, params, seqs.inputs, seqs.segment_ids, seqs.positions, rng=rng, return_score=True)[0]

    def loss(self, model: Any, params: Any, batch: PPOBatch, z_loss: float, rng: jax.Array | None = None
             ) -> tuple[jax.Array, Sums]:
        """-> (sum over response tokens of weights x (clipped surrogate + value_coef x clipped value loss), metric
        sums)."""
        seqs = batch.sequences()
        nll, _, _ = self.family.token_losses(model, params, seqs, rng)
        logp, values = -nll, self.values(model, params, seqs, rng)
        surrogate, clipped = ppo_surrogate(logp, batch.old_logp, batch.advantages, self.rl.clip_eps)
        vloss = clipped_value_loss(values, batch.old_values, batch.returns, self.rl.value_clip)
        w = batch.weights
        mask = (w > 0).astype(jnp.float32)
        v_clipped = (jnp.abs(values - batch.old_values) > self.rl.value_clip).astype(jnp.float32)
        policy, value = jnp.sum(w * surrogate), jnp.sum(w * vloss)
        total = policy + self.rl.value_coef * value
        return total, {"loss_sum": total, "policy_sum": policy, "value_sum": value, "token_sum": jnp.sum(mask),
                       "clip_sum": jnp.sum(clipped * mask), "value_clip_sum": jnp.sum(v_clipped * mask),
                       "approx_kl_sum": jnp.sum(kl_k3(logp, batch.old_logp) * mask)}

    def metrics(self, sums: Sums, total_weight: jax.Array) -> dict[str, jax.Array]:
        """loss, policy_loss, value_loss (per token), clip_fraction, value_clip_fraction, approx_kl."""
        n = jnp.maximum(sums["token_sum"], 1.0)
        return {"loss": sums["loss_sum"] / total_weight, "policy_loss": sums["policy_sum"] / total_weight,
                "value_loss": sums["value_sum"] / total_weight, "clip_fraction": sums["clip_sum"] / n,
                "value_clip_fraction": sums["value_clip_sum"] / n, "approx_kl": sums["approx_kl_sum"] / n}

    @staticmethod
    def rollout_metrics(batch: PPOBatch) -> dict[str, jax.Array]:
        """Of the step's rollouts: reward (mean) and reward_std over rows, kl (k1 to the reference per response
        token), kl_coef, entropy, explained_variance (1 - Var(returns - values) / Var(returns) over the response
        tokens; 0 when the returns do not vary), response_length."""
        mask = (batch.weights > 0).astype(jnp.float32)
        n = jnp.maximum(jnp.sum(mask), 1.0)
        rows = (jnp.sum(mask, axis=1) > 0).astype(jnp.float32)
        nr = jnp.maximum(jnp.sum(rows), 1.0)
        r = batch.rewards[:, 0]
        mean = jnp.sum(r * rows) / nr

        def var(x: jax.Array) -> jax.Array:
            mu = jnp.sum(x * mask) / n
            return jnp.sum(jnp.square(x - mu) * mask) / n

        return {"reward": mean, "reward_std": jnp.sqrt(jnp.maximum(jnp.sum(r * r * rows) / nr - mean * mean, 0.0)),
                "kl": jnp.sum(kl_k1(batch.old_logp, batch.ref_logp) * mask) / n, "kl_coef": batch.kl_coef[0, 0],
                "entropy": jnp.sum(batch.entropy * mask) / n,
                "explained_variance": jnp.where(var(batch.returns) > 0, 1.0 - var(batch.returns - batch.old_values)
                                                / jnp.maximum(var(batch.returns), 1e-30), 0.0),
                "response_length": jnp.sum(mask) / nr}

    def make_train_step(self, model: nn.Module, tx: optax.GradientTransformation, z_loss: float, accum_steps: int,
                        model_params: Any = None) -> Callable[[TrainState, PPOBatch], tuple[TrainState, dict]]:
        """train_step(state, rollout batch) -> (state, metrics): rl.ppo_epochs x rl.minibatches optimizer updates
        (module docstring); the updates' metrics are their means ("tokens": the tokens trained on, summed)."""
        E, M = self.rl.ppo_epochs, self.rl.minibatches

        def train_step(state: TrainState, batch: PPOBatch) -> tuple[TrainState, dict]:
            B = batch.weights.shape[0]
            mb = B // M
            key = jax.random.fold_in(state.rng, state.step)
            perm_key = jax.random.fold_in(key, PPO_KEY)
            rng = key if self.family.uses_rng else None
            params_rng = jax.random.fold_in(key, PARAMS_KEY) if model_params is not None else None

            def fold(k: jax.Array | None, i: jax.Array) -> jax.Array | None:
                return None if k is None else jax.random.fold_in(k, i)

            def update(carry: tuple[Any, Any], i: jax.Array) -> tuple[tuple[Any, Any], dict]:
                params, opt_state = carry
                perm = jax.random.permutation(jax.random.fold_in(perm_key, i // M), B)
                idx = jax.lax.dynamic_slice(perm, ((i % M) * mb,), (mb,))
                minibatch = jax.tree.map(lambda x: constrain(jnp.take(x, idx, axis=0),
                                                             ("act_batch", *([None] * (x.ndim - 1)))), batch)
                grads, metrics = batch_gradients(self, model, params, minibatch, z_loss, accum_steps, fold(rng, i),
                                                 state.frozen, model_params, fold(params_rng, i))
                updates, opt_state = tx.update(grads, opt_state, params)
                metrics["grad_norm"] = optax.tree.norm(grads)
                return (optax.apply_updates(params, updates), opt_state), metrics

            (params, opt_state), per_update = jax.lax.scan(update, (state.params, state.opt_state),
                                                           jnp.arange(E * M))
            metrics = {k: jnp.mean(v) for k, v in per_update.items()}
            metrics.update(tokens=jnp.sum(per_update["tokens"]), param_norm=optax.tree.norm(params),
                           **self.rollout_metrics(batch))
            return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

        return train_step

    def eval_sums(self, model: Any, params: Any, batch: PPOBatch) -> Sums:
        _, sums = self.loss(model, params, batch, 0.0)
        return {**sums, "weight_sum": jnp.sum(batch.weights)}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        return {"eval_loss": sums["loss_sum"] / max(sums["weight_sum"], 1.0)}


class PPORollouts(Rollouts):
    """GRPO's rollouts plus the rollout policy's values, turned into PPO's batch (`ppo_targets`); the KL
    coefficient lives on the prompt iterator (checkpointed) and adapts after each batch with rl.kl_target."""

    def score_fn(self) -> Callable[..., tuple[jax.Array, ...]]:
        base, fam = super().score_fn(), self.setup.family
        model = fam.module()

        def score(params: Any, ref: Any, batch: Any) -> tuple[jax.Array, ...]:
            return (*base(params, ref, batch), fam.values(model, params, batch.sequences()))

        return score

    def next_batch(self) -> Any:
        rl = self.cfg.rl
        r = self.rollouts()
        rows = r["rows"]
        mask = rows["weights"]
        coef = rl.kl_coef if self.iterator.kl_coef is None else self.iterator.kl_coef
        t = ppo_targets(r["rewards"], r["old_logp"], r["ref_logp"], r["scores"][3], mask, coef, rl.gamma, rl.lam,
                        rl.whiten)
        if rl.kl_target is not None:  # the coefficient of the next rollout batch
            kl = float((kl_k1(r["old_logp"], r["ref_logp"]) * mask).sum() / max(mask.sum(), 1.0))
            self.iterator.kl_coef = adaptive_kl_coef(coef, kl, rl.kl_target, len(mask), rl.kl_horizon)
        B = len(mask)
        return self.put_global({**{k: rows[k] for k in SEQ}, "weights": mask.astype(np.float32),
                                "old_logp": r["old_logp"], "ref_logp": r["ref_logp"], "entropy": r["entropy"],
                                "old_values": (r["scores"][3] * mask).astype(np.float32),
                                "advantages": t["advantages"], "returns": t["returns"],
                                "rewards": r["rewards"][:, None].astype(np.float32),
                                "kl_coef": np.full((B, 1), coef, np.float32)})


class ProximalPolicy(GroupRelative):
    """`ppo` in `llmjax.train.objectives.OBJECTIVES` (module docstring): GRPO's prompts, checks and rollouts,
    with PPO's family (value head, its own step) and PPO's targets."""

    name = "ppo"

    def wrap_family(self, family: ModelFamily, cfg: Config) -> ModelFamily:
        return PPOFamily(family, cfg)  # type: ignore[return-value]  # the family contract

    def rollouts(self) -> type:
        return PPORollouts
