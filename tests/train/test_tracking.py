"""Experiment tracking: W&B offline runs (config, hardware, metrics; resume keeps the run) and the
config in TensorBoard as an hparams session and as text."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from helpers import TASK, run_llmjax, tiny_train_overrides, wandb_env


@pytest.mark.slow
def test_wandb_offline_writes_a_run_with_config_hardware_and_metrics(eval_run):
    pytest.importorskip("wandb")
    workdir, _, _ = eval_run
    run_id = (workdir / "wandb_run_id").read_text().strip()
    (run_dir,) = (workdir / "wandb").glob(f"offline-run-*-{run_id}")
    data = (run_dir / f"run-{run_id}.wandb").read_bytes()
    # the resolved config (as JSON values), the hardware record and the logged metric names
    for needle in (b'"d_model":64', b'"vocab_size":512', b"hardware", b'"device_kind":"cpu"', b"train/loss",
                   b"eval/eval_loss", b"tasks/python_mc/acc", b"llmjax-tests"):
        assert needle in data, needle


def _tensorboard_summaries(workdir: Path) -> dict[str, list]:
    from tensorboardX.proto import event_pb2

    values: dict[str, list] = {}
    for path in (workdir / "tensorboard").glob("events.*"):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + n])
            pos += n + 16
            for v in event.summary.value:
                values.setdefault(v.tag, []).append(v)
    return values


@pytest.mark.slow
def test_tensorboard_gets_the_config_as_hparams_and_text(eval_run):
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    workdir, _, _ = eval_run
    tb = _tensorboard_summaries(workdir)
    (start,) = tb["_hparams_/session_start_info"]
    hp = HParamsPluginData.FromString(start.metadata.plugin_data.content).session_start_info.hparams
    assert hp["model.d_model"].number_value == 64 and hp["optim.name"].string_value == "adamw"
    assert hp["eval.tasks"].string_value == json.dumps([str(TASK)])
    (config,) = tb["config/text_summary"]
    assert b"d_model: 64" in config.tensor.string_val[0]
    (hardware,) = tb["hardware/text_summary"]
    assert b"device_kind: cpu" in hardware.tensor.string_val[0]
    assert len(tb["tasks/python_mc/acc"]) == 3


@pytest.mark.slow
def test_wandb_resume_continues_the_run_and_env_offline_is_honoured(eval_run, tmp_path):
    pytest.importorskip("wandb")
    workdir, corpus, _ = eval_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    run_id = (copy / "wandb_run_id").read_text().strip()
    r = run_llmjax("train", "--workdir", copy, *tiny_train_overrides(corpus), "train.steps=12", "eval.every_steps=0",
               "sample.max_new_tokens=0", "log.wandb.project=llmjax-tests",
               env={**wandb_env(tmp_path), "WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-3000:]
    runs = sorted((copy / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2  # the same run id: `wandb sync` appends the resumed part to the same run
    r = run_llmjax("train", "--workdir", tmp_path / "w2", *tiny_train_overrides(corpus), 'log.wandb.project=""')
    assert r.returncode == 2 and "log.wandb.project: empty string" in r.stderr
