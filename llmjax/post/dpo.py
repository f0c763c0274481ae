"""Direct preference optimisation as a training objective layered over a causal-LM family (`train.objective=dpo`).

`PreferenceObjective(family, dpo)` presents the model-family contract that `train.step` and the
trainer call (batch type, loss as sums, metrics, evaluation sums), so nothing generic branches
on the objective; everything else (module, decoding, FLOPs) is the wrapped family's.

Per pair, with the policy's and the reference model's summed log-probabilities of the chosen
and rejected responses (pi_c, pi_r, ref_c, ref_r: over the response tokens only) and
h = (pi_c - ref_c) - (pi_r - ref_r):
  sigmoid (DPO, Rafailov et al. 2023):  loss = -log sigmoid(beta h)
  ipo (Azar et al. 2023):               loss = (h - 1 / (2 beta))^2
The implicit rewards are beta (pi - ref); logged: their mean for each side, the margin
(chosen - rejected) and the accuracy (the share of pairs whose chosen reward is higher).
As beta -> 0 the sigmoid loss tends to log 2 - beta h / 2, so its gradient is beta / 2 times
that of the log-likelihood ratio h: a vanishing push towards the chosen response.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from llmjax.config import Config, ConfigError
from llmjax.config.post_training import DPOConfig
from llmjax.models.families.base import LMBatch, ModelFamily, Sums
from llmjax.models.feedforward import aux_loss_terms, aux_metrics
from llmjax.train.objectives import host_batches

if TYPE_CHECKING:
    from llmjax.data.tokenizers.tokenizer import Tokenizer
    from llmjax.train.objectives import RunData

SEQUENCE_FIELDS = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32, "positions": np.int32,
                   "weights": np.float32}


@struct.dataclass
class PreferenceBatch:
    """A batch of preference pairs: `chosen_*` / `rejected_*` as `LMBatch`'s fields ([B, L]; weights 1 on the
    response's target tokens), `weights` [B, 1] (1: a pair, 0: padding), `ref_chosen` / `ref_rejected` [B, 1]
    the reference model's summed response log-probabilities (`llmjax.data.post.preference_data`)."""

    chosen_inputs: jax.Array
    chosen_targets: jax.Array
    chosen_segment_ids: jax.Array
    chosen_positions: jax.Array
    chosen_weights: jax.Array
    rejected_inputs: jax.Array
    rejected_targets: jax.Array
    rejected_segment_ids: jax.Array
    rejected_positions: jax.Array
    rejected_weights: jax.Array
    weights: jax.Array
    ref_chosen: jax.Array
    ref_rejected: jax.Array

    FIELDS: ClassVar[dict[str, Any]] = {**{f"{s}_{k}": v for s in ("chosen", "rejected")
                                           for k, v in SEQUENCE_FIELDS.items()},
                                        "weights": np.float32, "ref_chosen": np.float32, "ref_rejected": np.float32}

    def sequences(self) -> LMBatch:
        """Chosen rows then rejected rows as one [2B, L] LMBatch (one forward pass for both)."""
        return LMBatch(**{k: jnp.concatenate([getattr(self, f"chosen_{k}"), getattr(self, f"rejected_{k}")])
                          for k in SEQUENCE_FIELDS})


def dpo_losses(pi_c: jax.Array, pi_r: jax.Array, ref_c: jax.Array, ref_r: jax.Array, beta: float, kind: str
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per pair [B]: (loss, chosen reward, rejected reward) from summed log-probabilities (module docstring)."""
    h = (pi_c - ref_c) - (pi_r - ref_r)
    if kind == "ipo":
        loss = jnp.square(h - 1.0 / (2.0 * beta))
    else:
        loss = -jax.nn.log_sigmoid(beta * h)
    return loss, beta * (pi_c - ref_c), beta * (pi_r - ref_r)


class PairObjective:
    """The family contract's shared part for a loss over preference pairs (`PreferenceBatch`) on a causal LM
    `family`: the pair batch's shapes, two sequences per example, the loss and evaluation sums from `_sums`
    (defined by the subclass: DPO here, the reward model's Bradley-Terry loss in `llmjax.post.rl.reward`);
    unknown attributes are the family's."""

    batch_type = PreferenceBatch

    def __init__(self, family: ModelFamily):
        self.family = family

    def __getattr__(self, name: str) -> Any:
        return getattr(self.family, name)

    def example_shapes(self, seq_len: int) -> dict[str, tuple[tuple[int, ...], Any]]:
        return {k: ((1,) if k in ("weights", "ref_chosen", "ref_rejected") else (seq_len,), dt)
                for k, dt in PreferenceBatch.FIELDS.items()}

    def tokens_per_example(self, seq_len: int) -> int:
        return 2 * seq_len  # a chosen and a rejected sequence

    def _sums(self, model: Any, params: Any, batch: PreferenceBatch, rng: jax.Array | None
              ) -> tuple[jax.Array, Sums, dict, jax.Array]:
        """(summed loss over pairs, metric sums, feed-forward aux, pair weights [B])."""
        raise NotImplementedError

    def loss(self, model: Any, params: Any, batch: PreferenceBatch, z_loss: float, rng: jax.Array | None = None
             ) -> tuple[jax.Array, Sums]:
        """-> (sum over pairs of the pair loss + the feed-forward kinds' weighted aux losses, metric sums).
        `z_loss` does not apply (no token-level cross-entropy is trained)."""
        total, sums, aux, w = self._sums(model, params, batch, rng)
        if aux:
            extra, aux_sums = aux_loss_terms(self.cfg, aux, jnp.sum(w))
            total, sums = total + extra, {**sums, **aux_sums}
        return total, sums

    def eval_sums(self, model: Any, params: Any, batch: PreferenceBatch) -> Sums:
        _, sums, _, w = self._sums(model, params, batch, None)
        return {**sums, "weight_sum": jnp.sum(w)}


class PreferenceObjective(PairObjective):
    """The family contract for DPO over `family` (a causal LM)."""

    def __init__(self, family: ModelFamily, dpo: DPOConfig):
        super().__init__(family)
        self.dpo = dpo

    def logprobs(self, model: Any, params: Any, batch: PreferenceBatch, rng: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array, dict]:
        """(chosen [B], rejected [B] summed response log-probabilities under `params`, feed-forward aux)."""
        seqs = batch.sequences()
        nll_BL, _, aux = self.family.token_losses(model, params, seqs, rng)
        logp = -jnp.sum(nll_BL * seqs.weights, axis=1)
        B = batch.weights.shape[0]
        return logp[:B], logp[B:], aux

    def reference_logprobs(self, model: Any, params: Any, batch: PreferenceBatch) -> jax.Array:
        """[B, 2]: (chosen, rejected) log-probabilities of the starting model (cached by the data)."""
        pc, pr, _ = self.logprobs(model, params, batch)
        return jnp.stack([pc, pr], axis=1)

    def _sums(self, model: Any, params: Any, batch: PreferenceBatch, rng: jax.Array | None
              ) -> tuple[jax.Array, Sums, dict, jax.Array]:
        pc, pr, aux = self.logprobs(model, params, batch, rng)
        w = batch.weights[:, 0]
        loss, rc, rr = dpo_losses(pc, pr, batch.ref_chosen[:, 0], batch.ref_rejected[:, 0], self.dpo.beta,
                                  self.dpo.loss)
        total = jnp.sum(w * loss)
        sums = {"dpo_sum": total, "chosen_reward_sum": jnp.sum(w * rc), "rejected_reward_sum": jnp.sum(w * rr),
                "accuracy_sum": jnp.sum(w * (rc > rr)), "chosen_logp_sum": jnp.sum(w * pc)}
        return total, sums, aux, w

    def metrics(self, sums: Sums, total_weight: jax.Array) -> dict[str, jax.Array]:
        """loss (mean DPO loss per pair), reward_chosen / reward_rejected / reward_margin (means), reward_accuracy,
        chosen_logp (mean summed log-probability of the chosen responses)."""
        n = total_weight
        chosen, rejected = sums["chosen_reward_sum"] / n, sums["rejected_reward_sum"] / n
        return {"loss": sums["dpo_sum"] / n, "reward_chosen": chosen, "reward_rejected": rejected,
                "reward_margin": chosen - rejected, "reward_accuracy": sums["accuracy_sum"] / n,
                "chosen_logp": sums["chosen_logp_sum"] / n, **aux_metrics(self.cfg, sums, n)}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """eval_loss (mean DPO loss per pair), eval_reward_margin, eval_reward_accuracy."""
        n = max(sums["weight_sum"], 1.0)
        return {"eval_loss": sums["dpo_sum"] / n,
                "eval_reward_margin": (sums["chosen_reward_sum"] - sums["rejected_reward_sum"]) / n,
                "eval_reward_accuracy": sums["accuracy_sum"] / n}


class DirectPreference:
    """`dpo` in `llmjax.train.objectives.OBJECTIVES`: the preference loss over a causal LM, on preference
    pairs (`llmjax.data.post.preference_data`) with the starting model's log-probabilities as reference."""

    name = "dpo"
    language_modelling = False  # bits per byte and `llmjax eval` measure language modelling, not pairs

    def check(self, cfg: Config) -> None:
        if not cfg.model.causal_lm:
            raise ConfigError(f"train.objective=dpo needs a causal language model; model.family={cfg.model.family} "
                              "is not")

    def wrap_family(self, family: ModelFamily, cfg: Config) -> ModelFamily:
        return PreferenceObjective(family, cfg.dpo)  # type: ignore[return-value]  # the family contract

    def open_data(self, cfg: Config, family: ModelFamily, block: int = 0, process_count: int = 1,
                  tokenizer: Tokenizer | None = None, shares: int | None = None) -> RunData:
        from llmjax.data.post.preference_data import PreferenceData

        return PreferenceData(cfg, block, process_count, tokenizer)

    def prepare(self, data: RunData, workdir: Any, reference: Callable[[], Any] | None,
                log: Callable[[str], None]) -> None:
        """Load or compute the reference log-probabilities (`PreferenceData.prepare`)."""
        data.prepare(workdir, reference() if reference is not None else None, log)  # type: ignore[attr-defined]  # PreferenceData's

    batches = staticmethod(host_batches)
