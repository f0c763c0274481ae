"""GRPO (`train.objective=grpo`): group-relative policy optimisation with rollouts on the device decoder.

Each step k: the prompts of step k (`rl.prompts`, train.batch_size / rl.samples_per_prompt of them,
in a seeded order per epoch) are each sampled `rl.samples_per_prompt` times with the current policy
(`llmjax.post.rl.rollout`: prefill + a jitted while_loop, temperature / top-p, a key per row
derived from (seed, k), so a resumed run draws the same rollouts); the responses are scored
(`rl.reward_fn` or `rl.reward_model`); the sampling policy's and the reference's log-probabilities
of the response tokens are computed once (the reference: the starting model; with LoRA the frozen
base, no second copy); the batch (`RolloutBatch`) then goes through the ordinary train step, whose
loss is `GRPOFamily.loss`: the clipped surrogate with group-normalised advantages plus
rl.kl_coef k3 to the reference (`llmjax.post.rl.losses`), normalised per token (default) or per
sequence through the batch's `weights`. Logged per step: loss, reward mean/std, KL, entropy of the
sampling policy, clip fraction, approx-KL, response length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from llmjax.config import Config, ConfigError
from llmjax.models.families.base import LMBatch, ModelFamily, Sums
from llmjax.post.rl.losses import kl_k3, ppo_surrogate

if TYPE_CHECKING:
    from llmjax.data.tokenizers.tokenizer import Tokenizer
    from llmjax.train.objectives import RunData

SEQ = ("inputs", "targets", "segment_ids", "positions")


@struct.dataclass
class RolloutBatch:
    """Sampled responses after their prompts, [B, L] each (`LMBatch`'s fields; `weights` > 0 on the response
    tokens: 1 per token, or 1 / length per-sequence), the sampling policy's and the reference's
    log-probabilities of each target [B, L], the sampling policy's entropy [B, L], and per row the advantage
    and the reward [B, 1]."""

    inputs: jax.Array
    targets: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    weights: jax.Array
    old_logp: jax.Array
    ref_logp: jax.Array
    entropy: jax.Array
    advantages: jax.Array
    rewards: jax.Array

    FIELDS: ClassVar[dict[str, Any]] = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32,
                                        "positions": np.int32, "weights": np.float32, "old_logp": np.float32,
                                        "ref_logp": np.float32, "entropy": np.float32, "advantages": np.float32,
                                        "rewards": np.float32}

    def sequences(self) -> LMBatch:
        return LMBatch(**{k: getattr(self, k) for k in SEQ}, weights=self.weights)


class GRPOFamily:
    """The family contract for GRPO over `family` (a causal LM); unknown attributes are the family's."""

    batch_type = RolloutBatch

    def __init__(self, family: ModelFamily, cfg: Config):
        self.family, self.rl = family, cfg.rl

    def __getattr__(self, name: str) -> Any:
        return getattr(self.family, name)

    def example_shapes(self, seq_len: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        return {k: ((1,) if k in ("advantages", "rewards") else (seq_len,), dt)
                for k, dt in RolloutBatch.FIELDS.items()}

    def _sums(self, model: Any, params: Any, batch: RolloutBatch, rng: jax.Array | None) -> tuple[jax.Array, Sums]:
        nll, _, aux = self.family.token_losses(model, params, batch.sequences(), rng)
        logp = -nll
        surrogate, clipped = ppo_surrogate(logp, batch.old_logp, batch.advantages, self.rl.clip_eps)
        kl = kl_k3(logp, batch.ref_logp)
        w = batch.weights
        mask = (w > 0).astype(jnp.float32)
        total = jnp.sum(w * (surrogate + self.rl.kl_coef * kl))
        rows = (jnp.sum(mask, axis=1) > 0).astype(jnp.float32)
        r = batch.rewards[:, 0]
        return total, {"policy_sum": total, "token_sum": jnp.sum(mask), "clip_sum": jnp.sum(clipped * mask),
                       "kl_sum": jnp.sum(kl * mask), "approx_kl_sum": jnp.sum(kl_k3(logp, batch.old_logp) * mask),
                       "entropy_sum": jnp.sum(batch.entropy * mask), "row_sum": jnp.sum(rows),
                       "reward_sum": jnp.sum(r * rows), "reward_sq_sum": jnp.sum(r * r * rows)}

    def loss(self, model: Any, params: Any, batch: RolloutBatch, z_loss: float, rng: jax.Array | None = None
             ) -> tuple[jax.Array, Sums]:
        """-> (sum over response tokens of weights x (clipped surrogate + kl_coef k3), metric sums)."""
        return self._sums(model, params, batch, rng)

    def metrics(self, sums: Sums, total_weight: jax.Array) -> dict[str, jax.Array]:
        """loss, reward (mean) and reward_std over the rollouts, kl (k3 to the reference, per token), entropy,
        clip_fraction, approx_kl (to the sampling policy), response_length (tokens, stop token included)."""
        n, rows = jnp.maximum(sums["token_sum"], 1.0), jnp.maximum(sums["row_sum"], 1.0)
        mean = sums["reward_sum"] / rows
        return {"loss": sums["policy_sum"] / total_weight, "reward": mean,
                "reward_std": jnp.sqrt(jnp.maximum(sums["reward_sq_sum"] / rows - mean * mean, 0.0)),
                "kl": sums["kl_sum"] / n, "entropy": sums["entropy_sum"] / n, "clip_fraction": sums["clip_sum"] / n,
                "approx_kl": sums["approx_kl_sum"] / n, "response_length": sums["token_sum"] / rows}

    def eval_sums(self, model: Any, params: Any, batch: RolloutBatch) -> Sums:
        _, sums = self._sums(model, params, batch, None)
        return {**sums, "weight_sum": jnp.sum(batch.weights)}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        rows = max(sums["row_sum"], 1.0)
        return {"eval_reward": sums["reward_sum"] / rows}


class GroupRelative:
    """`grpo` in `llmjax.train.objectives.OBJECTIVES` (module docstring); `ppo`'s objective extends it."""

    name = "grpo"
    language_modelling = False

    def check(self, cfg: Config) -> None:
        if cfg.eval.every_steps > 0 and cfg.data.validation_fraction <= 0:
            raise ConfigError(f"eval.every_steps: train.objective={self.name} evaluates on held-out prompts "
                              "(data.validation_fraction of rl.prompts), and data.validation_fraction=0 holds none "
                              "out; raise it or set eval.every_steps=0")

    def wrap_family(self, family: ModelFamily, cfg: Config) -> ModelFamily:
        return GRPOFamily(family, cfg)  # type: ignore[return-value]  # the family contract

    def open_data(self, cfg: Config, family: ModelFamily, block: int = 0, process_count: int = 1,
                  tokenizer: Tokenizer | None = None, shares: int | None = None) -> RunData:
        from llmjax.post.rl.rollout import PromptData, check_processes

        check_processes(cfg, process_count)
        return PromptData(cfg, tokenizer)

    def prepare(self, data: RunData, workdir: Any, reference: Callable[[], Any] | None,
                log: Callable[[str], None]) -> None:
        return None

    def batches(self, setup: Any, data: RunData, iterator: Any, run: Any, log: Callable[[str], None]
                ) -> Callable[[], Any]:
        """The next step's batch: rollouts of the current policy (`run.state`), scored (module docstring)."""
        return self.rollouts()(setup, data, iterator, run, log).next_batch

    def rollouts(self) -> type:
        """The rollout source of this objective (PPO's adds values and its targets)."""
        from llmjax.post.rl.rollout import Rollouts

        return Rollouts
