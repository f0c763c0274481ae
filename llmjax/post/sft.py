"""Supervised fine-tuning as a training objective (`train.objective=sft`).

The loss is the wrapped family's next-token loss (the identity wrapper of `lm`); what differs is the
data: chat or prompt-completion JSON lines through the chat template, loss on the assistant's tokens
only (`llmjax.data.post.sft_data.SFTData`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmjax.config import Config
from llmjax.train.objectives import LanguageModelling

if TYPE_CHECKING:
    from llmjax.data.tokenizers.tokenizer import Tokenizer
    from llmjax.models.families import ModelFamily
    from llmjax.train.objectives import RunData


class SupervisedFineTuning(LanguageModelling):
    """`sft` in `llmjax.train.objectives.OBJECTIVES`: `lm`'s loss and rules on SFT data."""

    name = "sft"

    def open_data(self, cfg: Config, family: ModelFamily, block: int = 0, process_count: int = 1,
                  tokenizer: Tokenizer | None = None, shares: int | None = None) -> RunData:
        from llmjax.data.post.sft_data import SFTData

        return SFTData(cfg, block, process_count, tokenizer)
