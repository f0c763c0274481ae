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
from llmjax.errors import DataError
from llmjax.models.families import ModelFamily
from llmjax.train.objectives import RunData
from llmjax.train.setup import Setup


class Evaluation(NamedTuple):
    """The family's validation metrics (eval_loss = mean NLL per weighted token, eval_ppl, ...) and the sums
    they come from (nll_sum in nats, weight_sum, ...: bits per byte needs nll_sum)."""

    metrics: dict[str, float]
    sums: dict[str, float]


def evaluate(family: ModelFamily, run_step: Callable[[dict[str, np.ndarray]], Any],
             batches: Iterable[dict[str, np.ndarray]], split: str = "validation") -> Evaluation:
    """Sum `run_step(batch)` (host batch [B_local, ...] -> the family's evaluation sums, on the device) over
    `batches` and derive the family's metrics. The trainer's in-loop evaluation and `llmjax eval` both call
    this. Several processes agree to stop at the first batch some process lacks (a collective: every process
    must call it). The steps are dispatched before any result is read, so the host never stalls the device.
    DataError when `batches` is empty."""
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
    if not sums:  # the family's metrics divide sums that no batch gave
        raise DataError(f"data: the {split} split gave no batch to evaluate; raise data.validation_fraction, lower "
                        "data.seq_len or train.batch_size, or disable evaluation with eval.every_steps=0")
    totals: dict[str, float] = {}
    for s in jax.device_get(sums):
        for k, v in s.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return Evaluation(family.eval_metrics(totals), totals)


def validation_metrics(setup: Setup, eval_step: Any, params: Any, data: RunData,
                       log: Callable[[str], None] = print) -> dict[str, float]:
    """The trainer's evaluation of `params` (sharded as `setup`'s state) over `data.eval_batches()`
    (`eval.batches` batches, fewer if the split ends first): `evaluate` with the jitted eval step. Data that
    evaluates by sampling from the model (a policy-optimisation run's held-out prompts) has its own
    `evaluate(setup, params, log)`, which is called instead."""
    own = getattr(data, "evaluate", None)
    if own is not None:
        return dict(own(setup, params, log))
    return evaluate(setup.family, lambda b: eval_step(params, setup.put_batch(b)), data.eval_batches()).metrics


def check_validation(cfg: Config, data: RunData) -> None:
    """Before the run writes or compiles anything: with evaluation on, the validation split gives at least one
    batch (DataError otherwise, instead of a failure at the first evaluation)."""
    if cfg.eval.every_steps <= 0 or hasattr(data, "evaluate"):  # sampled evaluations check their own prompts
        return
    batches = data.eval_batches()
    try:
        first = next(iter(batches), None)
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
    if first is None:
        raise DataError(f"data: the validation split gives no batch of train.batch_size={cfg.train.batch_size} rows "
                        f"of data.seq_len={cfg.data.seq_len} tokens; raise data.validation_fraction, lower "
                        "data.seq_len or train.batch_size, or disable evaluation with eval.every_steps=0")


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
