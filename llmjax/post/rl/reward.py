"""Reward models (`train.objective=reward`): a scalar head on a decoder, trained on preference pairs.

The model is the causal-LM family's decoder plus one parameter `score` [D, 1] (logical axes
(embed, score)) at the top of the parameter tree, next to the decoder's own (`ScoredDecoder` shares
the decoder's scope, so every decoder parameter keeps its path and `train.init_from` of an SFT or
imported run fills them; the head starts from the seed). The reward of a sequence is the head
applied to the final-norm hidden state of its last token (the last token of the rendered
conversation, i.e. the end of the response, as Hugging Face's `LlamaForSequenceClassification`
reads it). Training reads the DPO pair JSONL (`llmjax.data.post.preference_data`, the reference
fields unused) and minimises the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin)
(`reward.margin`); logged: loss, accuracy (share of pairs with r_chosen > r_rejected) and the
mean and std of each side's rewards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import Config, ConfigError
from llmjax.data.post.jsonl import where
from llmjax.data.post.preference_data import SIDES, PreferenceData
from llmjax.models.families.base import LMBatch, ModelFamily, Sums, forward
from llmjax.models.feedforward import aux_metrics
from llmjax.models.layers import logical_init
from llmjax.post.dpo import PairObjective, PreferenceBatch
from llmjax.post.rl.losses import bradley_terry_loss
from llmjax.train.objectives import host_batches

if TYPE_CHECKING:
    from llmjax.data.tokenizers.tokenizer import Tokenizer
    from llmjax.train.objectives import RunData

HEAD = "score"  # the head's parameter name at the top of the tree


class ScoredDecoder(nn.Module):
    """A decoder with a scalar head: called as the decoder (logits, hidden states, decoding with a cache) or,
    with `return_score=True`, -> the head on every position's final-norm hidden state [B, L] float32."""

    decoder: nn.Module
    d_model: int
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        nn.share_scope(self, self.decoder)  # the decoder's parameters keep their paths
        self.score = self.param(HEAD, logical_init(nn.initializers.normal(self.d_model ** -0.5), ("embed", "score")),
                                (self.d_model, 1), self.param_dtype)

    def __call__(self, tokens_BL: jax.Array, segment_ids_BL: jax.Array | None = None,
                 positions_BL: jax.Array | None = None, cache: dict[str, Any] | None = None,
                 return_hidden: bool = False, return_score: bool = False) -> Any:
        if return_score:
            hidden_BLD = self.decoder(tokens_BL, segment_ids_BL, positions_BL, return_hidden=True)
            return jnp.einsum("bld,do->blo", hidden_BLD.astype(jnp.float32), self.score.astype(jnp.float32))[..., 0]
        if self.is_initializing():
            _ = self.score
        return self.decoder(tokens_BL, segment_ids_BL, positions_BL, cache=cache, return_hidden=return_hidden)


def last_token_index(segment_ids_BL: jax.Array) -> jax.Array:
    """[B] index of each row's last real input token (rows are one sequence from position 0)."""
    return jnp.maximum(jnp.sum((segment_ids_BL > 0).astype(jnp.int32), axis=1) - 1, 0)


def sequence_rewards(model: nn.Module, params: Any, inputs_BL: jax.Array, segment_ids_BL: jax.Array,
                     positions_BL: jax.Array, rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """([B] float32 reward at each row's last real token, feed-forward aux) under a `ScoredDecoder`."""
    scores_BL, aux = forward(model, params, inputs_BL, segment_ids_BL, positions_BL, rng=rng, return_score=True)
    idx = last_token_index(segment_ids_BL)
    return jnp.take_along_axis(scores_BL, idx[:, None], axis=1)[:, 0], aux


class RewardFamily(PairObjective):
    """The family contract for a reward model over `family` (a causal LM): `PairObjective` with the Bradley-Terry
    loss of the head's rewards."""

    def __init__(self, family: ModelFamily, margin: float):
        super().__init__(family)
        self.margin = margin

    def module(self, pipeline: Any = None) -> nn.Module:
        return ScoredDecoder(self.family.module(pipeline), self.family.cfg.d_model,
                             jnp.dtype(self.family.cfg.param_dtype))

    def rewards(self, model: nn.Module, params: Any, seqs: LMBatch, rng: jax.Array | None = None
                ) -> tuple[jax.Array, dict]:
        """([N] rewards of the rows of `seqs`, feed-forward aux)."""
        return sequence_rewards(model, params, seqs.inputs, seqs.segment_ids, seqs.positions, rng)

    def _sums(self, model: Any, params: Any, batch: PreferenceBatch, rng: jax.Array | None
              ) -> tuple[jax.Array, Sums, dict, jax.Array]:
        r, aux = self.rewards(model, params, batch.sequences(), rng)
        B = batch.weights.shape[0]
        rc, rr, w = r[:B], r[B:], batch.weights[:, 0]
        total = jnp.sum(w * bradley_terry_loss(rc, rr, self.margin))
        sums = {"reward_loss_sum": total, "accuracy_sum": jnp.sum(w * (rc > rr)),
                "chosen_sum": jnp.sum(w * rc), "chosen_sq_sum": jnp.sum(w * rc * rc),
                "rejected_sum": jnp.sum(w * rr), "rejected_sq_sum": jnp.sum(w * rr * rr)}
        return total, sums, aux, w

    @staticmethod
    def _moments(sums: Any, n: Any, prefix: str) -> dict[str, Any]:
        mean = sums[f"{prefix}_sum"] / n
        var = sums[f"{prefix}_sq_sum"] / n - mean * mean
        return {f"reward_{prefix}": mean, f"reward_{prefix}_std": jnp.sqrt(jnp.maximum(var, 0.0))}

    def metrics(self, sums: Sums, total_weight: jax.Array) -> dict[str, jax.Array]:
        """loss (mean Bradley-Terry loss per pair), accuracy, reward_chosen/_rejected (mean) and their _std."""
        n = total_weight
        return {"loss": sums["reward_loss_sum"] / n, "accuracy": sums["accuracy_sum"] / n,
                **self._moments(sums, n, "chosen"), **self._moments(sums, n, "rejected"),
                **aux_metrics(self.cfg, sums, n)}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """eval_loss, eval_accuracy, eval_reward_chosen/_rejected (means) and their _std."""
        n = max(sums["weight_sum"], 1.0)
        out = {"loss": sums["reward_loss_sum"] / n, "accuracy": sums["accuracy_sum"] / n,
               **self._moments(sums, n, "chosen"), **self._moments(sums, n, "rejected")}
        return {f"eval_{k}": float(v) for k, v in out.items()}


class RewardData(PreferenceData):
    """The DPO pairs, each conversation short enough that its last token is an input position (the reward is
    read there): at most data.seq_len tokens."""

    def _encode(self, name: str, rec: dict[str, Any]) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        out = super()._encode(name, rec)
        for side, (ids, _) in zip(SIDES, out, strict=True):
            if len(ids) > self.capacity - 1:
                raise ConfigError(f"data.path: {where(name)}: the {side} conversation is {len(ids)} tokens; a reward "
                                  f"model reads its last token as an input, so at most data.seq_len="
                                  f"{self.capacity - 1}: raise data.seq_len or shorten it")
        return out


class RewardModelling:
    """`reward` in `llmjax.train.objectives.OBJECTIVES`: a scalar head on a causal LM trained with the
    Bradley-Terry loss on preference pairs."""

    name = "reward"
    language_modelling = False

    def check(self, cfg: Config) -> None:
        if not cfg.model.causal_lm:
            raise ConfigError(f"train.objective=reward needs a causal language model; model.family={cfg.model.family} "
                              "is not")

    def wrap_family(self, family: ModelFamily, cfg: Config) -> ModelFamily:
        return RewardFamily(family, cfg.reward.margin)  # type: ignore[return-value]  # the family contract

    def open_data(self, cfg: Config, family: ModelFamily, block: int = 0, process_count: int = 1,
                  tokenizer: Tokenizer | None = None, shares: int | None = None) -> RunData:
        return RewardData(cfg, block, process_count, tokenizer)

    def prepare(self, data: RunData, workdir: Any, reference: Callable[[], Any] | None,
                log: Callable[[str], None]) -> None:
        return None  # no reference model

    batches = staticmethod(host_batches)
