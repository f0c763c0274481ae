"""`llmjax reward --workdir W --data FILE`: score {"prompt", "response"} JSONL records with a reward model.

One JSON line per record on stdout (or `--output`): {"record": "file:line", "reward": r}, then
the mean on stderr. No JAX import at `llmjax --help`.
"""

from __future__ import annotations

import argparse
import json
import sys

REWARD_VERBS = ("reward",)


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """Register `reward` on the CLI's subparsers."""
    p = sub.add_parser("reward", help="score prompt/response JSONL records with a reward model "
                                      "(a train.objective=reward workdir)")
    p.add_argument("--workdir", required=True, help="the reward model's run directory")
    p.add_argument("--data", required=True, help='JSON-lines file (or directory) of {"prompt", "response"} records')
    p.add_argument("--output", help="write the scores here instead of stdout (must not exist)")
    p.add_argument("--batch", type=int, default=16, help="records per forward pass (default 16)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from llmjax.config import ConfigError
    from llmjax.data.post.jsonl import read_jsonl

    if args.batch < 1:
        raise ConfigError(f"--batch={args.batch}: must be at least 1")
    if args.output and Path(args.output).exists():
        raise ConfigError(f"--output: {args.output} exists (nothing is overwritten)")
    records = read_jsonl(args.data, "--data")
    from llmjax.post.rl.scoring import RewardModel

    rm = RewardModel(args.workdir, batch=args.batch)
    ids = [rm.encode(name, rec) for name, rec in records]  # every record checked before anything is scored
    rewards = rm.score_ids(ids)
    lines = [json.dumps({"record": name, "reward": float(r)}) for (name, _), r in zip(records, rewards, strict=True)]
    text = "\n".join(lines) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    print(f"llmjax: {len(records)} records scored by {args.workdir} (step {rm.step}): mean reward "
          f"{float(rewards.mean()):.4f}", file=sys.stderr)
    return 0
