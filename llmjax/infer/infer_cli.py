"""Arguments of `llmjax generate | eval | bench-generate` (no JAX import: `llmjax --help` stays fast)."""

from __future__ import annotations

from typing import Any

INFER_VERBS = ("generate", "eval", "bench-generate")


def add_arguments(sub: Any) -> None:
    """Register the inference verbs on the CLI's subparsers."""
    g = sub.add_parser("generate", help="continue prompts with a trained model (KV cache; streams to stdout)")
    g.add_argument("--workdir", required=True, help="a training run directory (config.yaml + checkpoints/)")
    g.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    g.add_argument("--prompt-file", help="a file of prompts, one per line (blank lines skipped)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    g.add_argument("--beams", type=int, default=1, help="beam search width (deterministic; 1 = off)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    g.add_argument("--int8", action="store_true", help="int8 weight-only quantized weights")
    g.add_argument("--chat", action="store_true",
                   help="each prompt is a user turn, rendered with the model's chat template; stops at its "
                        "end-of-turn tokens and prints the reply")
    g.add_argument("--system", help="with --chat: a system message before each prompt")
    e = sub.add_parser("eval", help="loss, perplexity and bits per byte of a trained model")
    e.add_argument("--workdir", required=True)
    e.add_argument("--split", choices=("validation", "train"), default="validation")
    e.add_argument("--batches", type=int, default=None, help="batches to evaluate (default: eval.batches)")
    e.add_argument("--int8", action="store_true", help="also evaluate int8 weights; report memory and the change")
    b = sub.add_parser("bench-generate", help="prefill and decode tokens/s, cached vs uncached decoding")
    b.add_argument("--workdir", required=True)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--prompt-len", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--int8", action="store_true")
