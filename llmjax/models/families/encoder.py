"""The encoder family (BERT-style): a bidirectional transformer trained by masked language modelling."""

from __future__ import annotations

from typing import cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax.config.family_spec import EncoderConfig
from llmjax.data.stream.row_objectives import MaskedLM
from llmjax.models.families.base import LMBatch, LMFamily, Sums, TokenIds
from llmjax.models.transformer import Transformer
from llmjax.parallel.pipeline import Schedule


class EncoderFamily(LMFamily[EncoderConfig]):
    """`Transformer(causal=False)`: every token attends to its whole document (segment). Batches are
    `LMBatch`es made by `MaskedLM` (inputs masked, targets the original tokens, weights on the selected
    positions); the loss is the NLL of the selected tokens, and evaluation also reports their accuracy
    (`eval_mlm_accuracy`). No decoding. Learned positions (`model.position=learned`, as in BERT) or RoPE."""

    name = "encoder"

    def module(self, pipeline: Schedule | None = None) -> nn.Module:
        return Transformer(self.cfg, pipeline, causal=False)

    def mask_id(self) -> int:
        """The reserved mask token: the last id of the vocabulary."""
        return self.cfg.vocab_size - 1

    def token_names(self) -> dict[int, str]:
        return {self.mask_id(): "<mask>"}

    def objective(self, seq_len: int, tokenizer: TokenIds) -> MaskedLM:
        m = self.cfg
        first = 4 if tokenizer.vocab_size > 4 else 0  # trained tokenizers reserve pad/unk/bos/eos = 0..3
        eos_id = cast(int, tokenizer.eos_id)  # `check_vocab` refuses a run's tokenizer without EOS
        return MaskedLM(m.mask_prob, m.mask_token_prob, m.random_token_prob, self.mask_id(), eos_id,
                        tokenizer.vocab_size, first)

    def eval_sums_from_logits(self, logits_BLV: jax.Array, batch: LMBatch) -> Sums:
        sums = super().eval_sums_from_logits(logits_BLV, batch)
        correct = (jnp.argmax(logits_BLV, axis=-1) == batch.targets).astype(jnp.float32)
        return {**sums, "correct_sum": jnp.sum(correct * batch.weights)}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        out = super().eval_metrics(sums)
        if "correct_sum" in sums:  # not with model.loss_chunk > 0 (no logits)
            out["eval_mlm_accuracy"] = sums["correct_sum"] / max(sums["weight_sum"], 1.0)
        return out
