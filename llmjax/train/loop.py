"""The trainer: set up, init or resume, then step with hooks (`llmjax.train.hooks`: record, evaluate,
checkpoint, sample, profile, stop signals; the lone run's side of them is `llmjax.train.lone`).

Step numbering: the record `{"step": k, "loss": ...}` is the loss of batch k under the
parameters after k updates; `{"step": k, "eval_loss": ...}` evaluates those same
parameters, and checkpoint k holds them (plus the data iterator positioned at batch k).
Metrics of step k are read from the device while step k+1 runs, so the host never
stalls the accelerator; a checkpoint waits for its step's loss to be known finite.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax

from llmjax import runlog
from llmjax.config import Config, ConfigError, config_warnings
from llmjax.data.tokenizers.run_tokenizer import has_copy, run_tokenizer, save_copy, tokenizer_dir
from llmjax.errors import EXIT_FAILED, EXIT_OK, EXIT_STORAGE, StorageError
from llmjax.evals.tasks import load_tasks
from llmjax.models import mup
from llmjax.models.roles import decay_mask, describe_decay
from llmjax.parallel.mesh import describe as describe_mesh
from llmjax.storage import as_path
from llmjax.train import workdir as run_dir
from llmjax.train.checkpoint.compat import check_matches
from llmjax.train.checkpoint.data_state import latest_saved_shares
from llmjax.train.checkpoint.init_from import load_base
from llmjax.train.checkpoint.manager import Checkpointer
from llmjax.train.hooks import Run, close_all, run_loop
from llmjax.train.lone import LoneTrainer, NonFiniteLoss, log
from llmjax.train.objectives import RunData
from llmjax.train.preflight import preflight
from llmjax.train.setup import AbstractParams, Setup, build_setup
from llmjax.train.telemetry.metrics import memory_summary, param_counts
from llmjax.train.telemetry.peak import peak_info
from llmjax.train.telemetry.run_info import write_run_info
from llmjax.train.telemetry.tracking import hardware_info, open_wandb
from llmjax.train.workdir import RESUME_KEYS, check_resumable  # noqa: F401 - re-exported (old import path)


def batch_block(setup: Setup, process_index: int, process_count: int) -> int:
    """Which contiguous block of `batch_size / process_count` rows of each global batch this
    process's devices hold (the process reads exactly those rows). ConfigError when the batch
    sharding does not give every process one such block (e.g. a batch replicated across hosts)."""
    B, L = setup.cfg.train.batch_size, setup.cfg.data.seq_len
    if process_count == 1:
        return 0
    rows: set[int] = set()
    for index in setup.batch_sharding.addressable_devices_indices_map((B, L)).values():
        assert index is not None, "a NamedSharding indexes every addressable device"
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


def _trained(setup: Setup) -> AbstractParams:
    """What the optimizer trains (`Setup.trained`: set by `Setup.__post_init__`, never None)."""
    assert setup.trained is not None
    return setup.trained


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
        check_matches(cfg.model, newest, setup.abstract_state.params, _trained(setup).logical, "the config")
        log(f"would resume from {newest} (its parameter shapes match)")
    t0 = time.time()
    step_fn = setup.jit_train_step().lower(setup.abstract_state, setup.abstract_batch()).compile()
    setup.jit_eval_step().lower(setup.abstract_state.params, setup.abstract_batch()).compile()
    log(f"compiled the train and eval steps in {time.time() - t0:.1f}s; per-device memory: "
        f"{memory_summary(step_fn)}")
    log(f"check passed: {workdir} would train {cfg.train.steps} steps of {cfg.train.batch_size} x "
        f"{cfg.data.seq_len} tokens (nothing was written)")
    return EXIT_OK


def _describe(cfg: Config, setup: Setup) -> tuple[float, float, bool]:
    """Log the mesh, parameter counts, FLOPs per token, peak, pipeline schedule, weight decay, LoRA and muP;
    -> (FLOPs per token, peak FLOP/s per device, whether that peak is reliable)."""
    counts = param_counts(setup.params.shapes, setup.params.logical, cfg.model)
    fpt = setup.family.flops_per_token(cfg.data.seq_len)
    peak, peak_source, peak_reliable = peak_info(jax.devices(), cfg.model.compute_dtype, cfg.data.cache_dir)
    active = f", {counts['active']:,} active" if cfg.model.moe.enabled else ""
    log(f"{describe_mesh(setup.mesh)}; params {counts['total']:,} total, {counts['non_embedding']:,} non-embedding"
        f"{active}; {fpt / 1e6:.2f} MFLOPs/token; peak {peak / 1e12:.2f} TFLOP/s ({peak_source})")
    if setup.schedule is not None:
        log(setup.schedule.describe())
    roles = _trained(setup).roles
    log(describe_decay(roles, decay_mask(roles, cfg.optim.decay_embeddings)))
    if setup.lora is not None:
        log(setup.lora.describe())
    if mup.enabled(cfg.model):
        log(mup.describe(cfg.model))
    return fpt, peak, peak_reliable


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
    block = batch_block(setup, jax.process_index(), jax.process_count())
    data = setup.objective.open_data(cfg, setup.model_family, block, jax.process_count(),
                                     tokenizer=run_tokenizer(cfg, workdir), shares=shares)
    log(f"{data.describe()} ({time.time() - t_start:.1f}s)")
    if primary and not check_only:
        if not has_copy(workdir):
            save_copy(data.tokenizer, tokenizer_dir(workdir))
        run_dir.save_config(cfg, workdir)
    fpt, peak, peak_reliable = _describe(cfg, setup)
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
    """Restore or initialise, then the step loop with the lone trainer's hooks. Returns the exit status."""
    restored = ckpt.restore_latest(setup.checkpoint_abstract_state, check=lambda step_dir: check_matches(
        cfg.model, step_dir, setup.abstract_state.params, _trained(setup).logical, "the config"),
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
    reference = None if restored is not None else lambda: setup.reference_logprobs(state)
    setup.objective.prepare(data, workdir, reference, log)
    t0 = time.time()
    step_fn = setup.jit_train_step().lower(setup.abstract_state, setup.abstract_batch()).compile()
    log(f"compiled train step in {time.time() - t0:.1f}s; per-device memory: {memory_summary(step_fn)}")
    write_run_info(workdir, cfg, step_fn, data, setup.family)  # XLA's FLOPs of the step, eval bytes/token (sweeps)
    trainer = LoneTrainer(cfg, workdir, setup, data, ckpt, iterator, extras, base_record,
                          (fpt, *peak_and_reliable), start if restored else -1)
    run = Run(state, start, cfg.train.stop_after or cfg.train.steps, cfg.train.steps)
    hooks = trainer.hooks(run)
    try:
        run_loop(run, step_fn, _first_batch_logged(iterator, setup.put_batch), hooks)
    except NonFiniteLoss as e:
        trainer.say(f"llmjax: {e}; stopping. {_blame(ckpt, start if restored else None, e)}")
        run.status = EXIT_FAILED
    finally:
        close_all(run, hooks)
    log(f"done in {time.time() - t_start:.0f}s; metrics in {workdir / 'metrics.jsonl'}")
    return run.status


def _first_batch_logged(iterator: Any, put: Any) -> Any:
    """`put(next(iterator))`, logging after the first batch how mixed it is (distinct documents in its rows)."""
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
        return put(batch)

    return next_batch


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
