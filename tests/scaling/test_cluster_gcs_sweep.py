"""A whole sweep directory on gs:// against the GCS emulator (fake-gcs-server, the fixture of
test_cluster_gcs.py): queue, leases, attempt counts, DONE/FAILED markers, status and collect through
llmjax.storage (etils.epath over gcsfs) and GCSLeases (google-cloud-storage), and a real point trained by
`llmjax sweep work gs://...` (the trainer writes its run directory, checkpoints included, to the emulator:
gcsfs and google-cloud-storage follow STORAGE_EMULATOR_HOST, tensorstore TENSORSTORE_GCS_HTTP_URL), equal bit
for bit to `llmjax sweep run` of the same spec on the local file system."""

from __future__ import annotations

import csv
import json
import os
import threading
import uuid

import pytest
import yaml
from helpers import run_llmjax, tiny_train_overrides
from test_cluster_gcs import gcs  # noqa: F401  (the emulator fixture)

from llmjax.scaling import ScalingError
from llmjax.scaling.cluster.lease import GCSLeases
from llmjax.scaling.cluster.queue import check_directory, read_queue, write_queue
from llmjax.scaling.cluster.status import format_status, sweep_status
from llmjax.scaling.cluster.worker import Trainer, _finish, claim
from llmjax.scaling.sweep.collect import collect
from llmjax.scaling.sweep.spec import load_sweep
from llmjax.storage import as_path

pytest.importorskip("gcsfs", reason="gs:// run directories need gcsfs (the gcs extra)")
pytestmark = pytest.mark.slow


@pytest.fixture
def emulated(gcs, monkeypatch):  # noqa: F811
    """STORAGE_EMULATOR_HOST (and tensorstore's endpoint) for this test, in-process and for subprocesses;
    gcsfs's cached file systems are dropped afterwards, so no later test reaches the emulator by accident."""
    import gcsfs

    env = {"STORAGE_EMULATOR_HOST": gcs.url, "TENSORSTORE_GCS_HTTP_URL": gcs.url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "test"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    gcsfs.GCSFileSystem.clear_instance_cache()
    yield env
    gcsfs.GCSFileSystem.clear_instance_cache()


def _spec(tmp_path, corpus, name="g", tokens=(3,)):
    overrides = tiny_train_overrides(corpus) + ["sample.max_new_tokens=0", "eval.batches=1"]
    spec = {"name": name, "overrides": overrides, "warmup_fraction": 0.1,
            "shapes": [{"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}],
            "grid": {"tokens": [t * 8 * 32 for t in tokens]}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_queue_markers_attempts_and_status_round_trip_on_gcs(tmp_path, corpus, emulated):
    """submit's queue, a claim, a failed try (counted once), a retry, FAILED after the retries, DONE and the
    status table, all on gs://: what the workers and `sweep status` read back is what they wrote."""
    d = f"gs://sweeps/{uuid.uuid4().hex[:8]}/sweep"
    sweep = load_sweep(_spec(tmp_path, corpus, tokens=(3, 4)))
    check_directory(sweep, d)  # new
    write_queue(sweep, d, {"lease_seconds": 30.0, "retries": 1, "pack": 1})
    check_directory(sweep, d)  # a resubmission of the same sweep
    other = load_sweep(_spec(tmp_path, corpus, name="other"))
    with pytest.raises(ScalingError, match="holds another sweep"):
        check_directory(other, d)
    again, settings = read_queue(d)
    assert [p.name for p in again.points] == [p.name for p in sweep.points] and settings["retries"] == 1
    first, second = sweep.points
    leases = GCSLeases(d)
    directory = as_path(d)
    (got_first,) = claim(directory, sweep, leases, settings, "w1")
    (got_second,) = claim(directory, sweep, leases, settings, "w2")
    assert got_first[0].name == first.name and got_second[0].name == second.name
    assert claim(directory, sweep, leases, settings, "w3") == "wait"  # both held by live workers
    st = sweep_status(d)
    assert [(i["state"], i.get("worker")) for i in st["points"]] == [("running", "w1"), ("running", "w2")]
    trainer = Trainer(leases, 30.0)
    trainer.error = "llmjax: error: the loss diverged"
    _finish(directory, first, got_first[1], 1, trainer, leases, settings, "w1")  # failure 1 of at most 2
    info = sweep_status(d)["points"][0]
    assert info["state"] == "pending" and info["failures"] == 1 and "diverged" in info["error"]
    (retry,) = claim(directory, sweep, leases, settings, "w3")
    assert retry[0].name == first.name
    _finish(directory, first, retry[1], 1, trainer, leases, settings, "w3")  # failure 2: FAILED
    assert json.loads((directory / first.name / "FAILED").read_text())["failures"] == 2
    (directory / second.name / "metrics.jsonl").write_text(  # the trainer's last records (stand-ins)
        json.dumps({"kind": "eval", "step": second.steps, "eval_loss": 5.25}) + "\n")
    _finish(directory, second, got_second[1], 0, trainer, leases, settings, "w2")
    assert json.loads((directory / second.name / "DONE").read_text())["point"] == second.name
    st = sweep_status(d)
    assert st["totals"] == {"pending": 0, "running": 0, "stale": 0, "done": 1, "failed": 1}
    table = format_status(st)
    assert "final loss 5.2500" in table and "the loss diverged" in table
    assert claim(directory, sweep, leases, settings, "w4") is None  # nothing left
    journal = [json.loads(p.read_text())["event"] for p in sorted((directory / ".leases" / "journal").iterdir())]
    assert journal == ["claim", "claim", "retry", "claim", "failed", "done"]


def test_a_long_lived_process_sees_markers_another_machine_wrote_since(emulated, gcs):  # noqa: F811
    """gcsfs would answer from a directory listing it made earlier (no expiry by default): a worker or `sweep
    status --wait` would never see a DONE written since by another worker. llmjax.storage turns that cache
    off for gs://."""
    from llmjax.storage import any_path, read_text

    d = any_path(f"gs://sweeps/{uuid.uuid4().hex[:8]}/p")
    (d / "metrics.jsonl").write_text("{}\n")
    assert [p.name for p in d.iterdir()] == ["metrics.jsonl"] and not (d / "DONE").is_file()
    other = gcs().bucket("sweeps").blob(f"{os.fspath(d).removeprefix('gs://sweeps/')}/DONE")
    other.upload_from_string('{"point": "p"}')  # another machine, its own client
    assert (d / "DONE").is_file() and json.loads(read_text(d / "DONE")) == {"point": "p"}
    assert sorted(p.name for p in d.iterdir()) == ["DONE", "metrics.jsonl"]


def test_concurrent_failure_counts_on_gcs_lose_no_increment(tmp_path, emulated):
    """add_failure is a compare-and-swap on the counter's generation: 12 writers at once, 12 counted."""
    d = f"gs://sweeps/{uuid.uuid4().hex[:8]}"
    stores = [GCSLeases(d) for _ in range(12)]
    barrier = threading.Barrier(12)
    counts: list[int] = []

    def fail(store):
        barrier.wait()
        counts.append(store.add_failure("p", "llmjax: boom"))

    threads = [threading.Thread(target=fail, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(counts) == list(range(1, 13)) and stores[0].failures("p") == (12, "llmjax: boom")


def test_sweep_work_trains_a_point_on_gcs_equal_to_a_local_run(tmp_path, corpus, emulated):
    """`llmjax sweep work gs://...` trains the point (the trainer writing its run directory to the emulator) to
    DONE; `sweep status` says done, `sweep collect gs://... --out CSV` writes the row, and the final loss (and
    the training curve approach 1 reads through the row's workdir URL) equals `llmjax sweep run`'s training of
    the same point on the local file system bit for bit."""
    spec = _spec(tmp_path, corpus)
    d = f"gs://sweeps/{uuid.uuid4().hex[:8]}/sweep"
    write_queue(load_sweep(spec), d, {"lease_seconds": 30.0, "retries": 0, "pack": 1})
    r = run_llmjax("sweep", "work", d, env=emulated, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (point,) = load_sweep(spec).points
    run_dir = as_path(d) / point.name
    assert (run_dir / "DONE").is_file() and any((run_dir / "checkpoints").iterdir())
    assert sweep_status(d)["totals"]["done"] == 1
    out = tmp_path / "gcs.csv"
    collect(d, out)  # in this process (the emulator's environment is set): a subprocess less
    local = tmp_path / "local"
    sweep = load_sweep(spec)  # the `llmjax train` command `sweep run` would run (one interpreter less)
    r = run_llmjax("train", *(["--config", sweep.base] if sweep.base else []), "--workdir", local / point.name,
                   *point.overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    collect(local, tmp_path / "local.csv")
    (row,) = csv.DictReader(out.open())
    (ref,) = csv.DictReader((tmp_path / "local.csv").open())
    assert row["status"] == "done" and row["workdir"] == f"{d}/{point.name}"
    assert row["final_loss"] == ref["final_loss"] and row["tokens"] == ref["tokens"]
    # `llmjax fit`'s approach 1 reads the training curves from the CSV's workdir column: a URL as it is
    from llmjax.scaling.laws.envelope import _run_dir, _train_losses

    curve = _train_losses(_run_dir(tmp_path, row["workdir"]))
    assert curve and curve == _train_losses(_run_dir(tmp_path, ref["workdir"]))


def test_submit_executor_tpu_with_a_gcs_workdir(tmp_path, corpus, emulated, capsys):
    """`sweep submit --executor tpu --workdir gs://...`: the tpu_pod.sh command it would run (--dry-run) starts
    `sweep work gs://...` on every host of each v5p-16 slice (2 hosts) with the host count exported."""
    import shlex
    import subprocess

    from helpers import ROOT

    from llmjax.cli import main

    d = f"gs://sweeps/{uuid.uuid4().hex[:8]}/sweep"
    capsys.readouterr()
    assert main(["sweep", "submit", str(_spec(tmp_path, corpus)), "--executor", "tpu", "--workers", "2",
                 "--tpu-type", "v5p-16", "--workdir", d, "--dry-run"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    cmd = shlex.split(line)
    assert cmd[0] == str(ROOT / "launch" / "tpu_pod.sh") and cmd[-4:] == ["llmjax", "sweep", "work", d]
    r = subprocess.run([cmd[0], "--dry-run", *cmd[1:]], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    starts = [x for x in r.stdout.splitlines() if " start " in x and "tpu-vm ssh" in x]
    assert len(starts) == 2 and all("LLMJAX_WORKER_PROCESSES=2" in x and f"sweep work {d}" in x for x in starts)
