"""The multi-point trainer as an adapter (`train_packed`): K points' state, data, writers and run directories
run through the trainer's one loop and hooks (`llmjax.train.hooks`).

See `llmjax.scaling.sweep.multipoint` for what a pack is and what it shares (the stacked state and the
packed step: `PackedProgram`). This module gives the hooks K points' callables where the lone trainer
(`llmjax.train.lone`) gives one's: each point's train records, evaluations and checkpoints, written to its
own run directory. Step numbering, records and checkpoints follow `llmjax.train.loop` (the train record of
step k is the loss of batch k; eval and checkpoint k hold the parameters after k updates).
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from llmjax.config import Config, to_dict
from llmjax.data.stream.data_module import DataModule
from llmjax.data.tokenizers.run_tokenizer import has_copy, run_tokenizer, save_copy, tokenizer_dir
from llmjax.errors import EXIT_FAILED, EXIT_OK
from llmjax.scaling.sweep.multipoint import PackedProgram, _PerPoint, build_pack
from llmjax.storage import as_path
from llmjax.train import workdir as run_dir
from llmjax.train.checkpoint.compat import check_matches
from llmjax.train.checkpoint.data_state import latest_saved_shares
from llmjax.train.checkpoint.manager import Checkpointer
from llmjax.train.evaluation import validation_metrics
from llmjax.train.hooks import Checkpoint, Evaluate, Hook, Record, Run, Stop, close_all, run_loop
from llmjax.train.optim import current_lr
from llmjax.train.signals import StopSignals
from llmjax.train.telemetry.metrics import MetricsWriter, memory_summary, mfu
from llmjax.train.telemetry.peak import peak_info
from llmjax.train.telemetry.run_info import write_run_info
from llmjax.train.workdir import check_resumable


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Point:
    """One point of a pack: its config, run directory, data, checkpointer, writer and status."""

    def __init__(self, cfg: Config, workdir: Any, setup: Any) -> None:
        self.cfg, self.workdir = cfg, as_path(workdir)
        run_dir.check_writable(self.workdir)
        check_resumable(cfg, self.workdir)
        run_dir.create(self.workdir)
        shares = latest_saved_shares(self.workdir / "checkpoints")
        self.data = DataModule(cfg, 0, 1, tokenizer=run_tokenizer(cfg, self.workdir), shares=shares,
                               family=setup.family)
        if not has_copy(self.workdir):
            save_copy(self.data.tokenizer, tokenizer_dir(self.workdir))
        run_dir.save_config(cfg, self.workdir)
        self.ckpt = Checkpointer(self.workdir / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.async_save, True,
                                 cfg.checkpoint.checksums)
        self.writer = MetricsWriter(self.workdir, enabled=True, tensorboard=cfg.train.tensorboard)
        self.status = EXIT_OK
        self.iterator: Any = None
        self.last_saved = -1

    @property
    def live(self) -> bool:
        return self.status == EXIT_OK


def _restore(points: list[_Point], program: PackedProgram, setup: Any) -> tuple[int, Any]:
    """(start step, stacked state): every point's newest checkpoint (all at one step), or fresh states."""
    from llmjax.config import ConfigError

    def matches(p: _Point) -> Callable[[Any], None]:
        return lambda d: check_matches(p.cfg.model, d, setup.abstract_state.params, setup.params.logical,
                                       "the config")

    restored = [p.ckpt.restore_latest(setup.abstract_state, check=matches(p), data_shares=p.data.local_shares)
                for p in points]
    if all(r is None for r in restored):
        for p in points:
            p.iterator = p.data.train_iterator()
        return 0, program.init()
    steps = [None if r is None else r[0] for r in restored]
    if len(set(steps)) > 1:
        raise ConfigError("--pack: the points of a pack resume from different steps ("
                          + ", ".join(f"{p.workdir.name}: {s}" for p, s in zip(points, steps, strict=True))
                          + "); train them alone")
    loaded = [r for r in restored if r is not None]  # all of them: the steps above agree
    start = loaded[0][0]
    for p, (_, _, data_state) in zip(points, loaded, strict=True):
        p.iterator, note = p.data.restore_iterator(data_state, start)
        p.last_saved = start
        log(f"{p.workdir.name}: resumed from {p.ckpt.directory / str(start)}")
        if note:
            log(f"llmjax: warning: {p.workdir.name}: {note}: the data stream restarts at step {start}")
    return start, program.stack([r[1] for r in loaded])



def train_packed(configs: Sequence[Config], workdirs: Sequence[Any],
                 devices: Sequence[jax.Device] | None = None, mode: str = "auto") -> list[int]:
    """Train the configs together (see `llmjax.scaling.sweep.multipoint`) on `devices` (default all); each point's exit
    status, in order (0, 1 for a non-finite loss, 128+N after signal N). ConfigError (before anything is
    compiled or written) for configs that cannot share a program."""
    t_start = time.time()
    setup, program = build_pack(configs, devices, [as_path(w).name for w in workdirs], mode)
    points = [_Point(c, w, setup) for c, w in zip(configs, workdirs, strict=True)]
    K, cfg = len(points), configs[0]
    try:
        start, state = _restore(points, program, setup)
        t0 = time.time()
        step_fn = program.train_step().lower(state, program.put_batch(
            [{k: np.zeros((cfg.train.batch_size, *s), d) for k, (s, d) in
              setup.family.example_shapes(cfg.data.seq_len).items()}] * K), program.hparams).compile()
        log(f"pack of {K} ({', '.join(p.workdir.name for p in points)}): compiled the packed train step "
            f"({program.mode}) in "
            f"{time.time() - t0:.1f}s; per-device memory: {memory_summary(step_fn)}")
        for p in points:
            write_run_info(p.workdir, p.cfg, _PerPoint(step_fn, K), p.data, setup.family)
            p.writer.write_config(to_dict(p.cfg), {"packed_with": [q.workdir.name for q in points]})
        run = Run(state, start, cfg.train.stop_after or cfg.train.steps, cfg.train.steps)
        hooks = PackTrainer(points, program, setup).hooks(run)
        failing = False
        try:
            run_loop(run, lambda s, b: step_fn(s, b, program.hparams),
                     lambda: program.put_batch([next(p.iterator) for p in points]), hooks)
        except BaseException:
            failing = True  # the loop's error is reported; closing errors after it go to the run log
            raise
        finally:
            close_all(run, hooks, failing)
            log(f"pack of {K} done in {time.time() - t_start:.0f}s")
        return [p.status for p in points]
    finally:
        for p in points:
            if p.iterator is not None:
                p.iterator.close()
            p.ckpt.close()
            p.writer.close()


class PackTrainer:
    """The hooks' callables for K points: records, evaluations and checkpoints of every live point (a point
    whose loss turns non-finite stops alone; the loop ends when none is left)."""

    def __init__(self, points: list[_Point], program: PackedProgram, setup: Any) -> None:
        cfg = points[0].cfg
        self.points, self.program, self.setup, self.cfg = points, program, setup, cfg
        self.fpt = setup.family.flops_per_token(cfg.data.seq_len)
        self.peak, _, _ = peak_info(jax.devices(), cfg.model.compute_dtype, cfg.data.cache_dir)
        self.tokens_per_step = cfg.train.batch_size * setup.family.tokens_per_example(cfg.data.seq_len)
        self.eval_step, self.take = setup.jit_eval_step(), program.take()
        self.signals = StopSignals()

    def hooks(self, run: Run) -> list[Hook]:
        cfg = self.cfg
        return [Record(lambda step, metrics, dt: self.report(run, step, metrics, dt)),
                Evaluate(cfg.eval.every_steps, lambda step: self.evaluate(step, run.state)),
                Checkpoint(cfg.checkpoint.every_steps, lambda step: self.save(step, run.state), lambda: None),
                Stop(lambda: self.signals.received, self.stopped, self.signals.restore)]

    def report(self, run: Run, step: int, metrics: Any, dt: float) -> None:
        """Every live point's train record of step `step` (metrics [K] each)."""
        host = jax.device_get(metrics)
        tps = self.tokens_per_step / dt if dt > 0 else 0.0
        util = mfu(tps * len(self.points), self.fpt, self.peak)
        for i, p in enumerate(self.points):
            if not p.live:
                continue
            m = {k: float(np.asarray(v)[i]) for k, v in host.items()}
            if not all(math.isfinite(m[k]) for k in ("loss", "grad_norm", "param_norm")):
                log(f"llmjax: {p.workdir.name}: non-finite loss {m['loss']} (grad norm {m['grad_norm']}, parameter "
                    f"norm {m['param_norm']}) at step {step}; stopping this point (the others go on)")
                p.status = EXIT_FAILED
                continue
            m.update(lr=current_lr(p.cfg.optim, run.steps, step), tokens_per_s=tps, step_time=dt)
            if util is not None:
                m["mfu"] = util
            p.writer.write(step, m, kind="train")
        if not any(p.live for p in self.points):
            run.finished = True

    def evaluate(self, step: int, state: Any) -> None:
        for i, p in enumerate(self.points):
            if p.live:
                metrics = validation_metrics(self.setup, self.eval_step, self.take(state, i).params, p.data)
                p.writer.write(step, metrics, kind="eval")
                log(f"{p.workdir.name}: step {step}: eval_loss {metrics['eval_loss']:.4f}")

    def save(self, step: int, state: Any) -> None:
        for i, p in enumerate(self.points):
            if p.live and step != p.last_saved:
                p.ckpt.save(step, self.take(state, i), {**p.iterator.get_state(), "model": to_dict(p.cfg.model)})
                p.writer.sync()
                p.last_saved = step

    def stopped(self, done: int, sig: int) -> None:
        log(f"{signal.Signals(sig).name} received: saved checkpoint {done} of every point; run the same "
            "command to resume")
        for p in self.points:
            if p.live:
                p.status = 128 + sig
