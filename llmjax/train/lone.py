"""The lone trainer's side of the hooks (`llmjax.train.hooks`): what one run records, evaluates, saves and
samples. `LoneTrainer.hooks(run)` is the hook list `llmjax.train.loop` runs; the multi-point trainer gives the
same hooks K points' callables instead (`llmjax.scaling.sweep.multipoint`).
"""

from __future__ import annotations

import math
import signal
import sys
from typing import Any

import jax

from llmjax.config import Config, to_dict
from llmjax.data.tokenizers.tokenizer import document_start
from llmjax.evals.tasks import TaskEvaluator
from llmjax.train.checkpoint.manager import Checkpointer
from llmjax.train.evaluation import show_samples, validation_metrics
from llmjax.train.hooks import Checkpoint, Closing, Evaluate, Hook, Profile, Record, Run, Samples, Stop
from llmjax.train.objectives import RunData
from llmjax.train.optim import current_lr
from llmjax.train.setup import Setup
from llmjax.train.signals import StopSignals, agree_on_signal
from llmjax.train.telemetry.metrics import MetricsWriter, ProgressBar, mfu
from llmjax.train.telemetry.profiling import StepProfiler


class NonFiniteLoss(RuntimeError):
    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


class LoneTrainer:
    """One run's writer, progress bar, evaluator, checkpoint bookkeeping and stop signals.

    `extras`: in-loop tasks, a W&B sink, the hardware record (`loop._Extras`); `flops`: (FLOPs per token, peak
    FLOP/s, whether the peak is reliable); `last_saved`: the restored step, -1 for a fresh run."""

    def __init__(self, cfg: Config, workdir: Any, setup: Setup, data: RunData, ckpt: Checkpointer, iterator: Any,
                 extras: Any, base_record: Any, flops: tuple[float, float, bool], last_saved: int) -> None:
        primary = jax.process_index() == 0
        self.cfg, self.workdir, self.setup, self.data, self.ckpt = cfg, workdir, setup, data, ckpt
        self.iterator, self.base_record, self.last_saved = iterator, base_record, last_saved
        self.fpt, self.peak, peak_reliable = flops
        self.multi = jax.process_count() > 1
        self.eval_step = setup.jit_eval_step()
        self.task_eval = None
        if extras.tasks:
            self.task_eval = TaskEvaluator(extras.tasks, setup.family, setup.decode_model, setup.mesh, setup.rules,
                                           data.tokenizer, cfg.model.max_seq_len,
                                           start=document_start(data.tokenizer, cfg.data.add_bos))
        self.writer = MetricsWriter(workdir, enabled=primary, tensorboard=cfg.train.tensorboard,
                                    sinks=[extras.tracker] if extras.tracker is not None else [])
        self.writer.write_config(to_dict(cfg), extras.hardware)
        start = max(last_saved, 0)
        self.bar = ProgressBar(cfg.train.steps, start, enabled=primary and cfg.train.progress,
                               log_every=cfg.train.log_every, mfu_mark="" if peak_reliable else "?")
        self.signals = StopSignals()
        self.profiler = StepProfiler(cfg.train.profile_steps, workdir, log)
        self.tokens_per_step = cfg.train.batch_size * setup.family.tokens_per_example(cfg.data.seq_len)

    def hooks(self, run: Run) -> list[Hook]:
        """In event order; `close` runs in this order too: the trace, the data, the checkpoints (waits for async
        saves), the bar, then the samples (signals still handled), the signal handlers, the writer."""
        cfg = self.cfg
        return [Profile(self.profiler),
                Record(self.report),
                Evaluate(cfg.eval.every_steps, lambda step: self.evaluate(step, run.state)),
                Closing(self.iterator.close),
                Checkpoint(cfg.checkpoint.every_steps, lambda step: self.save(step, run.state), self.ckpt.close),
                Closing(self.bar.close),
                Samples(lambda: show_samples(cfg, self.setup, self.setup.model_params(run.state), self.data),
                        self.poll, lambda: (self.last_saved, self.ckpt.directory), log),
                Stop(self.poll, self.stopped, self.signals.restore),
                Closing(self.writer.close)]

    def say(self, msg: str) -> None:
        self.bar.write(msg) if self.bar.enabled else log(msg)

    def poll(self) -> int | None:
        """The stop signal received by any process (a collective with several), or None."""
        return agree_on_signal(self.signals.received) if self.multi else self.signals.received

    def report(self, step: int, metrics: Any, dt: float) -> None:
        """Step `step`'s train record (metrics.jsonl, TensorBoard, W&B, the progress bar). NonFiniteLoss."""
        cfg = self.cfg
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(m[k]) for k in ("loss", "grad_norm", "param_norm")):
            raise NonFiniteLoss(f"non-finite loss {m['loss']} (grad norm {m['grad_norm']}, parameter norm "
                                f"{m['param_norm']}) at step {step}", step)
        tps = self.tokens_per_step / dt if dt > 0 else 0.0
        util = mfu(tps, self.fpt, self.peak)
        m.update(lr=current_lr(cfg.optim, cfg.train.steps, step), tokens_per_s=tps, step_time=dt)
        if len(self.data.sources) > 1:  # realised mixture (this process's tokens so far)
            m.update({f"data_fraction/{k}": v for k, v in self.iterator.source_fractions().items()})
        if util is not None:
            m["mfu"] = util
        self.writer.write(step, m, kind="train")
        self.bar.update(step + 1, m["loss"], tps, util, m["lr"])

    def evaluate(self, step: int, state: Any) -> None:
        """The validation metrics (and in-loop tasks) of the parameters after `step` updates."""
        params = self.setup.model_params(state)
        metrics = validation_metrics(self.setup, self.eval_step, params, self.data, self.say)
        self.writer.write(step, metrics, kind="eval")
        first = [f"eval_loss {metrics['eval_loss']:.4f}"] if "eval_loss" in metrics else []
        extra = [f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("eval_loss", "eval_ppl")]
        self.say(f"step {step}: {', '.join(first + extra)}")
        if self.task_eval is not None:
            scores = self.task_eval(self.setup.model_params(state))
            self.writer.write(step, scores, kind="tasks")
            self.say(f"step {step}: {self.task_eval.summary(scores)}")

    def save(self, step: int, state: Any) -> None:
        """Checkpoint `step` (model state and data iterator), once."""
        if step != self.last_saved:
            self.ckpt.save(step, self.setup.checkpoint_state(state), {
                **self.iterator.get_state(), "model": to_dict(self.cfg.model), "base": self.base_record})
            self.writer.sync()
            self.last_saved = step

    def stopped(self, done: int, sig: int) -> None:
        self.say(f"{signal.Signals(sig).name} received: saved checkpoint {done} in {self.ckpt.directory}; "
                 "run the same command to resume")
