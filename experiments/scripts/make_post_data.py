"""Write the post-training example data under experiments/data/ (deterministic; written for this project).

  sft_chat.jsonl          chat records {"messages": [...]}: small tasks (arithmetic, word games, unit
                          conversions), some with a system prompt, some with two turns
  sft_completion.jsonl    prompt/completion records of the same tasks
  dpo_pairs.jsonl         {"prompt", "chosen", "rejected"}: the correct answer against a plausible wrong one
  chat_tokenizer/         a byte-level BPE tokenizer.json (vocab 512) trained on them, with ChatML specials
                          and a chat template in tokenizer_config.json

Usage: python experiments/scripts/make_post_data.py [OUT_DIR] (default experiments/data)
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "forest", "rocket", "garden", "mirror",
         "candle", "planet", "silver", "window", "yellow", "orange", "python", "jungle", "bridge", "castle", "dragon"]
SYSTEM = "You are a concise assistant. Answer in one sentence."
TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
            "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' + '\\n' }}"
            "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def task(rng: random.Random) -> tuple[str, str, str]:
    """(question, correct answer, wrong answer)."""
    kind = rng.randrange(5)
    if kind == 0:
        a, b = rng.randrange(1, 50), rng.randrange(1, 50)
        wrong = a + b + rng.choice([-2, -1, 1, 2, 10])
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", f"{a} plus {b} is {wrong}."
    if kind == 1:
        w = rng.choice(WORDS)
        return f"Reverse the word {w}.", f"The word {w} reversed is {w[::-1]}.", f"The word {w} reversed is {w}."
    if kind == 2:
        w = rng.choice(WORDS)
        wrong = len(w) + rng.choice([-1, 1, 2])
        return (f"How many letters are in the word {w}?", f"The word {w} has {len(w)} letters.",
                f"The word {w} has {wrong} letters.")
    if kind == 3:
        km = rng.randrange(1, 20)
        return (f"How many meters are in {km} kilometers?", f"{km} kilometers are {km * 1000} meters.",
                f"{km} kilometers are {km * 100} meters.")
    w = rng.choice(WORDS)
    return (f"Write the word {w} in capital letters.", f"In capital letters: {w.upper()}.",
            f"In capital letters: {w.capitalize()}.")


def chat_record(rng: random.Random) -> dict:
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
    for _ in range(2 if rng.random() < 0.3 else 1):
        q, a, _ = task(rng)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": messages}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def train_tokenizer(texts: list[str], out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, "add_bos_token": False,
              "chat_template": TEMPLATE, "model_max_length": 512, "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main(out: Path) -> None:
    rng = random.Random(15)
    chat = [chat_record(rng) for _ in range(320)]
    completion = []
    for _ in range(160):
        q, a, _ = task(rng)
        completion.append({"prompt": q, "completion": a})
    pairs = []
    for _ in range(320):
        q, a, w = task(rng)
        pairs.append({"prompt": q, "chosen": a, "rejected": w})
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "sft_chat.jsonl", chat)
    write_jsonl(out / "sft_completion.jsonl", completion)
    write_jsonl(out / "dpo_pairs.jsonl", pairs)
    texts = [m["content"] for r in chat for m in r["messages"]] + [p["rejected"] for p in pairs]
    texts += ["system", "user", "assistant"]
    train_tokenizer(texts, out / "chat_tokenizer")
    print(f"wrote {len(chat)} chat, {len(completion)} completion, {len(pairs)} preference records and "
          f"chat_tokenizer/ to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "data")
