"""Checkpoints: kill -9 and resume reproduces the uninterrupted run bitwise; restore under
another mesh; an unreadable newest checkpoint falls back to the previous one; SIGTERM
saves and exits; a non-finite loss stops the run and keeps the last good checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_train_overrides

from llmjax.train.telemetry.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # every test trains in a subprocess, most of them kill it on the way


def train_cmd(workdir, corpus, *extra):
    return [sys.executable, "-m", "llmjax.cli", "train", "--workdir", str(workdir),
            *tiny_train_overrides(corpus), *extra]


def run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


def losses(workdir) -> dict[int, float]:
    return {k: r["loss"] for k, r in read_metrics(Path(workdir) / "metrics.jsonl").items()}


def wait_for_step(proc, workdir, step, timeout=300):
    """Poll metrics.jsonl until a train record with step >= `step` appears."""
    path = Path(workdir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        if path.exists() and any(s >= step for s in read_metrics(path)):
            return True
        time.sleep(0.02)
    raise TimeoutError(f"no step {step} in {path} after {timeout}s")


# 2 data shares (the default is 8 at batch 8): data.workers=2 then starts 4 grain worker processes instead of 16
# (each imports jax and grain), which took most of the workers=2 case's time on 2 cores.
STEPS = ("train.steps=60", "checkpoint.every_steps=10", "eval.every_steps=20", "data.shares=2")


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    r = run(train_cmd(workdir, corpus, *STEPS))
    assert r.returncode == 0, r.stderr
    return workdir, losses(workdir)


@pytest.mark.parametrize("workers", [0, 2])
def test_kill9_then_resume_reproduces_the_loss_curve(corpus, uninterrupted, tmp_path, workers):
    """Also with tokenizer worker processes (grain mp_prefetch): the same curve as the run without them."""
    _, reference = uninterrupted
    assert sorted(reference) == list(range(60))
    extra = (f"data.workers={workers}",)
    proc = subprocess.Popen(train_cmd(tmp_path, corpus, *STEPS, *extra), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    reached = wait_for_step(proc, tmp_path, 25)
    proc.kill()
    proc.wait()
    assert reached and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    before = losses(tmp_path)
    assert max(before) < 59
    r = run(train_cmd(tmp_path, corpus, *STEPS, *extra))
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr
    after = losses(tmp_path)
    assert sorted(after) == list(range(60))
    assert after == reference  # bitwise: same floats for every step, before and after the kill
    evals = {k: v["eval_loss"] for k, v in read_metrics(tmp_path / "metrics.jsonl", "eval").items()}
    ref_evals = {k: v["eval_loss"] for k, v in read_metrics(uninterrupted[0] / "metrics.jsonl", "eval").items()}
    assert evals == ref_evals


def test_restore_under_another_mesh(corpus, uninterrupted, tmp_path):
    """Save with data=8, resume with data=2 x fsdp=2 x tensor=2: the curve continues."""
    _, reference = uninterrupted
    first = run(train_cmd(tmp_path, corpus, *STEPS, "checkpoint.keep=10", "mesh.data=8"))
    assert first.returncode == 0, first.stderr
    # Rewind: keep only checkpoint 30, then resume under another layout.
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "30").exists()
    moved = tmp_path / "later"
    moved.mkdir()
    for d in ckpts.iterdir():
        if d.name.isdigit() and int(d.name) > 30:
            d.rename(moved / d.name)
    second = run(train_cmd(tmp_path, corpus, *STEPS, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and "/30" in second.stderr
    after = losses(tmp_path)
    steps = list(range(30, 60))
    np.testing.assert_allclose([after[s] for s in steps], [reference[s] for s in steps], rtol=2e-5)


def _corrupt(checkpoint: Path) -> None:
    files = [p for p in checkpoint.rglob("*") if p.is_file() and p.stat().st_size > 0]
    assert files
    for p in files:
        p.write_bytes(b"\x00garbage" * 4)


def test_unreadable_newest_checkpoint_falls_back(corpus, uninterrupted, tmp_path):
    _, reference = uninterrupted
    short = ("train.steps=60", "checkpoint.every_steps=10", "eval.every_steps=0", "data.shares=2")
    proc = subprocess.Popen(train_cmd(tmp_path, corpus, *short), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_step(proc, tmp_path, 35)
    proc.kill()
    proc.wait()
    ckpts = sorted(int(d.name) for d in (tmp_path / "checkpoints").iterdir() if d.name.isdigit())
    assert len(ckpts) >= 2
    newest, previous = ckpts[-1], ckpts[-2]
    _corrupt(tmp_path / "checkpoints" / str(newest))
    r = run(train_cmd(tmp_path, corpus, *short))
    assert r.returncode == 0, r.stderr
    assert f"checkpoints/{newest} is unreadable" in r.stderr
    assert f"resumed from {tmp_path / 'checkpoints' / str(previous)}" in r.stderr
    aside = list((tmp_path / "checkpoints_unreadable").iterdir())
    assert [p.name.split("-")[0] for p in aside] == [str(newest)]  # kept, not deleted
    after = losses(tmp_path)
    assert all(after[s] == reference[s] for s in range(60))


def test_all_checkpoints_unreadable_is_a_clear_error(corpus, tmp_path):
    r = run(train_cmd(tmp_path, corpus, "train.steps=4", "checkpoint.every_steps=2", "eval.every_steps=0"))
    assert r.returncode == 0, r.stderr
    for d in (tmp_path / "checkpoints").iterdir():
        if d.name.isdigit():
            _corrupt(d)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    r = run(train_cmd(tmp_path, corpus, "train.steps=6", "checkpoint.every_steps=2", "eval.every_steps=0"))
    assert r.returncode == 2
    assert "could be restored" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before


def test_sigterm_saves_and_exits_cleanly(corpus, uninterrupted, tmp_path):
    _, reference = uninterrupted
    proc = subprocess.Popen(train_cmd(tmp_path, corpus, *STEPS), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert wait_for_step(proc, tmp_path, 12)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM received: saved checkpoint" in err and "Traceback" not in err
    saved = max(int(d.name) for d in (tmp_path / "checkpoints").iterdir() if d.name.isdigit())
    assert saved == max(losses(tmp_path)) + 1  # the step it stopped at, not an older one
    r = run(train_cmd(tmp_path, corpus, *STEPS))
    assert r.returncode == 0, r.stderr
    assert losses(tmp_path) == reference


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path):
    # Huge plain-SGD steps blow the weights up within a few steps.
    r = run(train_cmd(tmp_path, corpus, "train.steps=30", "checkpoint.every_steps=1", "eval.every_steps=0",
                      "optim.name=sgd", "optim.lr=1e38", "optim.clip_norm=0", "optim.warmup_steps=10",
                      "optim.schedule=constant", "optim.b1=0"))
    assert r.returncode == 1, r.stderr
    assert "non-finite loss" in r.stderr and "at step" in r.stderr
    bad_step = int(r.stderr.split("at step ")[1].split(";")[0].split()[0])
    kept = sorted(int(d.name) for d in (tmp_path / "checkpoints").iterdir() if d.name.isdigit())
    assert kept and max(kept) <= bad_step  # nothing saved from after the bad step
    assert os.path.exists(tmp_path / "metrics.jsonl")


CONTEXT = ("mesh.data=2", "mesh.context=4", "model.context_parallel=ring", "train.steps=12",
           "checkpoint.every_steps=4", "eval.every_steps=0", "sample.max_new_tokens=0")


def test_kill9_then_resume_with_a_context_axis(corpus, tmp_path):
    """Context parallelism (the sequence split over 4 devices, ring attention): kill -9 and resume gives the
    uninterrupted run's losses bitwise."""
    ref_dir = tmp_path / "uninterrupted"
    r = run(train_cmd(ref_dir, corpus, *CONTEXT))
    assert r.returncode == 0, r.stderr
    reference = losses(ref_dir)
    assert sorted(reference) == list(range(12))
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(workdir, corpus, *CONTEXT), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    reached = wait_for_step(proc, workdir, 9)  # after the step-4 checkpoint is surely written
    proc.kill()
    proc.wait()
    assert reached and proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert max(losses(workdir)) < 11
    r = run(train_cmd(workdir, corpus, *CONTEXT))
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr
    assert losses(workdir) == reference
