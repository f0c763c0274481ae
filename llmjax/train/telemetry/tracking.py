"""Experiment tracking: the run's config and hardware in TensorBoard, and Weights & Biases.

- `hardware_info(mesh_shape)`: what the run ran on (platform, device kind and counts, processes,
  CPU, library versions).
- `tensorboard_config(writer, config, hardware)`: the resolved config as an hparams session
  (every key, dotted) and as text (YAML), the hardware as text.
- `WandbSink`: a metrics sink (`MetricsWriter(..., sinks=[...])`) for one W&B run, created by
  `open_wandb` from `log.wandb` before anything is compiled. wandb is imported only then;
  `WANDB_MODE=offline` (or `log.wandb.mode=offline`) writes the run under WORKDIR/wandb with no
  network. A resumed run continues the same W&B run (id in WORKDIR/wandb_run_id).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

import yaml

from llmjax.config import Config, ConfigError, to_dict

RUN_ID_FILE = "wandb_run_id"
# hparams-dashboard metrics: the tags MetricsWriter gives the losses in TensorBoard
HPARAM_METRICS = ("eval/eval_loss", "train/loss")


def hardware_info(mesh_shape: dict[str, int] | None = None) -> dict[str, Any]:
    """Platform, devices, processes, host CPU and library versions of this run."""
    import flax
    import jax
    import jaxlib
    import optax

    from llmjax.train.telemetry.metrics import cpu_model_name

    devices = jax.devices()
    info = {
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "host": socket.gethostname(),
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
    }
    if mesh_shape is not None:
        info["mesh"] = dict(mesh_shape)
    return info


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """{"model": {"d_model": 256}} -> {"model.d_model": 256}; lists and mappings as JSON, None as "null"."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


def _markdown_code(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())  # an indented block renders verbatim


def tensorboard_config(writer: Any, config: dict[str, Any], hardware: dict[str, Any]) -> None:
    """Write `config` as an hparams session and as YAML text, `hardware` as text, to an
    `llmjax.train.telemetry.writers.EventWriter`."""
    from tensorboardX.summary import hparams

    experiment, session_start, _ = hparams(flat_config(config), dict.fromkeys(HPARAM_METRICS))
    writer.add_summary(experiment)
    writer.add_summary(session_start)
    writer.add_text("config", _markdown_code(yaml.safe_dump(config, sort_keys=False)), 0)
    writer.add_text("hardware", _markdown_code(yaml.safe_dump(hardware, sort_keys=False)), 0)
    writer.flush()


class WandbSink:
    """Logs every metrics record to a W&B run: `{kind}/{name}` against the metric `step` (logged
    as a value, so a step repeated after a resume is kept rather than dropped)."""

    def __init__(self, run: Any):
        self.run = run
        run.define_metric("step")
        run.define_metric("*", step_metric="step")

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        payload: dict[str, Any] = {f"{kind}/{k}": v for k, v in values.items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        payload["step"] = step
        self.run.log(payload)

    def close(self) -> None:
        self.run.finish()

    @property
    def directory(self) -> str:
        return str(self.run.dir)


def _run_id(workdir: Path) -> str:
    """The W&B run id of this workdir: read back on resume, else a new one (saved)."""
    path = workdir / RUN_ID_FILE
    if path.is_file():
        text = path.read_text().strip()
        if text:
            return text
    run_id = uuid.uuid4().hex[:12]  # W&B ids: lower-case letters and digits
    path.write_text(run_id + "\n")
    return run_id


def open_wandb(cfg: Config, workdir: Path, hardware: dict[str, Any]) -> WandbSink | None:
    """Start (or resume) the W&B run of `log.wandb`, or None when no project is set. Process 0 only.

    Errors from wandb (no API key when online, an unknown entity, ...) raise ConfigError."""
    w = cfg.log.wandb
    if w.project is None:
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("log.wandb.project is set but wandb is not installed: pip install 'llmjax[wandb]'") from None
    workdir.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = dict(project=w.project, entity=w.entity, name=w.name or workdir.resolve().name,
                                  group=w.group, tags=list(w.tags) or None, dir=str(workdir), id=_run_id(workdir),
                                  resume="allow", config={**to_dict(cfg), "hardware": hardware,
                                                          "workdir": str(workdir), "argv": sys.argv})
    if w.mode is not None:
        kwargs["mode"] = w.mode
    try:
        run = wandb.init(**kwargs)
    except Exception as e:  # wandb raises its own error types (UsageError, CommError, ...)
        raise ConfigError(f"log.wandb: wandb.init failed: {type(e).__name__}: {e} (offline: WANDB_MODE=offline "
                          "or log.wandb.mode=offline)") from None
    return WandbSink(run)
