"""Multi-process runs on one machine (launch/local.sh), hybrid-mesh shapes and distributed
settings (the cluster launchers' dry runs are in test_launch.py).

The end-to-end tests start real `jax.distributed` runs: 2 processes x 4 CPU devices
against 1 process x 8 devices, with the same {data=2, fsdp=2, tensor=2} mesh.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import full_mesh_shape, tiny_config, tiny_train_overrides

from llmjax.config import ConfigError, load_config, mesh_axis_names, validate
from llmjax.parallel import distributed
from llmjax.parallel.mesh import hybrid_mesh_shape, mesh_shape
from llmjax.train.telemetry.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
LOCAL = str(ROOT / "launch" / "local.sh")

# Default data settings in both the 1- and the 2-process runs (data.shares unset: gcd(batch_size=8, 8) = 8 shares
# whatever the process count), so the same global batches (see llmjax/data/stream/data_module.py).
MESH = ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
RUN = ("train.steps=10", "checkpoint.every_steps=5", "checkpoint.keep=10", "eval.every_steps=5")
# In-loop multiple-choice scoring: every process scores the same requests on the global mesh.
TASKS = (f"eval.tasks=[{ROOT / 'experiments' / 'data' / 'python_mc.jsonl'}]", "eval.tasks_limit=6")


# ----------------------------------------------------------------------------- end to end


def llmjax_train(workdir, corpus, *extra) -> list[str]:
    return [sys.executable, "-m", "llmjax.cli", "train", "--workdir", str(workdir),
            *tiny_train_overrides(corpus), *MESH, *extra]


def one_process(workdir, corpus, *extra) -> subprocess.CompletedProcess:
    """1 process x 8 devices (conftest's XLA_FLAGS)."""
    return subprocess.run(llmjax_train(workdir, corpus, *extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def two_processes(workdir, corpus, *extra) -> subprocess.CompletedProcess:
    """launch/local.sh 2 4 -- llmjax train ...: 2 processes x 4 devices."""
    return subprocess.run([LOCAL, "2", "4", "--", *llmjax_train(workdir, corpus, *extra)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def losses(workdir, kind="train", key="loss") -> dict[int, float]:
    return {k: r[key] for k, r in read_metrics(Path(workdir) / "metrics.jsonl", kind).items()}


def checkpoint_steps(workdir) -> list[int]:
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("single")
    r = one_process(workdir, corpus, *RUN, *TASKS)
    assert r.returncode == 0, r.stderr
    return workdir


@pytest.fixture(scope="module")
def multi(corpus, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multi")
    r = two_processes(workdir, corpus, *RUN, *TASKS)
    assert r.returncode == 0, r.stderr[-5000:]
    return workdir, r


@pytest.mark.multiprocess
def test_two_processes_match_one_process(single, multi):
    workdir, r = multi
    assert "distributed: 2 processes, 8 devices (4 per process)" in r.stderr
    assert "mesh pipeline=1 x data=2 x fsdp=2 x expert=1 x context=1 x tensor=2 over 8 cpu devices" in r.stderr
    assert r.stderr.count("data: mixing: ") == 1  # logged once, by process 0, after the first batch
    ref, got = losses(single), losses(workdir)
    assert sorted(ref) == sorted(got) == list(range(10))
    np.testing.assert_allclose([got[s] for s in range(10)], [ref[s] for s in range(10)], rtol=1e-6)
    ref_eval, got_eval = losses(single, "eval", "eval_loss"), losses(workdir, "eval", "eval_loss")
    assert sorted(got_eval) == [0, 5, 10]
    np.testing.assert_allclose([got_eval[s] for s in (0, 5, 10)], [ref_eval[s] for s in (0, 5, 10)], rtol=1e-6)
    ref_tasks, got_tasks = (read_metrics(Path(w) / "metrics.jsonl", "tasks") for w in (single, workdir))
    assert sorted(got_tasks) == [0, 5, 10]
    for s in (0, 5, 10):
        assert [got_tasks[s][k] for k in ("python_mc/acc", "python_mc/acc_norm", "python_mc/n")] == \
            [ref_tasks[s][k] for k in ("python_mc/acc", "python_mc/acc_norm", "python_mc/n")]
        np.testing.assert_allclose(got_tasks[s]["python_mc/logprob"], ref_tasks[s]["python_mc/logprob"], rtol=1e-5)
    # Only process 0 logs and samples; each process wrote its own checkpoint shards.
    assert r.stdout.count("--- sample (greedy) ---") == 1
    assert r.stderr.count("compiled train step") == 1
    assert checkpoint_steps(workdir) == [5, 10]
    state = workdir / "checkpoints" / "5" / "state"
    assert (state / "ocdbt.process_0").exists() and (state / "ocdbt.process_1").exists()


@pytest.mark.multiprocess
def test_hybrid_mesh_across_two_processes_matches(single, corpus, tmp_path):
    """mesh.dcn_data=2: the data axis spans the 2 processes (each one a "slice", as on a GPU
    cluster); same global mesh sizes, so the same losses."""
    r = two_processes(tmp_path, corpus, *RUN, "mesh.dcn_data=2", "mesh.data=1", "sample.max_new_tokens=0")
    assert r.returncode == 0, r.stderr[-5000:]
    ref, got = losses(single), losses(tmp_path)
    np.testing.assert_allclose([got[s] for s in range(10)], [ref[s] for s in range(10)], rtol=1e-6)


def _rewind_copy(src: Path, dst: Path) -> Path:
    """A copy of a finished run's workdir with only checkpoint 5 left."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "10")
    return dst


@pytest.mark.multiprocess
def test_two_process_checkpoint_restores_in_one_process(single, multi, tmp_path, corpus):
    workdir = _rewind_copy(multi[0], tmp_path / "w")
    r = one_process(workdir, corpus, *RUN)
    assert r.returncode == 0, r.stderr
    assert f"resumed from {workdir / 'checkpoints' / '5'}" in r.stderr
    # Each process hashed its share of the checkpoint's files; one process verifies them all.
    manifests = sorted(p.name for p in (multi[0] / "checkpoints" / "5").glob("llmjax_checksums.*"))
    assert manifests == ["llmjax_checksums.0-of-2.json", "llmjax_checksums.1-of-2.json"]
    assert "is unreadable" not in r.stderr and "not verified" not in r.stderr
    ref, got = losses(single), losses(workdir)
    np.testing.assert_allclose([got[s] for s in range(5, 10)], [ref[s] for s in range(5, 10)], rtol=1e-6)


@pytest.mark.multiprocess
def test_one_process_checkpoint_restores_in_two_processes(single, tmp_path, corpus):
    workdir = _rewind_copy(single, tmp_path / "w")
    r = two_processes(workdir, corpus, *RUN)
    assert r.returncode == 0, r.stderr[-5000:]
    assert f"resumed from {workdir / 'checkpoints' / '5'}" in r.stderr
    ref, got = losses(single), losses(workdir)
    np.testing.assert_allclose([got[s] for s in range(5, 10)], [ref[s] for s in range(5, 10)], rtol=1e-6)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.multiprocess
def test_killing_one_process_stops_all_and_rerun_resumes(corpus, tmp_path):
    workdir = tmp_path / "w"
    log = tmp_path / "launcher.log"
    long_run = ("train.steps=1000", "checkpoint.every_steps=5", "eval.every_steps=0", "sample.max_new_tokens=0")
    with open(log, "w") as err:
        launcher = subprocess.Popen([LOCAL, "--grace", "5", "2", "4", "--", *llmjax_train(workdir, corpus, *long_run)],
                                    cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 300
        while not (checkpoint_steps(workdir) and (workdir / "metrics.jsonl").exists()
                   and max(losses(workdir), default=-1) >= 7):
            assert launcher.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the run never reached step 7"
            time.sleep(0.1)
        pids = {}
        for line in log.read_text().splitlines():
            if line.startswith("local.sh: started process"):
                pids[int(line.split()[3])] = int(line.split("(pid ")[1].split(")")[0])
        assert sorted(pids) == [0, 1]
        os.kill(pids[1], signal.SIGKILL)
        status = launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    text = log.read_text()
    assert status != 0, text[-3000:]
    assert "process 1 (pid" in text and "stopping the others" in text
    deadline = time.time() + 10
    while any(_alive(p) for p in pids.values()) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids.values()), "orphan processes left behind"

    last = checkpoint_steps(workdir)[-1]
    r = two_processes(workdir, corpus, f"train.steps={last + 2}", "checkpoint.every_steps=5", "eval.every_steps=0",
                      "sample.max_new_tokens=0")
    assert r.returncode == 0, r.stderr[-5000:]
    assert f"resumed from {workdir / 'checkpoints' / str(last)}" in r.stderr
    assert {last, last + 1} <= set(losses(workdir))


@pytest.mark.multiprocess
def test_sigterm_to_launcher_stops_every_process_at_the_same_step(corpus, tmp_path):
    """SIGTERM reaches both processes; they agree on the step, save one checkpoint and exit 143."""
    workdir = tmp_path / "w"
    run = ("train.steps=1000", "checkpoint.every_steps=0", "eval.every_steps=0", "sample.max_new_tokens=0")
    launcher = subprocess.Popen([LOCAL, "2", "4", "--", *llmjax_train(workdir, corpus, *run)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not ((workdir / "metrics.jsonl").exists() and max(losses(workdir), default=-1) >= 3):
            assert launcher.poll() is None
            assert time.time() < deadline
            time.sleep(0.1)
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM received: saved checkpoint" in err and "Traceback" not in err
    assert checkpoint_steps(workdir) == [max(losses(workdir)) + 1]


@pytest.mark.multiprocess
def test_local_sh_usage_and_argument_errors():
    r = subprocess.run([LOCAL, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "Usage: launch/local.sh" in r.stdout
    for args in ([], ["2"], ["x", "4", "--", "true"], ["2", "4", "true"], ["2", "4", "--"]):
        r = subprocess.run([LOCAL, *args], capture_output=True, text=True)
        assert r.returncode == 2, args


@pytest.mark.multiprocess
def test_local_sh_failure_status_and_environment(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "child.py"
    script.write_text(f"""import os, sys, time
e = os.environ
i = int(e["LLMJAX_PROCESS_ID"])
__import__("pathlib").Path({str(out)!r}, str(i)).write_text(
    " ".join([e["LLMJAX_NUM_PROCESSES"], e["LLMJAX_COORDINATOR"], e["JAX_PLATFORMS"], e["XLA_FLAGS"]]))
t = time.time()
while i == 1 and len(os.listdir({str(out)!r})) < 3 and time.time() < t + 30:  # fail once all have written
    time.sleep(0.05)
sys.exit(3 if i == 1 else 0)
""")
    script = str(script)
    r = subprocess.run([LOCAL, "--port", "12345", "3", "2", "--", sys.executable, script],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert "process 1 (pid" in r.stderr and "exited with status 3" in r.stderr
    for i in range(3):  # the caller's other XLA flags are kept; the device count is local.sh's
        seen = (out / str(i)).read_text()
        assert seen.startswith("3 127.0.0.1:12345 cpu ") and seen.endswith(" --xla_force_host_platform_device_count=2")
        assert seen.count("xla_force_host_platform_device_count") == 1
    r = subprocess.run([LOCAL, "2", "1", "--", sys.executable, "-c", "pass"], capture_output=True, timeout=60)
    assert r.returncode == 0


# ----------------------------------------------------------------------------- data shares


_READER = """
import json, sys
import numpy as np
import jax
from llmjax.config import load_config
from llmjax.data.stream import records
from llmjax.data.stream.data_module import DataModule
from llmjax.data.stream.grain_pipeline import record_stream
from llmjax.parallel.distributed import initialize
from llmjax.runtime import setup_jax
from llmjax.train.loop import batch_block
from llmjax.train.setup import build_setup

out, overrides = sys.argv[1], sys.argv[2:]
cfg = load_config(None, overrides)
initialize(cfg, None, None, None)
setup_jax(cfg)
p = jax.process_index()
data = DataModule(cfg, batch_block(build_setup(cfg), p, jax.process_count()), jax.process_count())
read = []  # the records the training stream reads (not the tokenizer's training sample)
original = records.FileDocuments.__getitem__
records.FileDocuments.__getitem__ = lambda self, i: read.append(self.name(i)) or original(self, i)
it = data.train_iterator()
batches = [next(it) for _ in range(6)]
it.close()
np.savez(f"{out}/batches_{p}.npz", **{f"{k}_{i}": b[k] for i, b in enumerate(batches) for k in b})
(source,) = data.sources
train, n, R = source.train, len(source.train), data.shares
streams = {r: record_stream(train, source.name, data.spec, r, True) for r in data.local_shares}
epoch0 = [train.name(streams[r][j][0]) for r in data.local_shares for j in range(len(range(r, n, R)))]
own = {train.name(streams[r][j][0]) for r in data.local_shares for j in range(len(read) + 1)}
json.dump({"read": read, "epoch0": epoch0, "own": sorted(own), "all": [train.name(i) for i in range(n)],
           "shares": data.local_shares}, open(f"{out}/read_{p}.json", "w"))
"""


@pytest.mark.multiprocess
def test_two_processes_read_disjoint_shares_whose_union_is_the_global_batch(corpus, tmp_path):
    """launch/local.sh 2 4, default data settings: each process reads only its own records (no document in
    both) and its own rows; concatenated in process order they are the global batch one process reads."""
    import json

    from llmjax.data.stream.data_module import DataModule

    script = tmp_path / "reader.py"
    script.write_text(_READER)
    overrides = [*tiny_train_overrides(corpus), *MESH, "data.prefetch=0", "data.validation_fraction=0.0",
                 "eval.every_steps=0"]
    r = subprocess.run([LOCAL, "2", "4", "--", sys.executable, str(script), str(tmp_path), *overrides], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-5000:]
    reads = [json.loads((tmp_path / f"read_{p}.json").read_text()) for p in range(2)]
    assert [x["shares"] for x in reads] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # each epoch, the two processes' shares hold disjoint documents that together are the corpus; a process
    # reads only its own shares' documents (over several epochs: the tiny corpus wraps)
    e0, e1 = reads[0]["epoch0"], reads[1]["epoch0"]
    assert not set(e0) & set(e1) and sorted(e0 + e1) == sorted(reads[0]["all"])
    for x in reads:
        assert x["read"] and set(x["read"]) <= set(x["own"])
    got = [np.load(tmp_path / f"batches_{p}.npz") for p in range(2)]
    one = DataModule(load_config(None, overrides))
    it = one.train_iterator()
    for k in range(6):
        ref = next(it)
        for key in ref:
            assert np.array_equal(np.concatenate([got[0][f"{key}_{k}"], got[1][f"{key}_{k}"]]), ref[key]), (k, key)
    it.close()


# ----------------------------------------------------------------------------- hybrid mesh


def test_dcn_sizes_are_not_mesh_axes():
    assert mesh_axis_names() == ("pipeline", "data", "fsdp", "expert", "context", "tensor")



def test_hybrid_mesh_shape():
    cfg = load_config(None, ["mesh.dcn_data=2", "mesh.data=-1", "mesh.fsdp=2"])
    ici, dcn = hybrid_mesh_shape(cfg.mesh, 16)
    assert ici == full_mesh_shape(data=4, fsdp=2) and dcn == full_mesh_shape(data=2)
    assert mesh_shape(cfg.mesh, 16) == full_mesh_shape(data=8, fsdp=2)
    cfg = load_config(None, ["mesh.dcn_data=2", "mesh.dcn_fsdp=2", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"])
    assert mesh_shape(cfg.mesh, 32) == full_mesh_shape(data=2, fsdp=8, tensor=2)


@pytest.mark.parametrize("overrides, devices, message", [
    (["mesh.dcn_data=3"], 8, "3 slices do not divide the 8"),
    (["mesh.dcn_data=0"], 8, "mesh.dcn_data must be a positive size"),
    (["mesh.dcn_data=2", "mesh.data=2", "mesh.fsdp=4"], 8, "= 16 devices, but 8 devices"),
    (["mesh.dcn_data=2", "mesh.data=-1", "mesh.fsdp=4"], 12, "do not divide the 6 devices of each of the 2 slices"),
])
def test_hybrid_mesh_validation(overrides, devices, message):
    cfg = load_config(None, overrides, check=False)  # mesh_shape's own checks (load_config refuses some earlier)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        mesh_shape(cfg.mesh, devices)


def test_a_slice_count_below_one_is_refused_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"mesh.dcn_data=0 must be in \[1, "):
        load_config(None, ["mesh.dcn_data=0"])


def test_hybrid_mesh_validate_uses_total_sizes():
    cfg = tiny_config("mesh.dcn_data=2", "mesh.data=2", "mesh.fsdp=2", "train.batch_size=4")
    with pytest.raises(ConfigError, match="mesh.data x mesh.fsdp x mesh.expert = 4 x 2 x 1 = 8"):
        validate(cfg, 8)


def test_build_mesh_uses_create_hybrid_device_mesh(monkeypatch):
    from jax.experimental import mesh_utils

    from llmjax.parallel.mesh import build_mesh

    calls = []

    def fake(ici, dcn, devices, **kw):
        calls.append((list(ici), list(dcn), kw))
        return np.asarray(devices, dtype=object).reshape([i * d for i, d in zip(ici, dcn, strict=True)])

    monkeypatch.setattr(mesh_utils, "create_hybrid_device_mesh", fake)
    cfg = load_config(None, ["mesh.dcn_data=2", "mesh.data=-1", "mesh.fsdp=2"])
    mesh = build_mesh(cfg.mesh)
    # CPU devices: no slice_index
    assert calls == [([1, 2, 2, 1, 1, 1], [1, 2, 1, 1, 1, 1], {"process_is_granule": True})]
    assert dict(mesh.shape) == full_mesh_shape(data=4, fsdp=2)
    assert mesh.devices.size == jax.device_count()
    calls.clear()
    build_mesh(load_config(None, ["mesh.data=-1"]).mesh)
    assert calls == []  # no DCN axis: the plain mesh


# ----------------------------------------------------------------------------- distributed settings


def test_plan_explicit_from_env_flags_and_config():
    cfg = load_config(None, [])
    env = {"LLMJAX_COORDINATOR": "127.0.0.1:1234", "LLMJAX_NUM_PROCESSES": "2", "LLMJAX_PROCESS_ID": "1"}
    p = distributed.plan(cfg, environ=env)
    assert p.kwargs == {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1}
    p = distributed.plan(cfg, "10.0.0.1:99", 4, 3, environ=env)  # flags win
    assert (p.coordinator, p.num_processes, p.process_id) == ("10.0.0.1:99", 4, 3)
    cfg = load_config(None, ["distributed.coordinator=h:1", "distributed.num_processes=2",
                             "distributed.process_id=0"])
    assert distributed.plan(cfg, environ={}).mode == "explicit"
    assert distributed.plan(load_config(None, []), "h:1", 1, 0, environ={}).mode == "single"


def test_plan_auto_detection_and_single():
    cfg = load_config(None, [])
    assert distributed.plan(cfg, environ={}).mode == "single"
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "16", "SLURM_PROCID": "3"}
    assert distributed.plan(cfg, environ=slurm) == distributed.Plan("auto", cluster="slurm")
    assert distributed.plan(cfg, environ={**slurm, "SLURM_NTASKS": "1"}).mode == "single"
    assert distributed.plan(cfg, environ={k: v for k, v in slurm.items() if k != "SLURM_STEP_ID"}).mode == "single"
    # launch/slurm_gpu.sbatch sets only the coordinator; the rank and count come from Slurm.
    p = distributed.plan(cfg, environ={**slurm, "LLMJAX_COORDINATOR": "gpu001:12007"})
    assert p.kwargs == {"coordinator_address": "gpu001:12007", "num_processes": None, "process_id": None}
    off = load_config(None, ["distributed.auto_detect=false"])
    assert distributed.plan(off, environ=slurm).mode == "single"


@pytest.mark.parametrize("args, message", [
    (("127.0.0.1:1", None, None), "--num-processes, --process-id missing"),
    (("127.0.0.1", 2, 0), "HOST:PORT"),
    (("127.0.0.1:1", 2, 2), "process_id < num_processes"),
    (("127.0.0.1:1", 0, 0), "num_processes must be >= 1"),
])
def test_plan_errors(args, message):
    with pytest.raises(ConfigError, match=message):
        distributed.plan(load_config(None, []), *args, environ={})


def test_cli_reports_incomplete_distributed_settings():
    r = subprocess.run([sys.executable, "-m", "llmjax.cli", "train", "--coordinator", "127.0.0.1:1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if not k.startswith(("LLMJAX_", "SLURM_"))})
    assert r.returncode == 2 and "--num-processes, --process-id missing" in r.stderr
