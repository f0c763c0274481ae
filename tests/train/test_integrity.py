"""Trustworthy checkpoints and storage errors: corrupted bytes anywhere in the newest checkpoint are detected and
the previous one restored; a full or read-only file system gives one line, exit 3, and earlier checkpoints stay
restorable; eval on a config edited to another shape exits 2 naming the key; a non-finite loss right after a
restore names that checkpoint."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_train_overrides

from llmjax.config import ConfigError
from llmjax.storage import StorageError, storage_problem
from llmjax.train.checkpoint.manager import Checkpointer, CheckpointError, integrity
from llmjax.train.telemetry.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmjax.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def train(workdir: Path, corpus: str, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("train", "--workdir", str(workdir), *tiny_train_overrides(corpus), "eval.every_steps=0", *extra)


def losses(workdir: Path) -> dict[int, float]:
    return {k: r["loss"] for k, r in read_metrics(workdir / "metrics.jsonl").items()}


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> Path:
    """30 of 40 steps (train.stop_after), checkpoints 10, 20, 30: the workdir each test copies and resumes."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    r = train(workdir, corpus, "train.steps=40", "train.stop_after=30", "checkpoint.every_steps=10",
              "checkpoint.keep=5")
    assert r.returncode == 0, r.stderr
    return workdir


# ----------------------------------------------------------------------------- the Checkpointer alone


def _state(seed: int) -> dict:
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"params": {"w": jax.random.normal(k[0], (64, 32)), "b": jax.random.normal(k[1], (32,))},
            "opt": {"mu": jax.random.normal(k[2], (64, 32))}, "step": jnp.int32(seed)}


def _abstract(state: dict) -> dict:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


@pytest.fixture(scope="module")
def saved_steps(tmp_path_factory) -> Path:
    """Checkpoints 1, 2 and 3 of a small state, with their checksums."""
    directory = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    ckpt = Checkpointer(directory, keep=5)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), {"step": step, "iterator": f"position {step}"})
    ckpt.close()
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2", "3"]
    return directory


def test_replicated_arrays_save_without_a_slice_per_device_on_cpu(tmp_path, caplog):
    """orbax's replica-parallel save compiles a jit(slice) per device and shape (64 for the default model on 8
    CPU devices, 4 s of a 4.4 s first save); on CPU each replicated array is written whole from one replica,
    and it restores equal, under another layout too."""
    devices = np.array(jax.devices())
    assert len(devices) == 8
    mesh = jax.sharding.Mesh(devices.reshape(8), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = jax.device_put(_state(7), replicated)
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2)
    with caplog.at_level("WARNING"), jax.log_compiles(True):
        ckpt.save(7, state, {"step": 7})
        ckpt.wait()
    compiled = [r.getMessage() for r in caplog.records if "Compiling jit(slice)" in r.getMessage()]
    assert compiled == []
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rows if x.ndim else replicated),
                          state)
    restored = ckpt.restore_latest(target)
    ckpt.close()
    assert restored is not None and restored[0] == 7
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file())


def _flip(path: Path, where: str) -> None:
    data = bytearray(path.read_bytes())
    assert data, path
    i = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[where]
    chunk = min(4096, len(data) - i)
    data[i:i + chunk] = bytes((b ^ 0x5A) for b in data[i:i + chunk])  # every byte changes
    path.write_bytes(bytes(data))


def test_every_file_of_a_checkpoint_is_covered_by_its_checksums(saved_steps):
    step = saved_steps / "3"
    manifests = [p for p in step.iterdir() if integrity.MANIFEST_RE.match(p.name)]
    assert [p.name for p in manifests] == ["llmjax_checksums.0-of-1.json"]
    listed = set(json.loads(manifests[0].read_text())["files"])
    assert listed == {str(p.relative_to(step)) for p in _files(step) if p not in manifests}
    assert integrity.verify(step) is None


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_corruption_anywhere_falls_back_to_the_previous_checkpoint(saved_steps, tmp_path, where):
    """Each file of the newest step in turn (arrays, OCDBT manifests, orbax metadata, the iterator JSON, the
    checksum manifest itself), bytes flipped at the start, middle or end: step 2 is restored, step 3 set aside."""
    pristine = saved_steps / "3"
    for rel in [p.relative_to(pristine) for p in _files(pristine)]:
        case = tmp_path / uuid.uuid4().hex / "checkpoints"
        shutil.copytree(saved_steps, case)
        _flip(case / "3" / rel, where)
        ckpt = Checkpointer(case)
        try:
            step, state, data = ckpt.restore_latest(_abstract(_state(0)))
        finally:
            ckpt.close()
        assert step == 2, rel
        np.testing.assert_array_equal(state["params"]["w"], _state(2)["params"]["w"])
        assert data["iterator"] == "position 2"
        assert not (case / "3").exists(), rel
        assert [p.name.split("-")[0] for p in (case.parent / "checkpoints_unreadable").iterdir()] == ["3"]


def test_truncated_or_missing_file_fails_verification(saved_steps, tmp_path):
    case = tmp_path / "checkpoints"
    shutil.copytree(saved_steps, case)
    biggest = max(_files(case / "3"), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:-1])
    assert "bytes" in integrity.verify(case / "3")
    biggest.unlink()
    assert "missing" in integrity.verify(case / "3")


def test_checkpoint_without_checksums_is_restored_unverified(saved_steps, tmp_path, capsys):
    case = tmp_path / "checkpoints"
    shutil.copytree(saved_steps, case)
    (case / "3" / "llmjax_checksums.0-of-1.json").unlink()
    ckpt = Checkpointer(case)
    try:
        step, _, _ = ckpt.restore_latest(_abstract(_state(0)))
    finally:
        ckpt.close()
    assert step == 3 and "is not verified" in capsys.readouterr().err


def test_nonfinite_values_fail_the_restore(tmp_path):
    """A checkpoint that verifies (its checksums were taken of bad values) but holds NaNs is not restored."""
    ckpt = Checkpointer(tmp_path / "checkpoints")
    ckpt.save(1, _state(1), {"step": 1})
    bad = _state(2)
    bad["opt"]["mu"] = bad["opt"]["mu"].at[3, 4].set(jnp.nan)
    ckpt.save(2, bad, {"step": 2})
    ckpt.wait()
    step, _, _ = ckpt.restore_latest(_abstract(_state(0)))
    ckpt.close()
    assert step == 1


def test_plain_file_named_like_a_step_is_refused(tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    (directory / "40").write_text("my notes")
    with pytest.raises(CheckpointError, match="40 is a file"):
        Checkpointer(directory)
    assert (directory / "40").read_text() == "my notes"


def test_a_step_that_cannot_be_moved_aside_is_skipped(saved_steps, tmp_path, monkeypatch, capsys):
    case = tmp_path / "checkpoints"
    shutil.copytree(saved_steps, case)
    _flip(max(_files(case / "3"), key=lambda p: p.stat().st_size), "middle")
    from etils import epath

    def refuse(self, target):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(type(epath.Path(str(case))), "rename", refuse)
    ckpt = Checkpointer(case)
    step, _, _ = ckpt.restore_latest(_abstract(_state(0)))
    ckpt.close()
    assert step == 2 and (case / "3").exists()
    assert "could not move the bad checkpoint" in capsys.readouterr().err


def test_storage_errors_are_recognised():
    assert storage_problem(OSError(errno.ENOSPC, "No space left on device")) == "no space left on the device"
    wrapped = ValueError('RESOURCE_EXHAUSTED: Error writing "x": Failed to write: No space left on device')
    assert storage_problem(wrapped) == "no space left on the device"
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert storage_problem(outer) == "read-only file system"
    assert storage_problem(ValueError("shape mismatch")) is None
    e = StorageError("write metrics to", "/nowhere/metrics.jsonl", "no space left on the device")
    assert "/nowhere/metrics.jsonl" in str(e) and "free of" in str(e)


def test_metrics_write_on_a_full_disk_is_a_storage_error(tmp_path, monkeypatch):
    from llmjax.train.telemetry.writers import MetricsWriter

    w = MetricsWriter(tmp_path / "run", tensorboard=True)
    w.write(0, {"loss": 1.0})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(w._file, "write", full)
    with pytest.raises(StorageError, match="metrics.jsonl: no space left on the device"):
        w.write(1, {"loss": 1.0})
    monkeypatch.undo()
    w.close()
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["loss"] == 1.0


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_corrupted_data_file_resumes_bitwise_from_the_previous_checkpoint(trained, corpus, tmp_path):
    """The issue's case: 4 KB of random bytes in the middle of the newest checkpoint's largest data file."""
    reference = tmp_path / "reference"
    r = train(reference, corpus, "train.steps=40", "checkpoint.every_steps=10")
    assert r.returncode == 0, r.stderr
    work = tmp_path / "run"
    shutil.copytree(trained, work)
    data_files = [p for p in (work / "checkpoints" / "30" / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    biggest = max(data_files, key=lambda p: p.stat().st_size)
    blob = bytearray(biggest.read_bytes())
    mid = len(blob) // 2
    blob[mid:mid + 4096] = np.random.default_rng(0).bytes(min(4096, len(blob) - mid))
    biggest.write_bytes(bytes(blob))
    r = train(work, corpus, "train.steps=40", "checkpoint.every_steps=10")
    assert r.returncode == 0, r.stderr
    assert "checkpoints/30 is unreadable (failed verification: file state/" in r.stderr, r.stderr
    assert f"resumed from {work / 'checkpoints' / '20'}" in r.stderr and "Traceback" not in r.stderr
    after, ref = losses(work), losses(reference)
    assert all(after[s] == ref[s] for s in range(20, 40))  # bitwise, from the previous checkpoint on


@pytest.mark.slow
def test_nonfinite_loss_right_after_a_restore_blames_that_checkpoint(trained, corpus, tmp_path):
    """Values that pass every check (finite, checksums taken of them) but are absurd: the run names the
    restored checkpoint instead of calling it good."""
    work = tmp_path / "run"
    shutil.copytree(trained, work)
    ckpt = Checkpointer(work / "checkpoints")
    step_dir = work / "checkpoints" / "30"
    import orbax.checkpoint as ocp

    state = ocp.PyTreeCheckpointHandler().restore(step_dir / "state")
    from llmjax.train.checkpoint.data_state import DataStateHandler, DataStateRestore

    shares = json.loads((step_dir / "data" / "meta.json").read_text())["shares"]  # all of them: one process
    data = DataStateHandler().restore(step_dir / "data", DataStateRestore(list(range(shares))))
    ckpt.close()
    state["params"] = jax.tree.map(lambda x: np.full_like(x, 1e38) if x.dtype == np.float32 else x,
                                   state["params"])
    shutil.rmtree(step_dir)
    ckpt = Checkpointer(work / "checkpoints")
    ckpt.save(30, state, data)
    ckpt.close()
    r = train(work, corpus, "train.steps=40", "checkpoint.every_steps=10")
    assert r.returncode == 1, r.stderr
    assert "first step after restoring" in r.stderr and str(step_dir) in r.stderr, r.stderr
    assert f"the one before it is {work / 'checkpoints' / '20'}" in r.stderr
    assert "Last good checkpoint" not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("edit, key", [
    (("  d_model: 64", "  d_model: 128"), "model.d_model"),
    (("  tie_embeddings: false", "  tie_embeddings: true"), "model.tie_embeddings"),
    (("  n_kv_heads: 2", "  n_kv_heads: 4"), "model.n_kv_heads"),
])
def test_eval_on_a_shape_edited_config_names_the_key(trained, tmp_path, edit, key):
    work = tmp_path / "run"
    shutil.copytree(trained, work)
    text = (work / "config.yaml").read_text()
    assert edit[0] in text
    (work / "config.yaml").write_text(text.replace(edit[0], edit[1]))
    for verb in (["eval", "--workdir", str(work)], ["generate", "--workdir", str(work), "--prompt", "x"]):
        r = run_cli(*verb)
        assert r.returncode == 2, r.stderr
        assert key in r.stderr and "does not match checkpoint" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_shapes_alone_name_the_key(trained):
    """Checkpoints written before the model section was recorded: the logical axes of the mismatched
    dimension name the key."""
    from llmjax.config import load_config
    from llmjax.train.checkpoint.compat import check_matches, saved_param_shapes, shape_diff
    from llmjax.train.setup import model_abstract_params

    def abstract(cfg):
        params = model_abstract_params(cfg.model)
        return params.shapes, params.logical

    step_dir = trained / "checkpoints" / "30"
    shapes = saved_param_shapes(step_dir)
    cfg = load_config(trained / "config.yaml")
    assert shape_diff(shapes, *abstract(cfg)) == []
    wider = load_config(trained / "config.yaml", ["model.d_ff=256"])
    (problem, *_) = shape_diff(shapes, *abstract(wider))
    assert problem.startswith("model.d_ff (axis 'mlp'): the checkpoint has 128, the config gives 256"), problem
    tied = load_config(trained / "config.yaml", ["model.tie_embeddings=true"])
    assert any("lm_head" in p for p in shape_diff(shapes, *abstract(tied)))
    with pytest.raises(ConfigError, match="model.d_ff"):
        check_matches(wider.model, step_dir, *abstract(wider), "config.yaml")


# ----------------------------------------------------------------------------- full and read-only disks


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs (room for the tiny model's first checkpoints only); skipped where mounting is not allowed."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_full_disk_gives_one_line_and_keeps_earlier_checkpoints(small_tmpfs, corpus, tmp_path):
    work = small_tmpfs / "run"
    r = train(work, corpus, "train.steps=40", "checkpoint.every_steps=5", "checkpoint.keep=10")
    assert r.returncode == 3, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("llmjax: error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr and "ERROR:absl" not in r.stderr, r.stderr
    assert "no space left on the device" in errors[0] and str(work / "checkpoints") in errors[0]
    assert "free of 4.0 MiB" in errors[0] and "Last good checkpoint:" in errors[0]
    good = errors[0].split("Last good checkpoint: ")[1].split(" ")[0]
    assert not list((work / "checkpoints").glob("*orbax-checkpoint-tmp*"))  # the partial save was removed
    # The earlier checkpoints restore (and verify) once there is room again.
    moved = tmp_path / "moved"
    shutil.copytree(work, moved)
    r = train(moved, corpus, "train.steps=40", "checkpoint.every_steps=5", "checkpoint.keep=10")
    assert r.returncode == 0, r.stderr
    assert f"resumed from {moved / 'checkpoints' / Path(good).name}" in r.stderr
    assert "is unreadable" not in r.stderr and "not verified" not in r.stderr


@pytest.mark.slow
def test_read_only_workdir_is_a_storage_error(small_tmpfs, corpus):
    work = small_tmpfs / "run"
    r = train(work, corpus, "train.steps=4", "checkpoint.every_steps=2")
    assert r.returncode == 0, r.stderr
    before = sorted(str(p) for p in work.rglob("*"))
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    try:
        r = train(work, corpus, "train.steps=8", "checkpoint.every_steps=2")
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True)
    assert r.returncode == 3, r.stderr
    assert "llmjax: error: cannot create or write the workdir" in r.stderr and "not writable" in r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(str(p) for p in work.rglob("*")) == before


def test_storage_error_is_distinct_from_usage_errors():
    from llmjax import cli

    assert cli.EXIT_STORAGE not in (0, 1, cli.EXIT_USAGE)
    assert "3 a storage" in cli.__doc__
    assert os.path.exists(ROOT / "README.md") and "exit status 3" in (ROOT / "README.md").read_text()


@pytest.mark.slow
def test_sigint_during_the_final_evaluation_is_honoured(corpus, tmp_path):
    """A SIGINT that arrives after the last step's record (during the final eval or save) used to be ignored:
    the run went on to print samples and exited 0. Now the checkpoint is saved and the run exits 130."""
    import signal
    import time

    work = tmp_path / "run"
    cmd = [sys.executable, "-m", "llmjax.cli", "train", "--workdir", str(work), *tiny_train_overrides(corpus),
           "train.steps=6", "checkpoint.every_steps=0", "eval.every_steps=6", "eval.batches=0",
           "sample.max_new_tokens=32"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        path = work / "metrics.jsonl"
        if path.exists() and 5 in read_metrics(path):  # the last step's record: the final eval comes next
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.005)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    # The signal lands in the final eval or save (samples skipped), or, when this poller was slow to send it,
    # during the samples: they finish (a computation is never interrupted midway) and the run still exits 130.
    assert "--- sample" not in out or "SIGINT received during the samples" in err, err
    assert (work / "checkpoints" / "6").is_dir()


@pytest.mark.slow
def test_a_signal_during_the_samples_lets_them_finish_and_exits_128_plus_signal(corpus, tmp_path, monkeypatch,
                                                                                 capfd):
    """A Ctrl-C while the end-of-run samples decode is held until they finish (a KeyboardInterrupt in the middle
    of a computation on the 8 devices left XLA waiting for a rendezvous), then the run exits 130; the handlers
    are the caller's again afterwards."""
    import signal

    from llmjax.config import load_config
    from llmjax.runtime import setup_jax
    from llmjax.train import lone, loop

    sampled = []

    def interrupted_samples(*args):
        os.kill(os.getpid(), signal.SIGINT)  # with the trainer's handler installed: recorded, not raised
        sampled.append(True)

    monkeypatch.setattr(lone, "show_samples", interrupted_samples)  # the lone trainer's Samples hook calls it
    before = signal.getsignal(signal.SIGINT)
    cfg = load_config(None, [*tiny_train_overrides(corpus), "train.steps=2", "eval.every_steps=0"])
    setup_jax(cfg)
    assert loop.train(cfg, tmp_path / "run") == 130
    assert sampled == [True] and signal.getsignal(signal.SIGINT) is before
    assert "SIGINT received during the samples" in capfd.readouterr().err
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()


def test_library_noise_goes_to_the_log_not_the_terminal(tmp_path):
    """What orbax/absl log, what fails in background threads, and what extension modules report through
    sys.excepthook (tensorstore after a failed save: 'Event loop is closed') end up in WORKDIR/llmjax.log."""
    code = f"""
import logging, sys, threading
from llmjax import runlog
runlog.attach({str(tmp_path)!r})
logging.getLogger("absl").error("orbax: a page of traceback")
try:
    raise RuntimeError("Event loop is closed")
except RuntimeError:
    sys.excepthook(*sys.exc_info())
t = threading.Thread(target=lambda: 1 / 0, name="save_finalize")
t.start(); t.join()
logging.getLogger("asyncio").error("Task exception was never retrieved (during the run)")
runlog.detach()
logging.basicConfig()  # a stderr handler, as a library may install
logging.getLogger("asyncio").error("Task exception was never retrieved (garbage-collected at exit)")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "Event loop" not in r.stderr and "a page of traceback" not in r.stderr
    assert "a background thread (save_finalize) failed: ZeroDivisionError" in r.stderr  # one line
    log = (tmp_path / "llmjax.log").read_text()
    assert "a page of traceback" in log and "Event loop is closed" in log and "ZeroDivisionError" in log
    # asyncio's "never retrieved" pages (orbax's aborted saves), even after detach: never on the terminal
    assert "(during the run)" in log and "never retrieved" not in r.stderr
