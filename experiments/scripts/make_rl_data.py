"""Write experiments/data/rl_tasks.jsonl: prompts with exact answers for GRPO (`train.objective=grpo`).

The tasks are the ones the SFT model of sft_small.yaml knows (a word's letter count, a word in capital
letters, kilometres in metres), asked in phrasings its SFT data never used ("How long is the word
piano?", "Convert 7 kilometers to meters."): greedy, it often answers another task or a wrong number
(about 0.2 of these prompts right), but some of its samples are right (pass@8 about 0.2-0.7 per
phrasing), which is the signal group-relative advantages need. Every (phrasing, word or number)
pair once, in a seeded order; each record {"prompt": question, "answer": the exact answer}. The
reward function `llmjax.post.rl.rewards:exact_answer` gives 1 when the answer appears in the
response as a whole word.

Addition (the first version of this set) is left out on purpose: the SFT model cannot add (it
writes "a plus b is c" with c = a + b for 12% of its own operands, and even 8 samples hold the
answer for only ~12% of prompts), so a GRPO group almost never has a right sample to learn from.

Usage: python3 experiments/scripts/make_rl_data.py [OUT]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_post_data import WORDS  # noqa: E402

SEED = 1234
LETTERS = ["How long is the word {w}?", "The word {w} has how many letters?", "Count the letters in the word {w}.",
           "How many letters does the word {w} have?", "How many letters is {w}?"]
CAPITALS = ["Write the word {w} in big letters."]
METERS = ["Convert {k} kilometers to meters.", "How many meters is {k} km?"]


def records() -> list[dict]:
    out = [{"prompt": p.format(w=w), "answer": str(len(w))} for p in LETTERS for w in WORDS]
    out += [{"prompt": p.format(w=w), "answer": w.upper()} for p in CAPITALS for w in WORDS]
    out += [{"prompt": p.format(k=k), "answer": str(k * 1000)} for p in METERS for k in range(1, 20)]
    random.Random(SEED).shuffle(out)
    return out


def main(out: Path) -> None:
    recs = records()
    out.write_text("".join(json.dumps(r) + "\n" for r in recs))
    print(f"wrote {len(recs)} prompts to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "data" / "rl_tasks.jsonl")
