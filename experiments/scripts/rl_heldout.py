"""Held-out reward of a model on a GRPO run's prompt set: greedy responses to the held-out prompts, scored by the
run's reward function (for the exact-answer task: the exact-answer rate).

    python3 experiments/scripts/rl_heldout.py --config experiments/configs/grpo_small.yaml --workdir runs/sft_small
    python3 experiments/scripts/rl_heldout.py --config experiments/configs/grpo_small.yaml --workdir runs/grpo_small

`--workdir` is any run of the same model (the SFT start or the GRPO result; LoRA workdirs are merged);
the held-out prompts are those `train.objective=grpo` never samples (data.validation_fraction).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--limit", type=int, default=0, help="first N held-out prompts (0: all)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    from llmjax.config import load_config
    from llmjax.infer.sampling import SamplingParams
    from llmjax.infer.workdir_model import Loaded
    from llmjax.post.rl.rollout import PromptData, stop_ids

    cfg = load_config(args.config, args.overrides)
    loaded = Loaded(args.workdir)
    data = PromptData(cfg, loaded.tokenizer())
    held = data.validation[:args.limit] if args.limit else data.validation
    engine = loaded.engine()
    t0 = time.time()
    gens = engine.generate([data.prompt_ids[i] for i in held], SamplingParams(cfg.rl.max_new_tokens),
                           eos_id=stop_ids(cfg, data.tokenizer), tokenizer=data.tokenizer)
    texts = [g.text or "" for g in gens]
    rewards = data.rewards(held, texts, [np.asarray(g.tokens) for g in gens])
    for i, t in list(zip(held, texts, strict=True))[:3]:
        print(f"  {data.prompt_text[i]!r} -> {t!r}", file=sys.stderr)
    print(f"held-out reward {rewards.mean():.4f} over {len(held)} prompts (greedy; {args.workdir}, step "
          f"{loaded.step}; {time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
