"""The data of a run's `train.objective`: the streaming `DataModule` for pre-training, else the post-training
data (`llmjax.data.post.sft_data`, `llmjax.data.post.preference_data`), which offer the same interface to the
trainer and
`llmjax eval`: `tokenizer`, `sources`, `local_shares`, `describe()`, `train_iterator()`,
`restore_iterator(state, step)` and `eval_batches()`."""

from __future__ import annotations

from typing import Any

from llmjax.config import Config
from llmjax.data.tokenizers.tokenizer import Tokenizer


def open_data(cfg: Config, block: int = 0, process_count: int = 1, tokenizer: Tokenizer | None = None,
              shares: int | None = None) -> Any:
    """This process's data for `cfg` (block `block` of `process_count` of every global batch). ConfigError."""
    if cfg.train.objective == "sft":
        from llmjax.data.post.sft_data import SFTData

        return SFTData(cfg, block, process_count, tokenizer)
    if cfg.train.objective == "dpo":
        from llmjax.data.post.preference_data import PreferenceData

        return PreferenceData(cfg, block, process_count, tokenizer)
    from llmjax.data.stream.data_module import DataModule

    return DataModule(cfg, block, process_count, tokenizer=tokenizer, shares=shares)
