"""`llmjax harness`: lm-evaluation-harness tasks on a training workdir.

`lm_class()` builds an `lm_eval.api.model.LM` subclass whose `loglikelihood`,
`loglikelihood_rolling` and `generate_until` go to a `TextModel` (llmjax's own scoring and
KV-cache generation, batched and sharded over the devices). lm-eval is imported only here and
only when used; without it the command says how to install it (`pip install 'llmjax[eval]'`).

Any harness task runs when its data is available: the Hugging Face datasets cache (offline:
`HF_DATASETS_OFFLINE=1`) or a local task YAML (`--include-path DIR`, e.g. `dataset_path: json`
with `data_files`; `experiments/harness/` has one over `experiments/data/python_mc.jsonl`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from llmjax.config import ConfigError

INSTALL_HINT = "pip install 'llmjax[eval]' (lm-eval 0.4.x)"


def _lm_eval() -> Any:
    try:
        import lm_eval
        import lm_eval.api.model  # noqa: F401
    except ImportError:
        raise ConfigError(f"llmjax harness needs lm-evaluation-harness: {INSTALL_HINT}") from None
    return lm_eval


def lm_class() -> type:
    """The lm-eval `LM` subclass over a `TextModel` (lm-eval imported on the first call)."""
    lm_eval = _lm_eval()
    base: Any = lm_eval.api.model.LM  # lm-eval ships no types: a base class mypy takes as Any

    class LlmjaxLM(base):
        """lm-eval's model interface for an llmjax model (one process: rank 0 of 1; the devices
        are used through the mesh, not through lm-eval's data parallelism)."""

        def __init__(self, text_model: Any, name: str = "llmjax") -> None:
            super().__init__()
            self.text = text_model
            self.name = name

        def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
            return self.text.loglikelihood([(r.args[0], r.args[1]) for r in requests])

        def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
            return self.text.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests: list[Any]) -> list[str]:
            return self.text.generate_until([(r.args[0], r.args[1]) for r in requests])

        @property
        def tokenizer_name(self) -> str:
            return self.name

    return LlmjaxLM


def text_model(workdir: str | Path, batch_size: int = 16) -> tuple[Any, Any]:
    """-> (TextModel over the newest checkpoint of `workdir`, its `Loaded` workdir)."""
    from llmjax.data.tokenizers.tokenizer import document_start
    from llmjax.evals.loglik import LoglikScorer
    from llmjax.evals.text import TextModel
    from llmjax.infer.workdir_model import Loaded

    loaded = Loaded(workdir)
    scorer = LoglikScorer(loaded.family, loaded.family.module(), loaded.params, loaded.mesh, loaded.rules,
                          loaded.cfg.model.max_seq_len, batch_size)
    tokenizer = loaded.tokenizer()
    start = document_start(tokenizer, loaded.cfg.data.add_bos)
    return TextModel(scorer, tokenizer, loaded.engine(), start), loaded


def task_manager(tasks: list[str], include_path: str | None) -> Any:
    """A TaskManager that knows every name in `tasks` (ConfigError naming the unknown ones). With
    --include-path the built-in index (~15k tasks, slow to build) is read only when needed."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path: {include_path} is not a directory")
    if include_path is not None:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if all(manager.match_tasks([t]) for t in tasks):
            return manager
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ConfigError(f"--tasks: unknown task {', '.join(map(repr, unknown))} (list them with `lm-eval ls tasks`; "
                          "local task YAMLs: --include-path DIR)")
    return manager


def run(args: argparse.Namespace) -> int:
    lm_eval = _lm_eval()  # before loading anything: a missing install is a usage error
    from lm_eval.utils import make_table

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: give at least one task name")
    for name in ("limit", "num_fewshot", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < (1 if name != "num_fewshot" else 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {1 if name != 'num_fewshot' else 0}, "
                              f"got {value}")
    text, loaded = text_model(args.workdir, args.batch_size)  # a bad workdir fails fast, before lm-eval's index
    manager = task_manager(tasks, args.include_path)
    t0 = time.time()
    results = lm_eval.simple_evaluate(
        model=lm_class()(text), tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit,
        task_manager=manager, log_samples=False, bootstrap_iters=args.bootstrap_iters,
        random_seed=args.seed, numpy_random_seed=args.seed, fewshot_random_seed=args.seed,
    )
    if results is None:  # not rank 0
        return 0
    print(make_table(results))
    output = Path(args.output) if args.output else loaded.workdir / "harness" / f"step{loaded.step}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    summary = {"workdir": str(loaded.workdir), "step": loaded.step, "tasks": tasks, "num_fewshot": args.num_fewshot,
               "limit": args.limit, "seconds": time.time() - t0, "results": results.get("results", {}),
               "n-samples": results.get("n-samples", {}), "versions": results.get("versions", {})}
    output.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"llmjax: harness results for step {loaded.step} in {output} ({time.time() - t0:.0f}s)", file=sys.stderr)
    return 0
