"""Write experiments/data/rl_tasks.jsonl: prompts with exact answers for GRPO (`train.objective=grpo`).

The two task kinds of make_post_data.py that the SFT model of sft_small.yaml gets wrong most
(addition of two numbers below 50, and counting a word's letters; it copies reversal, capitals and
kilometres almost perfectly), each record {"prompt": question, "answer": the exact answer} (the
number the response must contain), from its own seed so the prompts are mostly new to the SFT
model. The
reward function `llmjax.post.rl.rewards:exact_answer` gives 1 when the answer appears in the
response as a whole word. Usage: python3 experiments/scripts/make_rl_data.py [OUT]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_post_data import WORDS  # noqa: E402

SEED, N = 1234, 400


def record(rng: random.Random) -> dict:
    if rng.random() < 0.75:
        a, b = rng.randrange(1, 50), rng.randrange(1, 50)
        return {"prompt": f"What is {a} plus {b}?", "answer": str(a + b)}
    w = rng.choice(WORDS)
    return {"prompt": f"How many letters are in the word {w}?", "answer": str(len(w))}


def main(out: Path) -> None:
    rng = random.Random(SEED)
    out.write_text("".join(json.dumps(record(rng)) + "\n" for _ in range(N)))
    print(f"wrote {N} prompts to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "data" / "rl_tasks.jsonl")
