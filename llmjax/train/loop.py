"""The trainer: init or resume, step, evaluate, log, checkpoint, handle signals, sample.

Step numbering: the record `{"step": k, "loss": ...}` is the loss of batch k under the
parameters after k updates; `{"step": k, "eval_loss": ...}` evaluates those same
parameters, and checkpoint k holds them (plus the data iterator positioned at batch k).
Metrics of step k are read from the device while step k+1 runs, so the host never
stalls the accelerator; a checkpoint waits for its step's loss to be known finite.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from typing import Any, NamedTuple

import jax

from llmjax import runlog
from llmjax.config import Config, ConfigError, config_warnings, to_dict
from llmjax.data.tokenizers.run_tokenizer import has_copy, run_tokenizer, save_copy, tokenizer_dir
from llmjax.data.tokenizers.tokenizer import document_start
from llmjax.evals.tasks import TaskEvaluator, load_tasks
from llmjax.models import mup
from llmjax.models.roles import decay_mask, describe_decay
from llmjax.parallel.mesh import describe as describe_mesh
from llmjax.storage import EXIT_STORAGE, StorageError, as_path
from llmjax.train import workdir as run_dir
from llmjax.train.cadence import StepCadence
from llmjax.train.checkpoint.compat import check_matches
from llmjax.train.checkpoint.data_state import latest_saved_shares
from llmjax.train.checkpoint.init_from import load_base
from llmjax.train.checkpoint.manager import Checkpointer
from llmjax.train.evaluation import show_samples, validation_metrics
from llmjax.train.objectives import RunData, objective_for
from llmjax.train.optim import current_lr
from llmjax.train.preflight import preflight
from llmjax.train.profiling import StepProfiler
from llmjax.train.setup import Setup, build_setup
from llmjax.train.signals import StopSignals, agree_on_signal
from llmjax.train.telemetry.metrics import MetricsWriter, ProgressBar, memory_summary, mfu, param_counts
from llmjax.train.telemetry.peak import peak_info
from llmjax.train.telemetry.run_info import write_run_info
from llmjax.train.telemetry.tracking import hardware_info, open_wandb
from llmjax.train.workdir import RESUME_KEYS, check_resumable  # noqa: F401 - re-exported (old import path)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class NonFiniteLoss(RuntimeError):
    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def batch_block(setup: Setup, process_index: int, process_count: int) -> int:
    """Which contiguous block of `batch_size / process_count` rows of each global batch this
    process's devices hold (the process reads exactly those rows). ConfigError when the batch
    sharding does not give every process one such block (e.g. a batch replicated across hosts)."""
    B, L = setup.cfg.train.batch_size, setup.cfg.data.seq_len
    if process_count == 1:
        return 0
    rows: set[int] = set()
    for index in setup.batch_sharding.addressable_devices_indices_map((B, L)).values():
        rows.update(range(*index[0].indices(B)[:2]))
    b = B // process_count
    lo = min(rows)
    if len(rows) != b or lo % b or rows != set(range(lo, lo + b)):
        raise ConfigError(
            f"process {process_index} of {process_count} holds batch rows {sorted(rows)[:4]}... ({len(rows)} of "
            f"{B}); each process must hold a distinct block of {b} rows: shard the batch over every process "
            "(mesh.data x mesh.fsdp a multiple of the process count)"
        )
    return lo // b


def _newest_step_dir(checkpoints: Any) -> Any | None:
    """The newest `<step>` directory under `checkpoints` (read-only: no orbax manager is created)."""
    if not checkpoints.is_dir():
        return None
    steps = [c for c in checkpoints.iterdir() if c.name.isdigit() and c.is_dir()]
    return max(steps, key=lambda c: int(c.name)) if steps else None


def check_run(cfg: Config, workdir: Any, setup: Setup, data: RunData) -> int:
    """`llmjax train --check`: everything a run does before its first step, without writing anything:
    the checkpoint it would resume from must match, and the train and eval steps must compile."""
    newest = _newest_step_dir(workdir / "checkpoints")
    if newest is not None:
        check_matches(cfg.model, newest, setup.abstract_state.params, setup.trained.logical, "the config")
        log(f"would resume from {newest} (its parameter shapes match)")
    t0 = time.time()
    step_fn = setup.jit_train_step().lower(setup.abstract_state, setup.abstract_batch()).compile()
    setup.jit_eval_step().lower(setup.abstract_state.params, setup.abstract_batch()).compile()
    log(f"compiled the train and eval steps in {time.time() - t0:.1f}s; per-device memory: "
        f"{memory_summary(step_fn)}")
    log(f"check passed: {workdir} would train {cfg.train.steps} steps of {cfg.train.batch_size} x "
        f"{cfg.data.seq_len} tokens (nothing was written)")
    return EXIT_OK


def train(cfg: Config, workdir: Any, check_only: bool = False) -> int:
    """Train `cfg` in `workdir` (a path or a gs:// URL), resuming from its newest checkpoint. Returns the
    exit status. `check_only`: validate, build the data and the model, compile, and return (`check_run`)."""
    primary = jax.process_index() == 0
    mesh_shape = preflight(cfg)  # the config's rules and a parameter estimate against the devices' memory
    for note in config_warnings(cfg):
        log(f"llmjax: warning: {note}")
    workdir = as_path(workdir)
    run_dir.check_writable(workdir)
    check_resumable(cfg, workdir)
    tasks = load_tasks(cfg.eval.tasks, cfg.eval.tasks_limit)  # a bad task file: exit 2 before any compile
    hardware = hardware_info(mesh_shape)
    tracker = None
    if not check_only:
        run_dir.create(workdir)
        if primary:
            runlog.attach(workdir)
            tracker = open_wandb(cfg, workdir, hardware)

    t_start = time.time()
    setup = build_setup(cfg)
    # Each process reads only the rows of every global batch that its devices hold; a resumed run
    # keeps the checkpoint's data shares (unless data.shares says otherwise).
    shares = latest_saved_shares(workdir / "checkpoints")
    data = objective_for(cfg).open_data(cfg, setup.model_family, batch_block(setup, jax.process_index(),
                                        jax.process_count()), jax.process_count(),
                                        tokenizer=run_tokenizer(cfg, workdir), shares=shares)
    log(f"{data.describe()} ({time.time() - t_start:.1f}s)")
    if primary and not check_only:
        if not has_copy(workdir):
            save_copy(data.tokenizer, tokenizer_dir(workdir))
        run_dir.save_config(cfg, workdir)
    counts = param_counts(setup.params.shapes, setup.params.logical, cfg.model)
    fpt = setup.family.flops_per_token(cfg.data.seq_len)
    peak, peak_source, peak_reliable = peak_info(jax.devices(), cfg.model.compute_dtype, cfg.data.cache_dir)
    active = f", {counts['active']:,} active" if cfg.model.moe.enabled else ""
    log(f"{describe_mesh(setup.mesh)}; params {counts['total']:,} total, {counts['non_embedding']:,} non-embedding"
        f"{active}; {fpt / 1e6:.2f} MFLOPs/token; peak {peak / 1e12:.2f} TFLOP/s ({peak_source})")
    if setup.schedule is not None:
        log(setup.schedule.describe())
    log(describe_decay(setup.trained.roles, decay_mask(setup.trained.roles, cfg.optim.decay_embeddings)))
    if setup.lora is not None:
        log(setup.lora.describe())
    if mup.enabled(cfg.model):
        log(mup.describe(cfg.model))
    if check_only:
        return check_run(cfg, workdir, setup, data)

    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.async_save, primary,
                        cfg.checkpoint.checksums)
    try:
        status = _run(cfg, workdir, setup, data, ckpt, fpt, (peak, peak_reliable), t_start,
                      _Extras(tasks, tracker, hardware))
    except StorageError as e:
        good = ckpt.steps()
        newest = ckpt.directory / str(good[-1]) if good else "none"
        log(f"llmjax: error: {e}. Last good checkpoint: {newest} (nothing saved earlier was changed); free some "
            "space or fix the permissions and run the same command to resume")
        runlog.record_exception(e, "storage error")
        return EXIT_STORAGE
    except Exception as e:
        e.llmjax_log = runlog.record_exception(e, "training failed")  # type: ignore[attr-defined]
        raise
    finally:
        runlog.upload()
    return status


class _Extras(NamedTuple):
    """What the step loop reports to besides metrics.jsonl: in-loop tasks, a W&B sink, the hardware record."""

    tasks: list[Any]
    tracker: Any
    hardware: dict[str, Any]


def _run(cfg: Config, workdir: Any, setup: Setup, data: RunData, ckpt: Checkpointer, fpt: float,
         peak_and_reliable: tuple[float, bool], t_start: float, extras: _Extras) -> int:
    """Restore or initialise, then the step loop (see the module docstring). Returns the exit status."""
    primary, multi = jax.process_index() == 0, jax.process_count() > 1
    peak, peak_reliable = peak_and_reliable
    restored = ckpt.restore_latest(setup.checkpoint_abstract_state, check=lambda step_dir: check_matches(
        cfg.model, step_dir, setup.abstract_state.params, setup.trained.logical, "the config"),
        data_shares=data.local_shares)
    base, base_record = load_base(cfg, setup, workdir, resuming=restored is not None)  # train.init_from
    if restored is None:
        state, start = setup.init_state(base), 0
        iterator = data.train_iterator()
        if cfg.train.init_from:
            log(f"initialised from {base_record['init_from']} (checkpoint {base_record['step']})")
    else:
        start, state, data_state = restored
        state = setup.attach_frozen(state, base)  # LoRA: the base is not in the checkpoint
        iterator, note = data.restore_iterator(data_state, start)
        log(f"resumed from {ckpt.directory / str(start)}")
        if note:
            log(f"llmjax: warning: {note}: the data stream restarts from its beginning at step {start}")

    # data that needs the starting model (dpo: reference log-probabilities)
    objective_for(cfg).prepare(data, workdir, None if restored is not None else lambda: setup.reference_logprobs(state),
                               log)
    t0 = time.time()
    step_fn = setup.jit_train_step().lower(setup.abstract_state, setup.abstract_batch()).compile()
    log(f"compiled train step in {time.time() - t0:.1f}s; per-device memory: {memory_summary(step_fn)}")
    write_run_info(workdir, cfg, step_fn, data, setup.family)  # XLA's FLOPs of the step, eval bytes/token (for sweeps)
    eval_step = setup.jit_eval_step()
    task_eval = None
    if extras.tasks:
        task_eval = TaskEvaluator(extras.tasks, setup.family, setup.decode_model, setup.mesh, setup.rules,
                                  data.tokenizer, cfg.model.max_seq_len,
                                  start=document_start(data.tokenizer, cfg.data.add_bos))

    writer = MetricsWriter(workdir, enabled=primary, tensorboard=cfg.train.tensorboard,
                           sinks=[extras.tracker] if extras.tracker is not None else [])
    writer.write_config(to_dict(cfg), extras.hardware)
    bar = ProgressBar(cfg.train.steps, start, enabled=primary and cfg.train.progress, log_every=cfg.train.log_every,
                      mfu_mark="" if peak_reliable else "?")
    signals = StopSignals()
    profiler = StepProfiler(cfg.train.profile_steps, workdir, log)
    tokens_per_step = cfg.train.batch_size * setup.family.tokens_per_example(cfg.data.seq_len)
    steps = cfg.train.steps
    end = cfg.train.stop_after or steps  # the schedule follows `steps`; the run stops at `end`
    last_saved = start if restored else -1
    status = EXIT_OK

    def say(msg: str) -> None:
        bar.write(msg) if bar.enabled else log(msg)

    def record(step: int, metrics: Any, dt: float) -> None:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(m[k]) for k in ("loss", "grad_norm", "param_norm")):
            raise NonFiniteLoss(f"non-finite loss {m['loss']} (grad norm {m['grad_norm']}, parameter norm "
                                f"{m['param_norm']}) at step {step}", step)
        tps = tokens_per_step / dt if dt > 0 else 0.0
        util = mfu(tps, fpt, peak)
        m.update(lr=current_lr(cfg.optim, steps, step), tokens_per_s=tps, step_time=dt)
        if len(data.sources) > 1:  # realised mixture (this process's tokens so far)
            m.update({f"data_fraction/{k}": v for k, v in iterator.source_fractions().items()})
        if util is not None:
            m["mfu"] = util
        writer.write(step, m, kind="train")
        bar.update(step + 1, m["loss"], tps, util, m["lr"])

    def run_eval(step: int) -> None:
        if cfg.eval.every_steps <= 0:
            return
        metrics = validation_metrics(setup, eval_step, setup.model_params(state), data)
        writer.write(step, metrics, kind="eval")
        extra = "".join(f", {k} {v:.4f}" for k, v in metrics.items() if k not in ("eval_loss", "eval_ppl"))
        say(f"step {step}: eval_loss {metrics['eval_loss']:.4f}{extra}")
        if task_eval is not None:
            scores = task_eval(setup.model_params(state))
            writer.write(step, scores, kind="tasks")
            say(f"step {step}: {task_eval.summary(scores)}")

    def save(step: int) -> None:
        nonlocal last_saved
        if step != last_saved:
            ckpt.save(step, setup.checkpoint_state(state), {**iterator.get_state(), "model": to_dict(cfg.model),
                                                            "base": base_record})
            writer.sync()
            last_saved = step

    try:
        if start == 0:
            run_eval(0)
        cadence = StepCadence(cfg, steps, end, record)
        for step in range(start, end):
            batch = setup.put_batch(next(iterator))
            profiler.before_step(step, state)
            with profiler.annotation(step):
                state, metrics = step_fn(state, batch)
            cadence.dispatched(step, metrics)
            done = step + 1
            stop = agree_on_signal(signals.received) if multi else signals.received
            due = cadence.boundary(done, stop)
            if due is None:
                continue
            if due.evaluate:
                run_eval(done)
                cadence.restart_clock()
            if due.save:
                save(done)
            if stop:
                say(f"{signal.Signals(stop).name} received: saved checkpoint {done} in {ckpt.directory}; "
                    "run the same command to resume")
                status = 128 + stop
                break
        cadence.flush()
    except NonFiniteLoss as e:
        say(f"llmjax: {e}; stopping. {_blame(ckpt, start if restored else None, e)}")
        status = EXIT_FAILED
    except BaseException:
        writer.close()
        signals.restore()
        raise
    finally:
        profiler.finish(state)
        iterator.close()
        try:
            ckpt.close()
        except BaseException:
            writer.close()
            signals.restore()
            raise
        finally:
            bar.close()
    try:  # the handlers stay until the samples are done: a Ctrl-C must not interrupt a computation midway
        late = None
        if status == EXIT_OK:  # every process gets here; they must agree (the samples are a collective)
            late = agree_on_signal(signals.received) if multi else signals.received
        if late:  # a signal during the last step's eval or save: the checkpoint is saved, skip the samples
            log(f"{signal.Signals(late).name} received after the last step: checkpoint {last_saved} is saved in "
                f"{ckpt.directory}; skipping the samples")
            status = 128 + late
        elif status == EXIT_OK and end < steps:
            log(f"stopped after step {end} of {steps} (train.stop_after): checkpoint {end} in {ckpt.directory}")
        elif status == EXIT_OK:
            show_samples(cfg, setup, setup.model_params(state), data)
            late = agree_on_signal(signals.received) if multi else signals.received
            if late:
                log(f"{signal.Signals(late).name} received during the samples: the run is complete, checkpoint "
                    f"{last_saved} is saved in {ckpt.directory}")
                status = 128 + late
    finally:
        signals.restore()
    writer.close()
    log(f"done in {time.time() - t_start:.0f}s; metrics in {workdir / 'metrics.jsonl'}")
    return status


def _blame(ckpt: Checkpointer, resumed_at: int | None, e: NonFiniteLoss) -> str:
    """Which checkpoint to trust after a non-finite loss. Right after a restore the restored checkpoint is the
    suspect (its values restored finite but may be corrupt), not a good one."""
    good = ckpt.steps()
    if resumed_at is not None and e.step == resumed_at:
        suspect = ckpt.directory / str(resumed_at)
        older = [s for s in good if s < resumed_at]
        before = f"; the one before it is {ckpt.directory / str(older[-1])}" if older else ""
        return (f"This is the first step after restoring {suspect}: that checkpoint is the likely cause (corrupt "
                f"values that are still finite). Move it out of {ckpt.directory} and run the same command to resume "
                f"from the previous one{before}")
    return f"Last good checkpoint: {ckpt.directory / str(good[-1]) if good else 'none'}"
