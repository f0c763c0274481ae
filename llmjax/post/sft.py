"""Supervised fine-tuning as a training objective (`train.objective=sft`).

The loss is the wrapped family's next-token loss (identity wrapper); what differs is the data:
chat or prompt-completion JSON lines through the chat template, loss on the assistant's tokens
only (`llmjax.data.post.sft_data.SFTData`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmjax.config import Config

if TYPE_CHECKING:
    from llmjax.data.tokenizers.tokenizer import Tokenizer
    from llmjax.models.families import ModelFamily
    from llmjax.train.objectives import RunData


class SupervisedFineTuning:
    """`sft` in `llmjax.train.objectives.OBJECTIVES`."""

    name = "sft"
    language_modelling = True

    def check(self, cfg: Config) -> None:
        return None

    def wrap_family(self, family: ModelFamily, cfg: Config) -> ModelFamily:
        return family

    def open_data(self, cfg: Config, family: ModelFamily, block: int = 0, process_count: int = 1,
                  tokenizer: Tokenizer | None = None, shares: int | None = None) -> RunData:
        from llmjax.data.post.sft_data import SFTData

        return SFTData(cfg, block, process_count, tokenizer)

    def prepare(self, data: RunData, workdir: Any, reference: Callable[[], Any] | None,
                log: Callable[[str], None]) -> None:
        return None
