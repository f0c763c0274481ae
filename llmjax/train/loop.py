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
from pathlib import Path
from typing import Any

import jax
import numpy as np

from llmjax.config import Config, ConfigError, deep_merge, load_yaml, save_config, to_dict, validate
from llmjax.data.pipeline import DataModule
from llmjax.models.roles import decay_mask, describe_decay
from llmjax.parallel.mesh import describe as describe_mesh
from llmjax.train.checkpoint import Checkpointer
from llmjax.train.metrics import (
    MetricsWriter,
    ProgressBar,
    memory_summary,
    mfu,
    param_counts,
    peak_flops,
)
from llmjax.train.optim import current_lr
from llmjax.train.profiling import StepProfiler
from llmjax.train.setup import Setup, build_setup

# Keys of a saved config that must match to resume from its checkpoints.
RESUME_KEYS = ("model", "optim.name")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class NonFiniteLoss(RuntimeError):
    pass


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def check_resumable(cfg: Config, workdir: Path) -> None:
    """Refuse to resume a workdir whose checkpoints belong to a different model or optimizer."""
    saved_path = workdir / "config.yaml"
    if not saved_path.exists() or not (workdir / "checkpoints").exists():
        return
    # Keys the saved file lacks (added to the config since, e.g. model.moe) take today's defaults,
    # which by convention keep the old behaviour.
    saved, now = deep_merge(to_dict(Config()), load_yaml(saved_path)), to_dict(cfg)
    for key in RESUME_KEYS:
        a, b = _lookup(saved, key), _lookup(now, key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs = [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}"
                     for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            diffs = [f"{key}: {a!r} -> {b!r}"] if a != b else []
        if diffs:
            raise ConfigError(
                f"{workdir} holds checkpoints of a different configuration ({'; '.join(diffs)}); "
                "use another --workdir, or restore the original values"
            )


def _lookup(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


class _Signals:
    """Remember SIGTERM/SIGINT instead of dying, so the loop can checkpoint and exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def agree_on_signal(received: int | None) -> int | None:
    """The signal any process has received (the largest), or None: a collective that every process
    calls at the same step, so that all of them stop at the same step (otherwise the ones still
    stepping would wait forever in the next step's collectives)."""
    from jax.experimental import multihost_utils

    got = multihost_utils.process_allgather(np.int32(received or 0))
    return int(np.max(got)) or None


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


def evaluate(setup: Setup, eval_step: Any, params: Any, data: DataModule) -> float:
    """Mean validation NLL per token over `eval.batches` batches."""
    nll, weight = 0.0, 0.0
    sums = [eval_step(params, setup.put_batch(b)) for b in data.eval_batches()]
    for s in jax.device_get(sums):
        nll += float(s["nll_sum"])
        weight += float(s["weight_sum"])
    return nll / max(weight, 1.0)


def train(cfg: Config, workdir: str | Path) -> int:
    """Train `cfg` in `workdir`, resuming from its newest checkpoint. Returns the exit status."""
    workdir = Path(workdir)
    primary = jax.process_index() == 0
    validate(cfg, jax.device_count())
    workdir.mkdir(parents=True, exist_ok=True)
    check_resumable(cfg, workdir)

    t_start = time.time()
    setup = build_setup(cfg)
    multi = jax.process_count() > 1
    # Each process reads only the rows of every global batch that its devices hold.
    data = DataModule(cfg, batch_block(setup, jax.process_index(), jax.process_count()), jax.process_count())
    log(f"{data.describe()} ({time.time() - t_start:.1f}s)")
    if primary:
        save_config(cfg, workdir / "config.yaml")
    counts = param_counts(setup.params.shapes, setup.params.logical, cfg.model)
    L = cfg.data.seq_len
    fpt = setup.family.flops_per_token(L)
    peak, peak_source = peak_flops(jax.devices(), cfg.model.compute_dtype, cfg.data.cache_dir)
    active = f", {counts['active']:,} active" if cfg.model.moe.enabled else ""
    log(f"{describe_mesh(setup.mesh)}; params {counts['total']:,} total, {counts['non_embedding']:,} non-embedding"
        f"{active}; "
        f"{fpt / 1e6:.2f} MFLOPs/token; peak {peak / 1e12:.2f} TFLOP/s ({peak_source})")
    if setup.schedule is not None:
        log(setup.schedule.describe())
    log(describe_decay(setup.params.roles, decay_mask(setup.params.roles, cfg.optim.decay_embeddings)))

    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint.keep, cfg.checkpoint.async_save, primary)
    restored = ckpt.restore_latest(setup.abstract_state)
    if restored is None:
        state, start = setup.init_state(), 0
        iterator = data.train_iterator(0)
    else:
        start, state, data_state = restored
        iterator = data.train_iterator(start)
        if "iterator" in data_state:
            iterator.set_state(data_state["iterator"])
        log(f"resumed from {ckpt.directory / str(start)}")

    t0 = time.time()
    step_fn = setup.jit_train_step().lower(setup.abstract_state, setup.abstract_batch()).compile()
    log(f"compiled train step in {time.time() - t0:.1f}s; per-device memory: {memory_summary(step_fn)}")
    eval_step = setup.jit_eval_step()

    writer = MetricsWriter(workdir, enabled=primary, tensorboard=cfg.train.tensorboard)
    bar = ProgressBar(cfg.train.steps, start, enabled=primary and cfg.train.progress, log_every=cfg.train.log_every)
    signals = _Signals()
    profiler = StepProfiler(cfg.train.profile_steps, workdir, log)
    tokens_per_step = cfg.train.batch_size * L
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
                                f"{m['param_norm']}) at step {step}")
        tps = tokens_per_step / dt if dt > 0 else 0.0
        util = mfu(tps, fpt, peak)
        m.update(lr=current_lr(cfg.optim, steps, step), tokens_per_s=tps, step_time=dt)
        if util is not None:
            m["mfu"] = util
        writer.write(step, m, kind="train")
        bar.update(step + 1, m["loss"], tps, util, m["lr"])

    def run_eval(step: int) -> None:
        if cfg.eval.every_steps <= 0:
            return
        loss = evaluate(setup, eval_step, state.params, data)
        writer.write(step, {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}, kind="eval")
        say(f"step {step}: eval_loss {loss:.4f}")

    def save(step: int) -> None:
        nonlocal last_saved
        if step != last_saved:
            ckpt.save(step, state, {"iterator": iterator.get_state(), "step": step})
            last_saved = step

    try:
        if start == 0:
            run_eval(0)
        pending: tuple[int, Any] | None = None
        t_prev = time.time()
        for step in range(start, end):
            batch = setup.put_batch(next(iterator))
            profiler.before_step(step, state)
            with profiler.annotation(step):
                state, metrics = step_fn(state, batch)
            if pending is not None:
                jax.block_until_ready(pending[1])
                now = time.time()
                record(pending[0], pending[1], now - t_prev)
                t_prev = now
            pending = (step, metrics)
            done = step + 1
            stop = agree_on_signal(signals.received) if multi else signals.received
            ckpt_due = cfg.checkpoint.every_steps > 0 and done % cfg.checkpoint.every_steps == 0
            eval_due = cfg.eval.every_steps > 0 and done % cfg.eval.every_steps == 0
            if ckpt_due or eval_due or done == end or stop:
                jax.block_until_ready(metrics)
                now = time.time()
                record(step, metrics, now - t_prev)
                t_prev, pending = now, None
                if eval_due or done == steps:
                    run_eval(done)
                    t_prev = time.time()
                if ckpt_due or done == end or stop:
                    save(done)
                if stop:
                    name = signal.Signals(stop).name
                    say(f"{name} received: saved checkpoint {done} in {ckpt.directory}; "
                        "run the same command to resume")
                    status = 128 + stop
                    break
        if pending is not None:
            jax.block_until_ready(pending[1])
            record(pending[0], pending[1], time.time() - t_prev)
    except NonFiniteLoss as e:
        good = ckpt.steps()
        say(f"llmjax: {e}; stopping. Last good checkpoint: {ckpt.directory / str(good[-1]) if good else 'none'}")
        status = EXIT_FAILED
    finally:
        profiler.finish(state)
        ckpt.close()
        bar.close()
        signals.restore()

    if status == EXIT_OK and end < steps:
        log(f"stopped after step {end} of {steps} (train.stop_after): checkpoint {end} in {ckpt.directory}")
    elif status == EXIT_OK:
        show_samples(cfg, setup, state.params, data)
    writer.close()
    log(f"done in {time.time() - t_start:.0f}s; metrics in {workdir / 'metrics.jsonl'}")
    return status


def show_samples(cfg: Config, setup: Setup, params: Any, data: DataModule) -> None:
    """Print a greedy and a temperature continuation of `sample.prompt`, decoded by the same engine as
    `llmjax generate` (every process decodes with the sharded parameters; process 0 prints)."""
    from llmjax.infer.engine import Engine
    from llmjax.infer.sampling import SamplingParams

    s = cfg.sample
    if s.max_new_tokens == 0 or not hasattr(setup.family, "step"):
        return
    prompt = data.tokenizer.encode([s.prompt])[0][-(cfg.model.max_seq_len - 1):]
    if not prompt:
        return
    engine = Engine(cfg.model, params, setup.mesh, setup.rules)
    for label, temp in (("greedy", 0.0), (f"temperature {s.temperature}", s.temperature)):
        sp = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=temp, seed=cfg.seed)
        new = engine.generate([prompt], sp, data.tokenizer.eos_id)[0].tokens
        if jax.process_index() == 0:
            print(f"--- sample ({label}) ---\n{s.prompt}{data.tokenizer.decode(new)}\n", flush=True)
