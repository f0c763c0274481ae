"""What the trainer reports besides the loss: validation metrics over the eval split and the
end-of-run samples."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import numpy as np

from llmjax.config import Config
from llmjax.data.tokenizers.decode import ModelVocabulary
from llmjax.data.tokenizers.tokenizer import document_start
from llmjax.models.families import ModelFamily
from llmjax.train.objectives import RunData
from llmjax.train.setup import Setup


class Evaluation(NamedTuple):
    """The family's validation metrics (eval_loss = mean NLL per weighted token, eval_ppl, ...) and the sums
    they come from (nll_sum in nats, weight_sum, ...: bits per byte needs nll_sum)."""

    metrics: dict[str, float]
    sums: dict[str, float]


def evaluate(family: ModelFamily, run_step: Callable[[dict[str, np.ndarray]], Any],
             batches: Iterable[dict[str, np.ndarray]]) -> Evaluation:
    """Sum `run_step(batch)` (host batch [B_local, ...] -> the family's evaluation sums, on the device) over
    `batches` and derive the family's metrics. The trainer's in-loop evaluation and `llmjax eval` both call
    this. Several processes agree to stop at the first batch some process lacks (a collective: every process
    must call it). The steps are dispatched before any result is read, so the host never stalls the device."""
    sums = []
    it = iter(batches)
    while True:
        batch = next(it, None)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            if int(np.min(multihost_utils.process_allgather(np.int32(batch is not None)))) == 0:
                break
        if batch is None:
            break
        sums.append(run_step(batch))
    close = getattr(it, "close", None)
    if close is not None:
        close()
    totals: dict[str, float] = {}
    for s in jax.device_get(sums):
        for k, v in s.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return Evaluation(family.eval_metrics(totals), totals)


def validation_metrics(setup: Setup, eval_step: Any, params: Any, data: RunData) -> dict[str, float]:
    """The trainer's evaluation of `params` (sharded as `setup`'s state) over `data.eval_batches()`
    (`eval.batches` batches, fewer if the split ends first): `evaluate` with the jitted eval step."""
    return evaluate(setup.family, lambda b: eval_step(params, setup.put_batch(b)), data.eval_batches()).metrics


def show_samples(cfg: Config, setup: Setup, params: Any, data: RunData) -> None:
    """Print a greedy and a temperature continuation of `sample.prompt`, decoded by the same engine as
    `llmjax generate` (every process decodes with the sharded parameters; process 0 prints)."""
    from llmjax.infer.engine import Engine
    from llmjax.infer.sampling import SamplingParams

    s = cfg.sample
    if s.max_new_tokens == 0 or not setup.model_family.spec.decoding:
        return
    start = document_start(data.tokenizer, cfg.data.add_bos)
    prompt = [*start, *data.tokenizer.encode([s.prompt])[0]][-(cfg.model.max_seq_len - 1):]
    if not prompt:
        return
    engine = Engine(cfg.model, params, setup.mesh, setup.rules, family=setup.model_family)
    vocab = ModelVocabulary(data.tokenizer, setup.model_family.token_names())
    for label, temp in (("greedy", 0.0), (f"temperature {s.temperature}", s.temperature)):
        sp = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=temp, seed=cfg.seed)
        new = engine.generate([prompt], sp, data.tokenizer.eos_id)[0].tokens
        if jax.process_index() == 0:
            print(f"--- sample ({label}) ---\n{s.prompt}{vocab.decode(new)}\n", flush=True)
