"""A full disk before the run starts or during training: exit 3 with the path and the free space, and the
metrics writer's close() never hides the first error. On a real small tmpfs where this process may mount one
(root in the sandbox; skipped elsewhere), and at the writer level with ENOSPC injected (always)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import tiny_train_overrides

from llmjax.errors import StorageError
from llmjax.train.hooks import Hook, Run, close_all
from llmjax.train.telemetry.writers import MetricsWriter

ROOT = Path(__file__).resolve().parents[2]


class _FullFile:
    """A metrics file on a disk that is full: every write, flush and close fails with ENOSPC."""

    def __init__(self, real):
        self.real = real

    def _full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    write = flush = _full

    def close(self):
        self.real.close()
        self._full()


def test_a_full_disk_during_training_names_the_file_and_close_does_not_hide_it(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer._file = _FullFile(writer._file)  # the disk fills after the run started
    with pytest.raises(StorageError, match=f"cannot write metrics to {tmp_path / 'metrics.jsonl'}: no space left"):
        writer.write(10, {"loss": 1.0})
    with pytest.raises(StorageError, match="no space left on the device .* free of"):
        writer.close()  # a StorageError naming the file, not the raw OSError of the buffered flush

    class Closing(Hook):
        def close(self, run):
            raise StorageError("write metrics to", tmp_path / "metrics.jsonl", "no space left on the device")

    run = Run(None, 0, 10, 10)
    close_all(run, [Closing()], failing=True)  # an error already on its way out: closing errors are logged only
    with pytest.raises(StorageError):
        close_all(run, [Closing()])


@pytest.fixture
def tmpfs(tmp_path):
    """A 3 MiB tmpfs (skips where mounting is not permitted)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path, leave: int = 0) -> None:
    """Write zeros into `directory` until fewer than `leave` bytes are free (or the disk is full)."""
    with open(directory / "filler", "ab") as f:
        try:
            while shutil.disk_usage(directory).free > leave:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass


@pytest.mark.slow
def test_a_disk_full_before_the_run_starts(tmpfs, corpus):
    _fill(tmpfs, leave=16 << 10)
    r = subprocess.run([sys.executable, "-m", "llmjax.cli", "train", "--workdir", str(tmpfs / "run"),
                        *tiny_train_overrides(corpus), "train.steps=4"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 3, r.stderr
    assert f"{tmpfs / 'run'}" in r.stderr and "no space left on the device" in r.stderr, r.stderr
    assert "free of 3.0 MiB" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("llmjax: error:") == 1, r.stderr


@pytest.mark.slow
def test_a_disk_that_fills_during_training(tmpfs, corpus):
    workdir = tmpfs / "run"
    proc = subprocess.Popen([sys.executable, "-m", "llmjax.cli", "train", "--workdir", str(workdir),
                             *tiny_train_overrides(corpus), "train.steps=100000", "checkpoint.every_steps=100000",
                             "eval.every_steps=0", "sample.max_new_tokens=0"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not ((workdir / "metrics.jsonl").exists() and os.path.getsize(workdir / "metrics.jsonl") > 0):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
            time.sleep(0.2)
        _fill(tmpfs)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 3, err
    assert f"cannot write metrics to {workdir / 'metrics.jsonl'}: no space left on the device" in err, err
    assert "free of 3.0 MiB" in err and "Traceback" not in err, err
