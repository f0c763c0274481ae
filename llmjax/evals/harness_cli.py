"""Arguments of `llmjax harness` (no JAX or lm-eval import: `llmjax --help` stays fast)."""

from __future__ import annotations

from typing import Any

HARNESS_VERBS = ("harness",)


def add_arguments(sub: Any) -> None:
    """Register the harness verb on the CLI's subparsers."""
    h = sub.add_parser("harness", help="run lm-evaluation-harness tasks on a trained model (needs llmjax[eval])")
    h.add_argument("--workdir", required=True, help="a training run directory (config.yaml + checkpoints/)")
    h.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (globs allowed)")
    h.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    h.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    h.add_argument("--batch-size", type=int, default=16, help="rows per scoring batch")
    h.add_argument("--include-path", help="a directory of extra task YAMLs (e.g. experiments/harness)")
    h.add_argument("--output", help="results JSON (default: WORKDIR/harness/step<N>.json)")
    h.add_argument("--seed", type=int, default=1234, help="seed for few-shot sampling")
    h.add_argument("--bootstrap-iters", type=int, default=0, help="bootstrap samples for standard errors (0: none)")


def run(args: Any) -> int:
    from llmjax.evals.harness import run as run_harness

    return run_harness(args)
