"""XLA's memory analysis of the RL steps on one model: the train step (`Setup.jit_train_step`) and the rollouts'
scoring (policy + reference log-probabilities, PPO's values) of train.objective=ppo, grpo and grpo with LoRA
(and ppo with LoRA), compiled for one device without running them.

    python3 experiments/scripts/rl_memory.py [--config experiments/configs/ppo_small.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace
from typing import Any

import jax

from llmjax.config import load_config
from llmjax.post.rl.ppo import PPORollouts
from llmjax.post.rl.rollout import PromptData, Rollouts
from llmjax.train.setup import build_setup

VARIANTS = {"ppo": ["train.objective=ppo"], "ppo, 1 minibatch": ["train.objective=ppo", "rl.minibatches=1"],
            "ppo + LoRA r8": ["train.objective=ppo", "lora.rank=8"],
            "grpo": ["train.objective=grpo"], "grpo + LoRA r8": ["train.objective=grpo", "lora.rank=8"]}
MIB = 2 ** 20


def total(m: Any) -> float:
    """Bytes of arguments + outputs + temporaries + code, minus what the outputs alias (the trainer's figure)."""
    parts = ("argument", "output", "temp", "generated_code")
    return float(sum(getattr(m, f"{k}_size_in_bytes") for k in parts) - m.alias_size_in_bytes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="experiments/configs/ppo_small.yaml")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    common = ["rl.reward_model=null", "rl.reward_fn=llmjax.post.rl.rewards:exact_answer", *args.overrides]
    print("| objective | train step: arguments / temporaries / total MiB | scoring (policy + reference): total MiB |")
    print("|---|---|---|")
    for name, extra in VARIANTS.items():
        cfg = load_config(args.config, [*common, *extra])
        setup = build_setup(cfg, jax.devices()[:1])
        step = setup.jit_train_step().lower(setup.abstract_state, setup.abstract_batch()).compile()
        m = step.memory_analysis()
        source = (PPORollouts if cfg.train.objective == "ppo" else Rollouts)(
            setup, PromptData(cfg), None, SimpleNamespace(state=None), print)  # type: ignore[arg-type]
        params = setup.params.placed(setup.mesh, setup.rules)
        ref = setup.base_params.placed(setup.mesh, setup.rules)  # type: ignore[union-attr]
        s = source._score.lower(params, ref, setup.abstract_batch()).compile().memory_analysis()
        print(f"| {name} | {m.argument_size_in_bytes / MIB:.1f} / {m.temp_size_in_bytes / MIB:.1f} / "
              f"{total(m) / MIB:.1f} | {total(s) / MIB:.1f} |", flush=True)


if __name__ == "__main__":
    main()
