"""Multiple-choice tasks from local JSONL files, scored by log-likelihood (`eval.tasks`).

One example per line: `{"context": str, "choices": [str, ...], "label": int}` (the index of
the right choice). Each choice is scored as a continuation of the context exactly as written
(put any separating space at the start of the choices). A task's name is its file name
without the extension. Metrics per task, as lm-eval computes them for multiple choice:

- `acc`: the right choice has the highest log-likelihood;
- `acc_norm`: the same with each log-likelihood divided by its choice's length in characters;
- `logprob`: the mean log-likelihood of the right choice (a smooth signal while accuracy is at chance);
- `n`: the number of examples.

`experiments/data/python_mc.jsonl` is a small task of this kind for the default corpus.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmjax.config import ConfigError
from llmjax.evals.text import TextModel


@dataclasses.dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...]
    label: int


@dataclasses.dataclass(frozen=True)
class ChoiceTask:
    name: str
    path: str
    examples: tuple[Example, ...]


def _example(record: Any, where: str) -> Example:
    if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object with context, choices and label")
    missing = [k for k in ("context", "choices", "label") if k not in record]
    if missing:
        raise ConfigError(f"{where}: missing {', '.join(missing)}")
    context, choices, label = record["context"], record["choices"], record["label"]
    if not isinstance(context, str):
        raise ConfigError(f"{where}: context must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise ConfigError(f"{where}: choices must be a list of at least 2 non-empty strings")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise ConfigError(f"{where}: label must be an index into choices (0 to {len(choices) - 1}), got {label!r}")
    return Example(context, tuple(choices), label)


def load_task(path: str | Path, limit: int = 0) -> ChoiceTask:
    """Read a JSONL task (the first `limit` examples; 0 = all). ConfigError naming the file and line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"eval.tasks: {p} not found")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ConfigError(f"eval.tasks: {p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"eval.tasks: cannot read {p}: {e.strerror}") from None
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"eval.tasks: {p}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: invalid JSON ({e.msg})") from None
        except RecursionError:
            raise ConfigError(f"{where}: nested too deeply to read as JSON") from None
        examples.append(_example(record, where))
        if limit and len(examples) == limit:
            break
    if not examples:
        raise ConfigError(f"eval.tasks: {p} holds no example")
    return ChoiceTask(p.stem, str(p), tuple(examples))


def load_tasks(paths: list[str], limit: int = 0) -> list[ChoiceTask]:
    tasks = [load_task(p, limit) for p in paths]
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"eval.tasks: two tasks are named {dup[0]!r} (task names are the file names)")
    return tasks


def evaluate_task(text: TextModel, task: ChoiceTask) -> dict[str, float]:
    """-> {"acc", "acc_norm", "logprob", "n"} for one task (every process must call it: the scoring is SPMD)."""
    pairs = [(ex.context, choice) for ex in task.examples for choice in ex.choices]
    scores = iter(logprob for logprob, _ in text.loglikelihood(pairs))
    correct = correct_norm = 0
    right = 0.0
    for ex in task.examples:
        ll = np.array([next(scores) for _ in ex.choices])
        lengths = np.array([len(c) for c in ex.choices], np.float64)
        correct += int(np.argmax(ll) == ex.label)
        correct_norm += int(np.argmax(ll / lengths) == ex.label)
        right += float(ll[ex.label])
    n = len(task.examples)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "logprob": right / n, "n": float(n)}


def evaluate_tasks(text: TextModel, tasks: list[ChoiceTask]) -> dict[str, float]:
    """-> {"<task>/acc", "<task>/acc_norm", "<task>/logprob", "<task>/n"} for every task."""
    out = {}
    for task in tasks:
        for key, value in evaluate_task(text, task).items():
            out[f"{task.name}/{key}"] = value
    return out


class TaskEvaluator:
    """The in-loop hook: `evaluator(params)` scores every task with the current parameters.

    `family.logits` of the (unpipelined) `model` gives the scores, on `mesh` with the logical `rules`
    of the training layout (rows sharded over the batch axes)."""

    def __init__(self, tasks: list[ChoiceTask], family: Any, model: Any, mesh: Any, rules: Any, tokenizer: Any,
                 max_len: int, batch_size: int = 16, start: Sequence[int] = ()):
        from llmjax.evals.loglik import LoglikScorer

        self.tasks = tasks
        self.text = TextModel(LoglikScorer(family, model, None, mesh, rules, max_len, batch_size), tokenizer,
                              start=start)

    def __call__(self, params: Any) -> dict[str, float]:
        self.text.scorer.params = params
        try:
            return evaluate_tasks(self.text, self.tasks)
        finally:
            self.text.scorer.params = None  # do not keep old parameters alive

    def summary(self, metrics: dict[str, float]) -> str:
        return "; ".join(f"{t.name} acc {metrics[f'{t.name}/acc']:.3f} (acc_norm {metrics[f'{t.name}/acc_norm']:.3f}, "
                         f"{int(metrics[f'{t.name}/n'])} examples)" for t in self.tasks)
