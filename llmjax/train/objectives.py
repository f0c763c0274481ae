"""Training objectives behind one registry: `train.objective` names a `TrainingObjective`.

An objective owns what a run optimises beyond the model family: its config-only rules (`check`),
the loss wrapper the train step calls (`wrap_family`: identity for next-token pre-training and
SFT, the preference loss for DPO) and the data it reads (`open_data`, returning a `RunData`).
The trainer, `llmjax eval` and run_info.json call the objective; none of them branches on its name.

`OBJECTIVES` holds lazy "module:Class" references (this module imports no jax), like the model-family
table: adding an objective is one module and one entry here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from llmjax.config import Config, ConfigError

if TYPE_CHECKING:
    from llmjax.data.tokenizers.tokenizer import Tokenizer
    from llmjax.models.families import ModelFamily

OBJECTIVES: dict[str, str] = {
    "lm": "llmjax.train.objectives:LanguageModelling",
    "sft": "llmjax.post.sft:SupervisedFineTuning",
    "dpo": "llmjax.post.dpo:DirectPreference",
    "reward": "llmjax.post.rl.reward:RewardModelling",
    "grpo": "llmjax.post.rl.grpo:GroupRelative",
    "ppo": "llmjax.post.rl.ppo:ProximalPolicy",
}


@runtime_checkable
class RunData(Protocol):
    """What a process's data offers the trainer and `llmjax eval` (numpy rows, this process's block of
    every global batch: fields [batch_size / process_count, ...] as the family's `example_shapes`)."""

    tokenizer: Any
    sources: list[Any]
    local_shares: Any

    def describe(self) -> str:
        """One line for the log: sources, sizes, build time."""
        ...

    def train_iterator(self) -> Any:
        """A fresh iterator of train batches (`next()`, `get_state()`, `close()`, `source_fractions()`)."""
        ...

    def restore_iterator(self, state: dict[str, Any], step: int) -> tuple[Any, str | None]:
        """(the iterator positioned at batch `step` from a checkpoint's data state, a warning or None)."""
        ...

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        """The validation batches (`eval.batches` of them, 0 = all); a generator with `close()`."""
        ...


class TrainingObjective(Protocol):
    """One `train.objective` (see the module docstring)."""

    name: str
    language_modelling: bool  # validation metrics measure text (bits per byte, `llmjax eval`)

    def check(self, cfg: Config) -> None:
        """Config-only rules of this objective (ConfigError)."""
        ...

    def wrap_family(self, family: ModelFamily, cfg: Config) -> ModelFamily:
        """The family contract the train step calls (the loss wrapper over `family`)."""
        ...

    def open_data(self, cfg: Config, family: ModelFamily, block: int = 0, process_count: int = 1,
                  tokenizer: Tokenizer | None = None, shares: int | None = None) -> RunData:
        """This process's data (block `block` of `process_count` of every global batch). ConfigError."""
        ...

    def prepare(self, data: RunData, workdir: Any, reference: Callable[[], Any] | None,
                log: Callable[[str], None]) -> None:
        """Anything the data needs from the starting model before the first step (`reference()`: the
        starting model's log-probability function; None on a resume)."""
        ...

    def batches(self, setup: Any, data: RunData, iterator: Any, run: Any, log: Callable[[str], None]
                ) -> Callable[[], Any]:
        """The step loop's batch source: () -> the next global batch on the devices. `host_batches` (the data's
        rows, put on the mesh) for every objective but those that sample their batches from the current policy
        `run.state` (grpo's rollouts)."""
        ...


def host_batches(setup: Any, data: RunData, iterator: Any, run: Any, log: Callable[[str], None]
                 ) -> Callable[[], Any]:
    """The batch source of an objective whose data is fixed: the iterator's next rows, put on the mesh; after the
    first batch it logs how mixed that batch is (distinct documents in its rows, where the iterator counts them)."""
    first = [True]

    def next_batch() -> Any:
        batch = next(iterator)
        if first[0]:
            first[0] = False
            mixing: dict[str, float] = getattr(iterator, "mixing", dict)()
            if mixing:
                rows = len(next(iter(batch.values())))
                log(f"data: mixing: {mixing['distinct_documents']:.0f} distinct documents in the first batch's "
                    f"{rows} rows (this process); see docs/data.md")
        return setup.put_batch(batch)

    return next_batch


class LanguageModelling:
    """`lm`: the family's own pre-training objective (next token, masked LM, span corruption) on the
    streaming `DataModule`."""

    name = "lm"
    language_modelling = True

    def check(self, cfg: Config) -> None:
        return None

    def wrap_family(self, family: ModelFamily, cfg: Config) -> ModelFamily:
        return family

    def open_data(self, cfg: Config, family: ModelFamily, block: int = 0, process_count: int = 1,
                  tokenizer: Tokenizer | None = None, shares: int | None = None) -> RunData:
        from llmjax.data.stream.data_module import DataModule

        return DataModule(cfg, block, process_count, family=family, tokenizer=tokenizer, shares=shares)

    def prepare(self, data: RunData, workdir: Any, reference: Callable[[], Any] | None,
                log: Callable[[str], None]) -> None:
        return None

    batches = staticmethod(host_batches)


def objective_for(cfg: Config) -> TrainingObjective:
    """The objective `cfg.train.objective` names (ConfigError for an unknown name)."""
    name = cfg.train.objective
    if name not in OBJECTIVES:
        raise ConfigError(f"train.objective: {name!r} is not one of {', '.join(OBJECTIVES)}")
    module, cls = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), cls)()
