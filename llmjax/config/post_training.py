"""Post-training config sections: `lora.*` (parameter-efficient fine-tuning), `dpo.*` (preference tuning) and
`reward.*` (reward models).

`train.objective` picks what a run optimises (next-token pre-training, supervised fine-tuning
on chat data, direct preference optimisation); `train.init_from` starts it from another run's
parameters. LoRA (`lora.rank > 0`) trains low-rank adapters on the matrices `lora.targets`
names, the base weights frozen (`llmjax.post.lora`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from llmjax.config.fields import option

# LoRA target names -> what they select: attention projections by their module name under `attn`,
# the dense MLP matrices, the routed experts' matrices (by parameter role)
LORA_TARGETS = ("q", "k", "v", "o", "mlp", "experts")


@dataclasses.dataclass
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021): each targeted matrix W is used as W + (alpha / rank) A B, with A
    [in, rank] (normal, std 1/sqrt(in)) and B [rank, out] (zeros), so training starts from the base model.
    Only A and B are trained and checkpointed; the base weights stay frozen (`llmjax.post.lora`)."""

    rank: int = option(0, "adapter rank; 0: no LoRA (full fine-tuning)", ge=0)
    alpha: float = option(16.0, "scale numerator: the update is (alpha / rank) A B", gt=0)
    dropout: float = option(0.0, "dropout on the adapter path's input features (one mask per step and matrix, "
                                 "shared by the batch's tokens: the merged weight W + s A B is formed once per "
                                 "step)", ge=0, lt=1)
    targets: list[str] = option(factory=lambda: ["q", "k", "v", "o"],
                                doc="matrices that get adapters: q, k, v, o (attention), mlp (dense MLP), "
                                    "experts (routed MoE experts)")


@dataclasses.dataclass
class DPOConfig:
    """Direct preference optimisation (Rafailov et al. 2023) on `{"prompt", "chosen", "rejected"}` JSONL."""

    beta: float = option(0.1, "inverse temperature of the implicit reward beta log(pi / pi_ref)", gt=0)
    loss: Literal["sigmoid", "ipo"] = option("sigmoid", "sigmoid: DPO's -log sigmoid(beta margin); ipo: "
                                                        "(margin - 1 / (2 beta))^2 (Azar et al. 2023)")


@dataclasses.dataclass
class RewardConfig:
    """A reward model (`train.objective=reward`): a scalar head on the decoder's last hidden state, trained with the
    Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin) on the DPO pair JSONL (`llmjax.post.rl.reward`)."""

    margin: float = option(0.0, "Bradley-Terry margin m: the loss asks r_chosen - r_rejected to exceed it", ge=0)


@dataclasses.dataclass
class RLConfig:
    """Policy optimisation with rollouts (`train.objective=grpo` / `ppo`, `llmjax.post.rl`): each step samples
    `train.batch_size` responses (`samples_per_prompt` per prompt) with the on-device decoder and scores them;
    GRPO takes one clipped-surrogate step on them, PPO `ppo_epochs` x `minibatches` updates of the policy and its
    value head."""

    prompts: str | None = option(None, 'JSON-lines prompt set: records with a "prompt" string or "messages", plus '
                                       "any fields the reward function reads")
    samples_per_prompt: int = option(4, "responses sampled per prompt (the GRPO group size; >= 2)", ge=1)
    max_new_tokens: int = option(32, "longest response sampled", ge=1)
    temperature: float = option(1.0, "sampling temperature of the rollouts", gt=0)
    top_p: float = option(1.0, "nucleus sampling of the rollouts (1: off)", gt=0, le=1)
    stop_ids: list[int] = option(factory=list, doc="token ids that end a response besides the tokenizer's "
                                                   "end-of-turn ids")
    reward_fn: str | None = option(None, "module:function called as fn(prompt, response, record) -> float "
                                         "(e.g. llmjax.post.rl.rewards:exact_answer)")
    reward_model: str | None = option(None, "a reward-model workdir (train.objective=reward) that scores the "
                                            "responses")
    kl_coef: float = option(0.04, "grpo: weight of the k3 KL to the reference (the starting model) in the loss; "
                                  "ppo: the (initial) coefficient of the k1 KL penalty in the per-token reward", ge=0)
    clip_eps: float = option(0.2, "PPO clipping of the probability ratio: [1 - eps, 1 + eps]", gt=0, lt=1)
    normalise: Literal["token", "sequence"] = option(
        "token", "token: the loss is the mean over every response token of the batch (no length bias); sequence: "
                 "the mean of each response's mean (the original GRPO)")
    # PPO (train.objective=ppo, llmjax.post.rl.ppo)
    kl_target: float | None = option(None, "ppo: adapt the KL coefficient towards this KL per token (Ziegler et al. "
                                           "2019; null: kl_coef fixed)", gt=0)
    kl_horizon: int = option(10000, "ppo: horizon (in rollouts) of the adaptive KL controller", ge=1)
    gamma: float = option(1.0, "ppo: discount of the per-token rewards in GAE", ge=0, le=1)
    lam: float = option(0.95, "ppo: GAE lambda", ge=0, le=1)
    ppo_epochs: int = option(2, "ppo: passes over each rollout batch (each step)", ge=1)
    minibatches: int = option(2, "ppo: optimizer updates per pass (must divide train.batch_size)", ge=1)
    value_coef: float = option(0.1, "ppo: weight of the value loss", ge=0)
    value_clip: float = option(0.2, "ppo: clipping of the value head's change from its rollout value", gt=0)
    whiten: bool = option(True, "ppo: whiten the advantages over each rollout batch (mean 0, std 1)")
