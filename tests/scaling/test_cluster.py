"""Sweeps on a cluster (llmjax/scaling/cluster/): the lease protocol under a hundred concurrent claimers,
a worker retrying and failing a diverging point, `sweep status`, `sweep submit`'s bad input; and on a real
one-node Slurm cluster (launch/slurm_local.sh, the `slurm_cluster` fixture) a sweep of 3 workers, one
cancelled with scancel and one killed with kill -9 mid-point, equal bit for bit to a local `sweep run`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from helpers import assert_each_point_won_once, run_llmjax, tiny_train_overrides

from llmjax.scaling.cluster.lease import Lease, LocalLeases
from llmjax.scaling.cluster.queue import write_queue
from llmjax.scaling.sweep.spec import load_sweep

ROOT = Path(__file__).resolve().parents[2]
ROWS = 8 * 32  # tokens per step of tiny_train_overrides


def _spec(tmp: Path, corpus: str, name: str = "tiny", tokens=(6, 9, 12), extra=(), lr=None) -> Path:
    """A grid of tiny models (2 shapes x len(tokens) token budgets): seconds per point."""
    overrides = tiny_train_overrides(corpus) + ["sample.max_new_tokens=0", "eval.batches=1",
                                                "checkpoint.every_steps=10", *extra]
    spec = {"name": name, "overrides": overrides, "warmup_fraction": 0.1,
            "shapes": [{"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64},
                       {"d_model": 64, "n_layers": 1, "n_heads": 4, "d_ff": 128}],
            "grid": {"tokens": [t * ROWS for t in tokens]}}
    if lr:
        spec["hyperparameters"] = {"optim.lr": lr}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _journal(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / ".leases" / "journal.jsonl").read_text().splitlines()]


CLAIMERS = textwrap.dedent("""
    import os, sys, time
    from llmjax.scaling.cluster.lease import Lease, LocalLeases
    directory, out, n, points = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    start = time.time() + 1.0  # every claimer is forked and waiting before the race starts
    children = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:  # one claimer: its own LocalLeases, racing for every point
            leases = LocalLeases(directory)
            while time.time() < start:
                time.sleep(0.0005)
            won = []
            for point in points:
                held = leases.read(point)
                lease = Lease(point, f"claimer{i}")
                ok = leases.claim(lease) if held is None else held[1] > 30 and leases.take_over(held[0], lease, 30)
                if ok:
                    won.append(point)
            with open(os.path.join(out, str(i)), "w") as f:
                f.write(" ".join(won))
            os._exit(0)
        children.append(pid)
    sys.exit(max(os.waitpid(pid, 0)[1] for pid in children))
""")


def test_a_hundred_concurrent_claimers_never_claim_a_point_twice(tmp_path):
    """100 processes race for 10 free points and 10 stale leases (heartbeat 60 s old, lease time 30 s):
    every point is won exactly once, and every winner's token is the one in the lease file."""
    leases = LocalLeases(tmp_path / "sweep")
    free = [f"free{i}" for i in range(10)]
    stale = [f"stale{i}" for i in range(10)]
    for point in stale:
        assert leases.claim(Lease(point, "gone"))
        old = time.time() - 60
        os.utime(leases.dir / f"{point}.lease", (old, old))
    out = tmp_path / "wins"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-c", CLAIMERS, str(tmp_path / "sweep"), str(out), "100", *free, *stale],
                       env=env, timeout=120)
    assert r.returncode == 0
    wins = {int(f.name): f.read_text().split() for f in out.iterdir()}
    assert len(wins) == 100
    assert_each_point_won_once(wins, free + stale, leases)


def test_lease_heartbeat_takeover_and_release(tmp_path):
    leases = LocalLeases(tmp_path)
    mine = Lease("p", "w1")
    assert leases.claim(mine) and not leases.claim(Lease("p", "w2"))
    assert leases.heartbeat(mine)
    held, age = leases.read("p")
    assert held.token == mine.token and age < 5
    assert not leases.take_over(held, Lease("p", "w2"), lease_seconds=30)  # fresh: not stale
    old = time.time() - 60
    os.utime(leases.dir / "p.lease", (old, old))
    theirs = Lease("p", "w2")
    assert leases.take_over(leases.read("p")[0], theirs, lease_seconds=30)
    assert not leases.heartbeat(mine)  # w1 lost it: its heartbeat says so
    leases.release(mine)  # not w1's any more: nothing happens
    assert leases.read("p")[0].token == theirs.token
    leases.release(theirs)
    assert leases.read("p") is None and leases.claim(Lease("p", "w3"))
    leases.set_failures("p", 2, "llmjax: boom")
    assert leases.failures("p") == (2, "llmjax: boom") and leases.failures("q") == (0, "")


def test_claims_follow_spec_order_packs_and_leave_done_and_given_up_points(tmp_path, corpus):
    """claim(): spec order; with k=2 the second point is one that packs with the first (same shape);
    done points are skipped, failed ones retried until their failures exceed `retries`; WAIT while live
    workers hold the rest, None when nothing is left."""
    from llmjax.scaling.cluster.worker import WAIT, claim

    sweep = load_sweep(_spec(tmp_path, corpus, tokens=(3,), lr=[1e-3, 2e-3]))
    names = [p.name for p in sweep.points]  # d32 x 2 learning rates (they pack), then d64 x 2
    settings = {"lease_seconds": 60.0, "retries": 1, "pack": 2}
    d = tmp_path / "w"
    write_queue(sweep, d, settings)
    leases = LocalLeases(d)
    got = claim(d, sweep, leases, settings, "a", k=2)
    assert [p.name for p, _ in got] == names[:2]
    (d / names[2]).mkdir()
    (d / names[2] / "DONE").write_text("{}")
    leases.set_failures(names[3], 1, "llmjax: boom")  # one failure, one retry left
    got = claim(d, sweep, leases, settings, "b")
    assert [p.name for p, _ in got] == [names[3]]
    leases.release(got[0][1])
    leases.set_failures(names[3], 2, "llmjax: boom")
    (d / names[3]).mkdir()
    (d / names[3] / "FAILED").write_text(json.dumps({"exit_status": 1, "error": "llmjax: boom"}))
    assert claim(d, sweep, leases, settings, "b") == WAIT  # a's two points are still leased
    for p in names[:2]:
        leases.release(leases.read(p)[0])
        (d / p / "DONE").parent.mkdir(exist_ok=True)
        (d / p / "DONE").write_text("{}")
    assert claim(d, sweep, leases, settings, "b") is None
    assert [e["event"] for e in _journal(d)] == ["claim", "claim", "claim"]


@pytest.mark.slow
def test_a_diverging_point_fails_after_its_retries_and_status_says_why(tmp_path, corpus):
    """Two points, one with a diverging learning rate: the worker trains the good one, tries the bad one
    1 + retries times, then marks it FAILED with the trainer's error line; status --wait exits 1."""
    sweep = load_sweep(_spec(tmp_path, corpus, tokens=(6,), lr=[3e-3, 1e6]))
    sweep.points = [p for p in sweep.points if p.shape["d_model"] == 32]
    good, bad = sweep.points
    write_queue(sweep, tmp_path / "w", {"lease_seconds": 20, "retries": 1, "pack": 1})
    r = run_llmjax("sweep", "work", tmp_path / "w", "--worker", "solo", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    events = [(e["event"], e["point"]) for e in _journal(tmp_path / "w")]
    assert events == [("claim", good.name), ("done", good.name), ("claim", bad.name), ("retry", bad.name),
                      ("claim", bad.name), ("failed", bad.name)]
    failed = json.loads((tmp_path / "w" / bad.name / "FAILED").read_text())
    assert failed["failures"] == 2 and failed["error"].startswith("llmjax: non-finite loss")
    st = run_llmjax("sweep", "status", tmp_path / "w", "--wait", "--json")
    assert st.returncode == 1, st.stderr
    info = {p["name"]: p for p in json.loads(st.stdout)["points"]}
    assert info[good.name]["state"] == "done" and isinstance(info[good.name]["final_loss"], float)
    assert info[bad.name]["state"] == "failed" and "non-finite loss" in info[bad.name]["error"]
    table = run_llmjax("sweep", "status", tmp_path / "w").stdout
    assert "1 done, 1 failed" in table and "non-finite loss" in table


def _cli(capsys, *args) -> tuple[int, str, str]:
    """`llmjax ARGS` in this process (no interpreter and jax start-up per call): (status, stdout, stderr)."""
    from llmjax.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _status_wait(capsys, directory: Path, *extra) -> tuple[int, str, float]:
    """`sweep status DIR --wait --every 0.1 EXTRA` in this process -> (status, its last stderr line, seconds)."""
    t = time.time()
    rc, _, err = _cli(capsys, "sweep", "status", directory, "--wait", "--every", "0.1", *extra)
    return rc, err.strip().splitlines()[-1], time.time() - t


def test_status_wait_gives_up_with_exit_4_when_no_worker_is_left(tmp_path, corpus, capsys, monkeypatch):
    """`status --wait` with a point pending: no lease, no journal entry, no queued job -> exit 4 after --grace
    (default: the lease time) with one line saying why; a submitted Slurm job still in squeue (DIR/jobs.json)
    keeps it waiting, as does a live lease until its point is done (then 0)."""
    import threading

    sweep = load_sweep(_spec(tmp_path, corpus, tokens=(3,)))
    first, second = sweep.points
    d = tmp_path / "w"
    write_queue(sweep, d, {"lease_seconds": 0.3, "retries": 0, "pack": 1})
    (d / first.name).mkdir()
    (d / first.name / "DONE").write_text("{}")
    rc, line, _ = _status_wait(capsys, d)
    assert rc == 4 and "1 point(s) left and no worker alive" in line and "--grace 0.3" in line, line
    rc, line, seconds = _status_wait(capsys, d, "--grace", "0.8")
    assert rc == 4 and "--grace 0.8" in line and seconds >= 0.8
    # A job of this sweep in Slurm's queue (a stand-in squeue lists it while `queued` exists): alive.
    (tmp_path / "bin").mkdir()
    queued = tmp_path / "queued"
    (tmp_path / "bin" / "squeue").write_text(f"#!/bin/sh\n[ -f {queued} ] && echo 7\nexit 0\n")
    (tmp_path / "bin" / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    (d / "jobs.json").write_text('["7"]')
    queued.touch()
    threading.Timer(1.0, queued.unlink).start()
    rc, line, seconds = _status_wait(capsys, d)
    assert rc == 4 and seconds >= 1.0, (seconds, line)  # not while the job was queued
    # A live lease (a worker training the point) until the point is done: exit 0, however long it takes.
    leases = LocalLeases(d)
    lease = Lease(second.name, "w1")
    assert leases.claim(lease)

    def finish():
        (d / second.name).mkdir()
        (d / second.name / "DONE").write_text("{}")
        leases.release(lease)

    started = time.time()  # the point is done 1 s from here, before the command's own clock starts
    threading.Timer(1.0, finish).start()
    write_queue(sweep, d, {"lease_seconds": 60, "retries": 0, "pack": 1})  # the lease stays fresh
    rc, _, _ = _status_wait(capsys, d, "--grace", "0.3")
    assert rc == 0 and time.time() - started >= 1.0  # waited for the point, not --grace 0.3


def test_submit_bad_input_one_line_exit_2_nothing_submitted(tmp_path, corpus, capsys, monkeypatch):
    spec = _spec(tmp_path, corpus)
    (tmp_path / "bin").mkdir()
    with monkeypatch.context() as m:
        m.setenv("PATH", str(tmp_path / "bin"))  # no Slurm on this PATH
        rc, _, err = _cli(capsys, "sweep", "submit", spec, "--executor", "slurm", "--workers", "2",
                          "--gpus-per-worker", "0", "--workdir", tmp_path / "w")
    assert rc == 2 and "sbatch/sinfo are not on this machine's PATH" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "w").exists()
    big = _spec(tmp_path, corpus, name="big", extra=["mesh.data=4", "mesh.fsdp=4", "train.batch_size=16"])
    rc, _, err = _cli(capsys, "sweep", "submit", big, "--executor", "slurm", "--workers", "2", "--gpus-per-worker", "8",
                      "--workdir", tmp_path / "w")
    assert rc == 2 and "needs 16 GPUs (its mesh), a worker has 8" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "w").exists()
    write_queue(load_sweep(big), tmp_path / "other", {})
    rc, _, err = _cli(capsys, "sweep", "submit", spec, "--executor", "slurm", "--workers", "2", "--gpus-per-worker",
                      "0", "--workdir", tmp_path / "other", "--dry-run")
    assert rc == 2 and "holds another sweep ('big'" in err and len(err.strip().splitlines()) == 1
    # 16-device points and workers of 2 nodes x 8 GPUs: one array of 2-node workers (3 of them).
    rc, out, err = _cli(capsys, "sweep", "submit", big, "--executor", "slurm", "--workers", "3", "--nodes-per-worker",
                        "2", "--workdir", tmp_path / "w2", "--partition", "h100", "--dry-run")
    assert rc == 0, err
    (line,) = out.splitlines()
    assert "--nodes 2 --gpus-per-node 8 --per-gpu --array 0-2" in line and "--partition h100" in line
    assert line.endswith(f"sweep work {tmp_path / 'w2'} --resources 2x8") and not (tmp_path / "w2").exists()


@pytest.mark.slurm
def test_submit_to_an_unknown_partition(tmp_path, corpus, slurm_cluster, capsys, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    rc, _, err = _cli(capsys, "sweep", "submit", _spec(tmp_path, corpus), "--executor", "slurm", "--workers", "2",
                      "--gpus-per-worker", "0", "--workdir", tmp_path / "w", "--partition", "gpu-nope")
    assert rc == 2 and "unknown --partition 'gpu-nope' (this cluster has: debug)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "w").exists()


def _evals(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval_loss"] for r in records if r["kind"] == "eval"}


def _wait_for(what, timeout: float = 300, every: float = 0.05):
    end = time.time() + timeout
    while time.time() < end:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def _mid_point(leases: LocalLeases, directory: Path, point) -> tuple[Lease, int] | None:
    """(its lease, the step it trains) once `point` is leased, has a checkpoint and is not near its end."""
    held = leases.read(point.name)
    ckpts = directory / point.name / "checkpoints"
    steps = [int(d.name) for d in ckpts.iterdir() if d.name.isdigit()] if ckpts.is_dir() else []
    if held is None or not steps:
        return None
    records = [json.loads(line) for line in (directory / point.name / "metrics.jsonl").read_text().splitlines()
               if line.endswith("}")]
    step = max((r["step"] for r in records if r["kind"] == "train"), default=0)
    return (held[0], step) if step < point.steps - 20 else None


@pytest.mark.slurm
@pytest.mark.slow
def test_a_sweep_on_slurm_survives_scancel_and_kill_9_and_equals_a_local_run(tmp_path, corpus, slurm_cluster, capsys,
                                                                            monkeypatch):
    """6 tiny points, 3 Slurm workers (short lease time): the worker training one long point is cancelled
    with scancel, the one training the other is killed with kill -9, both mid-point after a checkpoint.
    The cancelled point is released and resumed, the killed one taken over once its lease is stale and
    resumed from its checkpoint; every point is done exactly once, with the final losses of a local
    `sweep run` of the same spec, bit for bit. `sweep status` shows a running point's step, and
    `--wait` exits 0 at the end."""
    spec = _spec(tmp_path, corpus, tokens=(3, 4, 120))
    sweep = load_sweep(spec)
    local = run_llmjax("sweep", "run", spec, "--workdir", tmp_path / "local", timeout=900)
    assert local.returncode == 0, local.stderr[-3000:]

    directory = tmp_path / "slurm"
    r = run_llmjax("sweep", "submit", spec, "--executor", "slurm", "--workers", "3", "--gpus-per-worker", "0",
                   "--workdir", directory, "--lease-seconds", "6", "--retries", "1", env=slurm_cluster)
    assert r.returncode == 0, r.stderr
    assert len(json.loads((directory / "jobs.json").read_text())) == 1  # the array's job, for `status --wait`
    leases = LocalLeases(directory)
    long_small, long_big = (p for p in sweep.points if p.steps == 120)
    env = {**os.environ, **slurm_cluster}
    lease, step = _wait_for(lambda: _mid_point(leases, directory, long_small))
    subprocess.run(["scancel", lease.worker.removeprefix("slurm-")], env=env, check=True)  # the array task, 1_2
    lease, step = _wait_for(lambda: _mid_point(leases, directory, long_big))
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    rc, out, _ = _cli(capsys, "sweep", "status", directory, "--json")
    running = [p for p in json.loads(out)["points"] if p["state"] == "running"]
    assert rc == 1 and any(p["name"] == long_big.name and p["step"] >= step for p in running), out
    os.kill(lease.pid, signal.SIGKILL)  # the worker (its trainer dies with it: PR_SET_PDEATHSIG)

    rc, out, err = _cli(capsys, "sweep", "status", directory, "--wait", "--every", "1")
    assert rc == 0 and "6 points: 6 done" in out, out + err
    _wait_for(lambda: not subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True).stdout, 60, 0.5)
    events = _journal(directory)
    done = [e["point"] for e in events if e["event"] == "done"]
    assert sorted(done) == sorted(p.name for p in sweep.points)  # each exactly once
    # The cancelled worker releases its point once its trainer has saved a checkpoint and stopped; if that
    # takes longer than Slurm's KillWait (a loaded machine), the point is taken over when its lease is stale.
    assert any(e["event"] in ("stopped", "takeover") and e["point"] == long_small.name for e in events)
    assert any(e["event"] == "takeover" and e["point"] == long_big.name for e in events)
    logs = "".join(f.read_text() for f in (directory / "logs").iterdir())
    assert f"[{long_small.name}] {long_small.name}: resuming" in logs
    assert f"[{long_big.name}] {long_big.name}: resuming" in logs
    for p in sweep.points:
        assert _evals(directory / p.name) == _evals(tmp_path / "local" / p.name), p.name
