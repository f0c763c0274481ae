"""`WORKDIR/run_info.json`: per-run figures that the scaling workflow reads beside metrics.jsonl.

Written by the trainer once the train step is compiled (every start; a resumed run rewrites the
same values). Keys:

- `flops_per_token_formula`: `flops_per_token(model, seq_len)` (6·matmul params + attention), the
  figure behind `runs.csv`'s `flops` column and MFU.
- `xla_flops_per_step_per_device`: the `flops` entry of XLA's cost analysis of the compiled train
  step (`jax.stages.Compiled.cost_analysis()`), the program one device runs; None where the backend
  gives none (deviceless GPU compiles, some plugins). `xla_flops_per_token` is that figure times
  `devices` divided by the tokens of one step: FLOPs *executed* summed over devices, so work that
  every device repeats (the optimizer update of replicated parameters under pure data
  parallelism) is counted once per device. It also counts what the formula leaves out (norms,
  softmax, the optimizer, the loss).
- `xla_flops_exact` / `xla_flops_caveats`: XLA counts the body of a loop once, whatever its trip
  count, so a scanned layer stack (`model.scan_layers=true`), gradient accumulation
  (`optim.grad_accum_steps > 1`, a scan over microbatches) and pipeline stages make the figure far
  too low (e.g. a 4-layer scanned stack read 0.30x of the unrolled figure). `sweep collect` leaves
  `flops_xla` empty for such runs. The sweep presets use unrolled layers, where the figure is exact.
- `eval_bytes_per_token`: UTF-8 bytes per target token over the validation batches that
  `eval_loss` averages over (weights included; summed over processes), so that
  bits/byte = eval_loss / ln 2 / eval_bytes_per_token. None without validation batches.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from llmjax.config import Config
from llmjax.train.telemetry.metrics import flops_per_token

RUN_INFO = "run_info.json"


def xla_flops(compiled: Any) -> float | None:
    """The `flops` of XLA's cost analysis of a `jax.stages.Compiled` (one device's program), or None.

    jax <= 0.4.30 returns a list with one dict per program, later versions one dict; some
    backends return None or raise."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - e.g. NotImplementedError on backends without a cost model
        return None
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not isinstance(analysis, dict):
        return None
    raw: Any = analysis.get("flops")  # a number; None or absent on some backends (float raises TypeError)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def xla_flops_caveats(cfg: Config) -> list[str]:
    """Why XLA's FLOPs of this config's train step undercount (empty: the figure is exact)."""
    out = []
    if cfg.model.scan_layers and cfg.model.n_layers > 1:
        out.append("model.scan_layers=true: the scanned layer body is counted once, not n_layers times")
    if cfg.optim.grad_accum_steps > 1:
        out.append("optim.grad_accum_steps > 1: the microbatch scan body is counted once")
    if cfg.mesh.pipeline * cfg.mesh.dcn_pipeline > 1:
        out.append("pipeline stages: the schedule's loop body is counted once")
    return out


def eval_bytes_per_token(cfg: Config, data: Any, family: Any) -> float | None:
    """UTF-8 bytes per (weighted) target token of `data.eval_batches()`, summed over processes.

    The targets are the family's (`batch.targets`: next tokens, masked tokens or decoder targets).
    A collective when several processes run: every process must call it."""
    from llmjax.models.families import batch_from_dict
    from llmjax.train.objectives import objective_for

    if not objective_for(cfg).language_modelling:  # bits per byte measures text, not e.g. preference pairs
        return None
    batch_type = family.batch_type
    nbytes = data.tokenizer.model_token_bytes(cfg.model.vocab_size)
    total = np.zeros(2, np.float64)  # [bytes, weight]
    for arrays in data.eval_batches():
        batch = batch_from_dict(batch_type, arrays)
        weights = np.asarray(batch.weights, np.float64)
        total += [float((nbytes[np.asarray(batch.targets)] * weights).sum()), float(weights.sum())]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        total = np.asarray(multihost_utils.process_allgather(total)).reshape(-1, 2).sum(axis=0)
    return float(total[0] / total[1]) if total[1] > 0 else None


def build_run_info(cfg: Config, compiled: Any, data: Any, devices: int, family: Any) -> dict[str, Any]:
    """The run_info.json record (module docstring) of `cfg`'s compiled train step on `devices` devices;
    `family`: the family contract the step trains (`Setup.family`, the objective's wrapper)."""
    per_device = xla_flops(compiled)
    tokens_per_step = cfg.train.batch_size * family.tokens_per_example(cfg.data.seq_len)
    caveats = xla_flops_caveats(cfg)
    return {
        "flops_per_token_formula": flops_per_token(cfg.model, cfg.data.seq_len),
        "xla_flops_per_step_per_device": per_device,
        "xla_flops_per_token": None if per_device is None else per_device * devices / tokens_per_step,
        "xla_flops_exact": per_device is not None and not caveats,
        "xla_flops_caveats": caveats,
        "devices": int(devices),
        "backend": jax.default_backend(),
        "tokens_per_step": tokens_per_step,
        "eval_bytes_per_token": eval_bytes_per_token(cfg, data, family),
    }


def write_run_info(workdir: str | Path, cfg: Config, compiled: Any, data: Any, family: Any) -> dict[str, Any]:
    """Build the record for the trainer's compiled step (training `family`) and write it (process 0) to
    WORKDIR/run_info.json."""
    info = build_run_info(cfg, compiled, data, jax.device_count(), family)
    if jax.process_index() == 0:
        from llmjax.storage import as_path, reraise_storage

        path = as_path(workdir) / RUN_INFO  # local or gs:// (etils.epath)
        tmp = path.parent / f".{RUN_INFO}.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(info, indent=1) + "\n")
            tmp.replace(path)
        except OSError as e:
            reraise_storage(e, "write the run record to", path)
            raise
    return info


def read_run_info(run_dir: str | Path) -> dict[str, Any]:
    """WORKDIR/run_info.json as a dict ({} when absent or unreadable: runs from before it existed)."""
    try:
        from llmjax.storage import as_path

        data = json.loads((as_path(run_dir) / RUN_INFO).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
