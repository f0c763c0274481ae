"""Sweep workers beyond one process per point: a worker of 2 processes (launch/local.sh, jax.distributed
over gloo) whose process 0 claims and broadcasts, against a local `sweep run`; and a worker training packs
(`--pack 2`) against `sweep run --pack 2`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import ROOT, read_records, run_llmjax, tiny_train_overrides

from llmjax.scaling.cluster.queue import write_queue
from llmjax.scaling.sweep.spec import load_sweep

LOCAL = str(ROOT / "launch" / "local.sh")
ROWS = 8 * 32  # tokens per step of tiny_train_overrides


def _spec(tmp: Path, corpus: str, name: str, tokens, extra=(), hyper=None) -> Path:
    """Tiny points of one shape (d_model 32): seconds each."""
    overrides = tiny_train_overrides(corpus) + ["sample.max_new_tokens=0", "eval.batches=1",
                                                "checkpoint.every_steps=0", *extra]
    spec = {"name": name, "overrides": overrides, "warmup_fraction": 0.1,
            "shapes": [{"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}],
            "grid": {"tokens": [t * ROWS for t in tokens]}}
    if hyper:
        spec["hyperparameters"] = hyper
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _journal(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / ".leases" / "journal.jsonl").read_text().splitlines()]


def _curves(run_dir: Path) -> tuple[dict[int, float], dict[int, float]]:
    train, evals = read_records(run_dir, "train"), read_records(run_dir, "eval")
    return {s: r["loss"] for s, r in train.items()}, {s: r["eval_loss"] for s, r in evals.items()}


@pytest.mark.multiprocess
@pytest.mark.slow
def test_a_two_process_worker_claims_on_process_0_and_equals_a_local_run(tmp_path, corpus):
    """`launch/local.sh 2 4 -- llmjax sweep work DIR`: process 0 claims each point and broadcasts its trainer
    command, process 1 runs the same command (one jax.distributed run of 2 x 4 devices per point), and learns
    the end from process 0. Every point is claimed and DONE exactly once, by one worker name, and its losses
    equal a local `sweep run` (1 process x 8 devices, the same mesh) at the 2-process tests' rtol 1e-6."""
    spec = _spec(tmp_path, corpus, "mp", tokens=(3, 5), extra=("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))
    sweep = load_sweep(spec)
    local = run_llmjax("sweep", "run", spec, "--workdir", tmp_path / "local", timeout=600)
    assert local.returncode == 0, local.stderr[-3000:]

    directory = tmp_path / "w"
    write_queue(sweep, directory, {"lease_seconds": 30, "retries": 0, "pack": 1})
    r = subprocess.run([LOCAL, "2", "4", "--", sys.executable, "-m", "llmjax.cli", "sweep", "work", directory],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert out.count("distributed: 2 processes, 8 devices (4 per process)") == len(sweep.points), out[-3000:]
    assert "done after training 2 points" in out and "process 1 of worker" in out and "done after 2 commands" in out
    events = _journal(directory)
    assert sorted(e["point"] for e in events if e["event"] == "claim") == sorted(p.name for p in sweep.points)
    assert sorted(e["point"] for e in events if e["event"] == "done") == sorted(p.name for p in sweep.points)
    assert len({e["worker"] for e in events}) == 1 and not list((directory / ".leases").glob("*.lease"))
    for p in sweep.points:
        assert (directory / p.name / "DONE").is_file()
        (ref_train, ref_eval), (train, evals) = _curves(tmp_path / "local" / p.name), _curves(directory / p.name)
        assert sorted(train) == sorted(ref_train) == list(range(p.steps)) and sorted(evals) == sorted(ref_eval)
        np.testing.assert_allclose([train[s] for s in ref_train], list(ref_train.values()), rtol=1e-6)
        np.testing.assert_allclose([evals[s] for s in ref_eval], list(ref_eval.values()), rtol=1e-6)
        print(p.name, "bit for bit" if (train, evals) == (ref_train, ref_eval) else "within rtol 1e-6")


@pytest.mark.slow
def test_a_worker_with_pack_2_trains_a_pack_equal_to_sweep_run_pack(tmp_path, corpus):
    """Two points of one shape (different learning rates) in a queue with pack 2: one worker claims
    both, trains them in one program, marks each DONE, and every curve equals `sweep run --pack 2` bit for bit
    (the same packed program; test_pack.py compares packs with lone runs)."""
    spec = _spec(tmp_path, corpus, "packed", tokens=(4,), hyper={"optim.lr": [3e-3, 1e-2]})
    sweep = load_sweep(spec)
    directory = tmp_path / "w"
    write_queue(sweep, directory, {"lease_seconds": 30, "retries": 0, "pack": 2})
    r = run_llmjax("sweep", "work", directory, "--worker", "packer", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("pack of 2: ") == 1 and "done after training 2 points" in r.stdout, r.stdout[-2000:]
    events = _journal(directory)
    assert [e["event"] for e in events] == ["claim", "claim", "done", "done"]
    assert {e["worker"] for e in events} == {"packer"}
    packed = run_llmjax("sweep", "run", spec, "--workdir", tmp_path / "packed", "--pack", "2", timeout=600)
    assert packed.returncode == 0, packed.stderr[-2000:]
    for p in sweep.points:
        assert (directory / p.name / "DONE").is_file()
        train, evals = _curves(directory / p.name)
        assert sorted(train) == list(range(p.steps)) and (train, evals) == _curves(tmp_path / "packed" / p.name)


FOLLOWER = """
import sys
from pathlib import Path
from llmjax.scaling.cluster.broadcast import follow
sys.exit(follow(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
"""


def test_broadcast_followers_run_each_command_once_in_order_and_stop_at_the_end(tmp_path, monkeypatch):
    """Process 0's side (Broadcast) against 2 real follower processes: each runs every announced command once,
    in order, acknowledges it, and exits 0 at the end; process 0 waits for both acknowledgements. The channel
    of a requeued Slurm worker differs from its previous run's; --pack > 1 with several processes is refused."""
    import os
    import time

    from llmjax.scaling import ScalingError
    from llmjax.scaling.cluster.broadcast import Broadcast, channel, process_index
    from llmjax.scaling.cluster.worker import work

    d = tmp_path / "leases"
    d.mkdir()
    stale = Broadcast(d, "old-run", 3)  # another run's end under another channel: never read
    stale.announce(None)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    followers = [subprocess.Popen([sys.executable, "-c", FOLLOWER, str(d), "w1", str(i)], env=env, text=True,
                                  stdout=subprocess.PIPE) for i in (1, 2)]
    b = Broadcast(d, "w1", 3)
    out = tmp_path / "out"
    for k in range(3):
        seq = b.announce([sys.executable, "-c", f"import os; open({str(out)!r} + str(os.getppid()), 'a').write('{k}')"])
        deadline = time.time() + 60
        while not b.acked(seq):
            assert time.time() < deadline
            time.sleep(0.05)
    b.announce(None)
    assert [f.wait(timeout=60) for f in followers] == [0, 0]
    # one file per follower (the commands' parent), each command once and in order
    assert sorted(p.read_text() for p in tmp_path.glob("out*")) == ["012", "012"]
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    first = channel("slurm-7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert channel("slurm-7") != first
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    assert process_index() == (1, 2)
    sweep_dir = tmp_path / "sweep"
    write_queue(load_sweep(_spec(tmp_path, str(tmp_path), "p", tokens=(3,))), sweep_dir, {"pack": 2})
    with pytest.raises(ScalingError, match="--pack 2 needs a worker of one process"):
        work(sweep_dir)


def test_a_tpu_slice_worker_takes_its_host_count_and_index_from_tpu_pod_sh(tmp_path, monkeypatch):
    """On a TPU slice (launch/tpu_pod.sh --workers) the environment has no Slurm or launch/local.sh variables:
    the worker's process count is LLMJAX_WORKER_PROCESSES (the script's, from --type) and its index
    TPU_WORKER_ID, else the TPU VM metadata's agent-worker-number (a stand-in metadata server here), else the
    hostname's -w-<i>; process 0's broadcast then waits for every other host, and `sweep work` sees them."""
    import http.server
    import socket
    import threading

    from llmjax.scaling import ScalingError
    from llmjax.scaling.cluster.broadcast import Broadcast, process_index
    from llmjax.scaling.cluster.worker import work

    for name in ("SLURM_STEP_ID", "SLURM_PROCID", "LLMJAX_NUM_PROCESSES", "LLMJAX_PROCESS_ID", "TPU_WORKER_ID",
                 "LLMJAX_WORKER_PROCESS_ID", "LLMJAX_WORKER_PROCESSES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LLMJAX_WORKER", "sw-w0")
    monkeypatch.setenv("GCE_METADATA_IP", "127.0.0.1:9")  # no metadata server (discard port: refused)
    monkeypatch.setattr(socket, "gethostname", lambda: "t1v-n-1234abcd-w-5")
    assert process_index() == (5, 0)  # a slice started by hand: its size not known
    monkeypatch.setenv("LLMJAX_WORKER_PROCESSES", "1")
    assert process_index() == (0, 1)  # a one-host slice: no broadcast
    monkeypatch.setenv("LLMJAX_WORKER_PROCESSES", "4")
    assert process_index() == (5, 4)

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            ok = self.path.endswith("/attributes/agent-worker-number") and self.headers["Metadata-Flavor"] == "Google"
            self.send_response(200 if ok else 404)
            self.end_headers()
            self.wfile.write(b"3" if ok else b"")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.server_address[1]}")
        assert process_index() == (3, 4)
        monkeypatch.setenv("TPU_WORKER_ID", "2")
        assert process_index() == (2, 4)
    finally:
        server.shutdown()
    monkeypatch.setenv("TPU_WORKER_ID", "0")
    assert process_index() == (0, 4)
    b = Broadcast(tmp_path, "sw-w0", process_index()[1])
    assert not b.acked(b.announce(["true"]))  # process 0 waits for hosts 1..3
    for i in (1, 2, 3):
        (tmp_path / f"sw-w0.ack.{i}").write_text(json.dumps({"seq": 1}))
    assert b.acked(1)
    sweep_dir = tmp_path / "sweep"
    write_queue(load_sweep(_spec(tmp_path, str(tmp_path), "p", tokens=(3,))), sweep_dir, {"pack": 2})
    with pytest.raises(ScalingError, match="this worker has 4"):
        work(sweep_dir)
