"""The cluster launchers: dry runs of launch/tpu_pod.sh and the Slurm scripts parsed command by
command, the detached job of launch/job.sh run for real, the workers' install and start commands
run here with stand-ins for uv and llmjax, and the Slurm requeue logic with stand-ins for srun
and scontrol."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCAL = str(ROOT / "launch" / "local.sh")
TPU = str(ROOT / "launch" / "tpu_pod.sh")
JOB = str(ROOT / "launch" / "job.sh")
SBATCH = str(ROOT / "launch" / "slurm_gpu.sbatch")
SUBMIT = str(ROOT / "launch" / "slurm_submit.sh")
SLURM_LOCAL = str(ROOT / "launch" / "slurm_local.sh")

TRAIN = ["llmjax", "train", "--workdir", "/mnt/runs/my run", "sample.prompt=def f(x):\n  return 'y'",
         "mesh.fsdp=8"]
GS_TRAIN = ["llmjax", "train", "--workdir", "gs://my-bucket/runs/v5p", "mesh.data=-1", "mesh.fsdp=8"]


def _clean_env(extra: dict | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "LLMJAX_JOB"))}
    env.pop("XLA_FLAGS", None)
    return {**env, **(extra or {})}


def _dry(cmd, env=None) -> list[list[str]]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=_clean_env(env))
    assert r.returncode == 0, r.stderr
    return _commands(r.stdout)


def _commands(text: str) -> list[list[str]]:
    """One command per line, except where a quoted argument spans lines (a newline in it)."""
    cmds, pending = [], ""
    for line in text.splitlines(keepends=True):
        pending += line
        try:
            cmds.append(shlex.split(pending))
        except ValueError:  # "No closing quotation": the argument goes on
            continue
        pending = ""
    assert not pending, f"unterminated quoting in {pending!r}"
    return cmds


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)


def _gcloud(cmds: list[list[str]]) -> list[list[str]]:
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    assert all(c[1:3] == ["compute", "tpus"] for c in gcloud)
    return gcloud


def _verbs(gcloud: list[list[str]]) -> list[str]:
    return [" ".join(c[3:5]) for c in gcloud]


def _remote(cmd: list[str]) -> str:
    return _flags(cmd)["command"]


def _job_args(remote: str) -> list[str]:
    """The words after `launch/job.sh` in a worker command."""
    words = shlex.split(remote)
    i = next(i for i, w in enumerate(words) if w.endswith("launch/job.sh"))
    return words[i + 1:]


# ----------------------------------------------------------------------------- tpu_pod.sh dry runs


def test_tpu_pod_run_creates_installs_starts_detached_follows_and_deletes():
    cmds = _dry([TPU, "--dry-run", "--name", "llmjax-v5p", "--zone", "us-east5-a", "--project", "proj",
                 "--type", "v5p-64", "--spot", "--delete-after", "--env", "WANDB_MODE=offline", "run", "--", *TRAIN])
    gcloud = _gcloud(cmds)
    assert _verbs(gcloud) == ["tpu-vm describe", "tpu-vm create", "tpu-vm describe", "tpu-vm scp", "tpu-vm ssh",
                              "tpu-vm ssh", "tpu-vm ssh", "tpu-vm delete"]
    create = gcloud[1]
    assert create[5] == "llmjax-v5p" and "--spot" in create
    assert _flags(create) == {"zone": "us-east5-a", "project": "proj", "accelerator-type": "v5p-64",
                              "version": "v2-alpha-tpuv5"}
    tar = next(c for c in cmds if c[0] == "tar")
    assert gcloud[3][5] == tar[2] and gcloud[3][6] == "llmjax-v5p:llmjax-src.tar.gz"

    install, start, logs = gcloud[4:7]
    assert _flags(install)["worker"] == "all" and _flags(start)["worker"] == "all"
    script = _remote(install)
    # uv brings its own Python: the environment is 3.12 whatever the image's python3 is.
    assert "uv venv --python 3.12" in script and "astral.sh/uv/install.sh" in script
    assert "uv pip install --python \"$HOME\"/llmjax-venv/bin/python -U -e \"$HOME\"/llmjax'[tpu]'" in script
    assert "python3 -m pip" not in script and "gcsfs" not in script

    words = _job_args(_remote(start))
    assert words[:3] == ["start", "--env", "WANDB_MODE=offline"]
    assert words[3] == "--" and words[4:] == TRAIN  # forwarded intact, newline and quotes included
    assert 'PATH="$HOME"/llmjax-venv/bin:"$PATH"' in _remote(start)

    assert _flags(logs)["worker"] == "0" and _job_args(_remote(logs))[:2] == ["logs", "--follow"]
    assert gcloud[7][5] == "llmjax-v5p" and "--quiet" in gcloud[7]


def test_tpu_pod_gs_workdir_detach_and_custom_environment():
    cmds = _dry([TPU, "--dry-run", "--type", "v5p-64", "--python", "3.11", "--venv", "/opt/venv", "--extras",
                 "tpu,wandb", "--pip", "orbax-checkpoint==0.11.5", "--job-dir", "/tmp/job", "--detach",
                 "run", "--", *GS_TRAIN])
    gcloud = _gcloud(cmds)
    assert _verbs(gcloud)[-1] == "tpu-vm ssh"  # --detach: started, not followed
    install, start = gcloud[-2:]
    script = _remote(install)
    assert "uv venv --python 3.11 /opt/venv" in script
    assert "-e \"$HOME\"/llmjax'[tpu,wandb]' orbax-checkpoint==0.11.5 gcsfs" in script  # gs:// -> gcsfs
    words = _job_args(_remote(start))
    assert words[:3] == ["--dir", "/tmp/job", "start"] and words[4:] == GS_TRAIN  # the gs:// path untouched


def test_tpu_pod_logs_status_stop_delete():
    base = [TPU, "--dry-run", "--name", "pod"]
    (logs,) = _dry([*base, "--worker", "3", "logs"])
    assert _flags(logs)["worker"] == "3" and _job_args(_remote(logs))[:2] == ["logs", "--follow"]
    (status,) = _dry([*base, "status"])
    assert _flags(status)["worker"] == "all" and _job_args(_remote(status)) == ["status"]
    (stop,) = _dry([*base, "--grace", "120", "stop"])
    assert _flags(stop)["worker"] == "all" and _job_args(_remote(stop)) == ["stop", "--grace", "120"]
    assert [c[3:6] for c in _dry([*base, "delete"])] == [["tpu-vm", "delete", "pod"]]
    assert [c[3:5] for c in _dry([*base, "--queued", "delete"])] == [["queued-resources", "delete"]]


def test_tpu_pod_queued_single_slice():
    cmds = _gcloud(_dry([TPU, "--dry-run", "--queued", "--type", "v5p-128", "run", "--", "llmjax", "train"]))
    assert _verbs(cmds)[:3] == ["queued-resources describe", "queued-resources create", "queued-resources describe"]
    create = cmds[1]
    assert _flags(create)["node-id"] == create[5] == "llmjax" and _flags(create)["runtime-version"]


def test_tpu_pod_multislice():
    cmds = _gcloud(_dry([TPU, "--dry-run", "--name", "ms", "--type", "v5p-64", "--num-slices", "2",
                         "--delete-after", "run", "--", *TRAIN]))
    assert _verbs(cmds) == ["queued-resources describe", "queued-resources create", "queued-resources describe",
                            "tpu-vm scp", "tpu-vm ssh", "tpu-vm scp", "tpu-vm ssh",  # install, slice by slice
                            "tpu-vm ssh", "tpu-vm ssh",  # start on both slices
                            "tpu-vm ssh", "queued-resources delete"]  # follow slice 0, delete
    create = cmds[1]
    assert _flags(create)["node-count"] == "2" and _flags(create)["node-prefix"] == "ms"
    assert "node-id" not in _flags(create)
    assert [c[6].split(":")[0] for c in (cmds[3], cmds[5])] == ["ms-0", "ms-1"]
    assert [c[5] for c in (cmds[4], cmds[6], cmds[7], cmds[8], cmds[9])] == ["ms-0", "ms-1", "ms-0", "ms-1", "ms-0"]
    for start in cmds[7:9]:
        assert _job_args(_remote(start))[2:] == TRAIN and _flags(start)["worker"] == "all"
    stops = _gcloud(_dry([TPU, "--dry-run", "--name", "ms", "--num-slices", "2", "stop"]))
    assert [c[5] for c in stops] == ["ms-0", "ms-1"]
    (logs,) = _gcloud(_dry([TPU, "--dry-run", "--name", "ms", "--num-slices", "2", "--slice", "1", "logs"]))
    assert logs[5] == "ms-1"


def test_tpu_pod_workers_one_queued_slice_each():
    """--workers N: N queued-resource slices NAME-w0.., each installed and running the command on its own,
    detached, with LLMJAX_WORKER naming the slice (the workers of `llmjax sweep submit --executor tpu`)."""
    cmds = _gcloud(_dry([TPU, "--dry-run", "--name", "sw", "--workers", "2", "--type", "v5p-16", "--spot", "run", "--",
                         "llmjax", "sweep", "work", "/mnt/fs/sweep"]))
    creates = [c for c in cmds if c[3:5] == ["queued-resources", "create"]]
    assert [c[5] for c in creates] == ["sw-w0", "sw-w1"]
    assert all(_flags(c)["node-id"] == c[5] and _flags(c)["accelerator-type"] == "v5p-16" and "--spot" in c
               for c in creates)
    starts = [c for c in cmds if " start " in _flags(c).get("command", "")]
    assert [c[5] for c in starts] == ["sw-w0", "sw-w1"] and all("--worker=all" in c for c in starts)
    for i, c in enumerate(starts):
        args = _job_args(_remote(c))
        # the slice's host count (v5p-16: 8 chips, 2 hosts), for process 0 of the worker to wait for the other
        assert args[:6] == ["start", "--env", f"LLMJAX_WORKER=sw-w{i}", "--env", "LLMJAX_WORKER_PROCESSES=2", "--"]
        assert args[6:] == ["llmjax", "sweep", "work", "/mnt/fs/sweep"]
    assert not any(c[3:5] == ["tpu-vm", "ssh"] and "logs --follow" in _remote(c) for c in cmds)  # detached
    assert [c[5] for c in _gcloud(_dry([TPU, "--dry-run", "--name", "sw", "--workers", "2", "delete"]))] == \
        ["sw-w0", "sw-w1"]
    r = subprocess.run([TPU, "--dry-run", "--workers", "2", "--num-slices", "2", "run", "--", "llmjax"],
                       capture_output=True, text=True, env=_clean_env())
    assert r.returncode == 2 and "do not mix" in r.stderr


@pytest.mark.parametrize("tpu_type,hosts", [("v5p-8", 1), ("v5p-64", 8), ("v4-32", 4), ("v5litepod-8", 1),
                                            ("v5litepod-16", 4), ("v6e-256", 64), ("v6e-4", 1)])
def test_tpu_pod_workers_export_the_hosts_of_one_slice(tpu_type, hosts):
    """--workers: every host of a slice learns the slice's host count from --type (a TPU VM's environment does
    not say it; the sweep worker's process 0 waits for that many acknowledgements); an unknown type is an error."""
    cmds = _gcloud(_dry([TPU, "--dry-run", "--name", "sw", "--workers", "1", "--type", tpu_type, "run", "--",
                         "llmjax", "sweep", "work", "gs://b/sweep"]))
    (start,) = [c for c in cmds if " start " in _flags(c).get("command", "")]
    assert f"LLMJAX_WORKER_PROCESSES={hosts}" in _job_args(_remote(start))
    r = subprocess.run([TPU, "--dry-run", "--workers", "1", "--type", "v9z-8", "run", "--", "llmjax"],
                       capture_output=True, text=True, env=_clean_env())
    assert r.returncode == 2 and "cannot tell the host count of --type 'v9z-8'" in r.stderr, r.stderr


def test_tpu_pod_usage_and_errors():
    r = subprocess.run([TPU, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "Usage: launch/tpu_pod.sh" in r.stdout
    bad = ([], ["run"], ["run", "llmjax"], ["frob"], ["--name", "Bad_Name", "up"], ["--python", "3.10", "up"],
           ["--python", "three", "up"], ["--num-slices", "0", "up"], ["--worker", "x", "logs"],
           ["--slice", "1", "logs"], ["--env", "NOEQUALS", "up"], ["--grace", "-1", "stop"], ["logs", "extra"])
    for args in bad:
        r = subprocess.run([TPU, "--dry-run", *args], capture_output=True, text=True, env=_clean_env())
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)


# ----------------------------------------------------------------------------- the worker side, run here


def _fake_bin(directory: Path, name: str, body: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def _run_remote(script: str, home: Path, path_dirs: list[Path]) -> subprocess.CompletedProcess:
    env = _clean_env({"HOME": str(home), "PATH": ":".join([*map(str, path_dirs), os.environ["PATH"]])})
    return subprocess.run(["bash", "-c", script], cwd=home, capture_output=True, text=True, timeout=120, env=env)


def test_worker_install_and_start_commands_run(tmp_path):
    """tpu_pod.sh's install and start commands, run in a fake home: uv is asked for a Python 3.12
    environment, llmjax is installed into it with the tpu extra, and the detached job runs the
    command with exactly the arguments given to tpu_pod.sh."""
    cmds = _dry([TPU, "--dry-run", "--src", str(ROOT), "run", "--", *TRAIN])
    tar = next(c for c in cmds if c[0] == "tar")
    gcloud = _gcloud(cmds)
    install, start, logs = (_remote(c) for c in gcloud[-3:])
    home = tmp_path / "home"
    home.mkdir()
    tar[2] = str(home / "llmjax-src.tar.gz")
    subprocess.run(tar, check=True, timeout=120)
    record = tmp_path / "uv.log"
    # uv stand-in: `uv venv` makes an environment whose python is this interpreter; `uv pip` records.
    _fake_bin(tmp_path / "bin", "uv", f"""echo "$@" >> {record}
if [ "$1" = venv ]; then mkdir -p "${{@: -1}}/bin"; ln -sf {sys.executable} "${{@: -1}}/bin/python"; fi
""")
    r = _run_remote(install, home, [tmp_path / "bin"])
    assert r.returncode == 0, r.stderr
    calls = record.read_text().splitlines()
    assert calls[0] == f"venv --python 3.12 {home}/llmjax-venv"
    assert calls[1] == f"pip install --python {home}/llmjax-venv/bin/python -U -e {home}/llmjax[tpu]"
    assert (home / "llmjax" / "launch" / "job.sh").is_file() and not (home / "llmjax" / ".git").exists()
    r = _run_remote(install, home, [tmp_path / "bin"])  # a second install reuses the environment
    assert r.returncode == 0 and [c.split()[0] for c in record.read_text().splitlines()] == ["venv", "pip", "pip"]

    argv_file = tmp_path / "argv"
    # The environment's `llmjax` stand-in: write its arguments, one per line (NUL-separated).
    _fake_bin(home / "llmjax-venv" / "bin", "llmjax", f"""printf '%s\\0' "$@" > {argv_file}.tmp
mv {argv_file}.tmp {argv_file}
echo "training in $(pwd)"
""")
    r = _run_remote(start, home, [])
    assert r.returncode == 0, r.stderr
    assert "job.sh: started pid" in r.stdout
    r = _run_remote(logs, home, [])  # follows until the job ends; exits with its status
    assert r.returncode == 0, r.stderr
    assert f"training in {home}/llmjax" in r.stdout
    assert argv_file.read_text().split("\0")[:-1] == TRAIN[1:]


def _wait_for(predicate, timeout=30.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_job_survives_its_session_and_stops_with_a_checkpoint(tmp_path):
    """A job started from a shell whose whole session is then hung up and killed (a dropped ssh
    connection) keeps running; `stop` delivers SIGTERM, the program's handler runs, and the exit
    status 143 is recorded for `status`, `logs --follow` and `wait`."""
    job_dir = tmp_path / "job"
    program = tmp_path / "train.py"
    program.write_text("""import signal, sys, time
def on_term(signum, frame):
    print("SIGTERM: checkpoint saved", flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
for step in range(100000):
    print("step", step, flush=True)
    time.sleep(0.05)
""")
    job = [JOB, "--dir", str(job_dir)]
    # The "ssh session": its own session and process group, which start returns inside of.
    session = subprocess.Popen(["bash", "-c", f"{shlex.join([*job, 'start', '--', sys.executable, str(program)])}; "
                                "sleep 600"], start_new_session=True, stdout=subprocess.PIPE, text=True)
    _wait_for(lambda: (job_dir / "pid").exists() and "step 3" in (job_dir / "log").read_text())
    pid = int((job_dir / "pid").read_text())
    os.killpg(session.pid, signal.SIGHUP)
    os.killpg(session.pid, signal.SIGKILL)
    session.wait(timeout=10)
    time.sleep(0.5)
    log_len = len((job_dir / "log").read_text())
    time.sleep(0.5)
    assert len((job_dir / "log").read_text()) > log_len, "the job stopped with its session"
    os.kill(pid, 0)

    status = subprocess.run([*job, "status"], capture_output=True, text=True, timeout=30)
    assert status.returncode == 0 and status.stdout.startswith(f"running: pid {pid}")
    again = subprocess.run([*job, "start", "--", "true"], capture_output=True, text=True, timeout=30)
    assert again.returncode == 3 and "already running" in again.stderr
    follower = subprocess.Popen([*job, "logs", "--follow", "--lines", "1"], stdout=subprocess.PIPE, text=True)
    assert follower.stdout is not None
    first = follower.stdout.readline()  # following now: started after the stop, it would begin at the exit line

    stop = subprocess.run([*job, "stop", "--grace", "30"], capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0 and "exit status 143" in stop.stdout, stop.stderr
    out, _ = follower.communicate(timeout=30)
    out = first + out
    assert follower.returncode == 143 and "SIGTERM: checkpoint saved" in out
    assert (job_dir / "exit_status").read_text().strip() == "143"
    assert subprocess.run([*job, "wait"], timeout=30).returncode == 143
    status = subprocess.run([*job, "status"], capture_output=True, text=True, timeout=30)
    assert status.stdout.startswith("ended: exit status 143")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_job_exit_status_kill_escalation_and_errors(tmp_path):
    job = [JOB, "--dir", str(tmp_path / "j")]
    r = subprocess.run([*job, "status"], capture_output=True, text=True)
    assert r.returncode == 4 and "no job" in r.stderr
    assert subprocess.run([*job, "start", "--", "sh", "-c", "echo hi; exit 7"], capture_output=True).returncode == 0
    assert subprocess.run([*job, "wait"], timeout=30).returncode == 7
    r = subprocess.run([*job, "logs"], capture_output=True, text=True)
    assert "hi" in r.stdout and "exited with status 7" in r.stdout
    # A program that ignores SIGTERM is killed after the grace period.
    assert subprocess.run([*job, "start", "--", "sh", "-c", "trap '' TERM; sleep 60"]).returncode == 0
    _wait_for(lambda: (tmp_path / "j" / "pid").exists())
    r = subprocess.run([*job, "stop", "--grace", "1"], capture_output=True, text=True, timeout=30)
    assert "SIGKILL" in r.stderr and "exit status 137" in r.stdout
    for args in (["frob"], ["start", "true"], ["start", "--env", "x", "--", "true"], ["logs", "--lines", "x"],
                 ["stop", "--grace", "soon"]):
        assert subprocess.run([*job, *args], capture_output=True).returncode == 2, args


# ----------------------------------------------------------------------------- Slurm


SLURM_JOB = {"SLURM_JOB_NODELIST": "gpu[003-010]", "SLURM_JOB_ID": "41", "SLURM_JOB_NUM_NODES": "8",
             "SLURM_GPUS_ON_NODE": "8", "PATH": "/usr/bin:/bin"}


def _env_words(srun: list[str]) -> dict[str, str]:
    i = srun.index("srun")
    assert srun[0] == "env"
    return dict(w.split("=", 1) for w in srun[1:i])


@pytest.mark.slurm
def test_slurm_srun_line():
    (srun,) = _dry([SBATCH, "--dry-run", "--", *TRAIN], SLURM_JOB)
    i = srun.index("srun")
    env = _env_words(srun)
    assert env["LLMJAX_COORDINATOR"] == "gpu003:12041"
    flags = env["XLA_FLAGS"].split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags and all(f.startswith("--xla_gpu_") for f in flags)
    assert _flags(srun[i:i + 5]) == {"nodes": "8", "kill-on-bad-exit": "1", "gpus-per-node": "8",
                                     "ntasks-per-node": "8"}
    assert srun[i + 5:] == TRAIN
    (srun,) = _dry([SBATCH, "--dry-run", "--per-node", "--", "llmjax", "train"])
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in srun and "--ntasks-per-node=1" in srun


@pytest.mark.slurm
def test_slurm_environment_hook_container_and_xla_flags():
    (srun,) = _dry([SBATCH, "--dry-run", "--venv", "/shared/venvs/llmjax", "--env-setup", "module load cuda/12.4",
                    "--container-image", "nvcr.io/nvidia/jax:25.04", "--container-mounts", "/shared:/shared",
                    "--srun-arg=--mpi=none", "--xla-flags", "--xla_gpu_enable_triton_gemm=false", "--", *TRAIN],
                   {**SLURM_JOB, "XLA_FLAGS": "--xla_dump_to=/tmp/dump"})
    i = srun.index("srun")
    # The caller's flags come after the script's, so they win.
    assert _env_words(srun)["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=false --xla_dump_to=/tmp/dump"
    assert {"container-image": "nvcr.io/nvidia/jax:25.04", "container-mounts": "/shared:/shared",
            "mpi": "none"}.items() <= _flags(srun[i:]).items()
    j = srun.index("bash")
    assert srun[j + 1] == "-c" and srun[j + 3] == "llmjax-task" and srun[j + 4:] == TRAIN
    assert "source /shared/venvs/llmjax/bin/activate && module load cuda/12.4" in srun[j + 2]
    (srun,) = _dry([SBATCH, "--dry-run", "--xla-flags", "", "--", "llmjax", "train"], SLURM_JOB)
    assert "XLA_FLAGS" not in _env_words(srun)
    (srun,) = _dry([SBATCH, "--dry-run", "--", "llmjax", "train"],
                   {**SLURM_JOB, "LLMJAX_ENV_SETUP": "conda activate x"})
    assert srun[srun.index("bash") + 2] == 'set -e; conda activate x; exec "$@"'


@pytest.mark.slurm
def test_slurm_submit():
    sbatch, srun = _dry([SUBMIT, "--dry-run", "--nodes", "8", "--gpus-per-node", "8", "--partition", "h100",
                         "--venv", "/shared/venv", "--max-restarts", "5", "--", *TRAIN])
    assert sbatch[0] == "sbatch" and sbatch[sbatch.index("--") + 1:] == TRAIN
    assert _flags(sbatch) == {"job-name": "llmjax", "nodes": "8", "gpus-per-node": "8", "ntasks-per-node": "8",
                              "cpus-per-task": "8", "time": "24:00:00", "partition": "h100",
                              "output": "llmjax-%j.out", "open-mode": "append", "signal": "B:USR1@180"}
    assert "--requeue" in sbatch
    script = sbatch.index("--") - 6
    assert sbatch[script].endswith("launch/slurm_gpu.sbatch")
    assert sbatch[script + 1:script + 6] == ["--per-gpu", "--venv", "/shared/venv", "--max-restarts", "5"]
    assert srun[srun.index("srun") + 1:][-len(TRAIN):] == TRAIN and "--cpus-per-task=8" in srun
    assert "source /shared/venv/bin/activate" in srun[srun.index("bash") + 2]
    sbatch, _ = _dry([SUBMIT, "--dry-run", "--no-requeue", "--grace", "600", "--", "llmjax", "train"])
    assert "--no-requeue" in sbatch and "--requeue" not in sbatch and _flags(sbatch)["signal"] == "B:USR1@600"
    for args in (["--grace", "0"], ["--nodes", "x"], ["--frob"]):
        assert subprocess.run([SUBMIT, "--dry-run", *args, "--", "true"], capture_output=True).returncode == 2
    # A CPU job array: no GPUs (the script's own #SBATCH --gpus-per-node=8 overridden), tasks per node as given.
    sbatch, srun = _dry([SUBMIT, "--dry-run", "--gpus-per-node", "0", "--tasks-per-node", "2", "--array", "0-3",
                         "--", "llmjax", "sweep", "work", "/shared/s"])
    assert {"gpus-per-node": "0", "ntasks-per-node": "2", "cpus-per-task": "1", "array": "0-3"}.items() <= \
        _flags(sbatch).items()
    assert "--gpus-per-node=8" not in srun and "--ntasks-per-node=2" in srun and "XLA_FLAGS" not in _env_words(srun)
    for args in (["--array", "x"], ["--tasks-per-node", "0"]):
        assert subprocess.run([SUBMIT, "--dry-run", *args, "--", "true"], capture_output=True).returncode == 2
    r = subprocess.run([SLURM_LOCAL, "frob", str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown verb 'frob'" in r.stderr


@pytest.fixture
def fake_slurm(tmp_path):
    """srun and scontrol stand-ins: srun logs its options and runs the command after them (so the
    environment hook really runs); scontrol logs its arguments."""
    bin_dir = tmp_path / "bin"
    log = tmp_path / "calls"
    _fake_bin(bin_dir, "srun", f"""echo "srun $*" >> {log}
while [[ "$1" == --* ]]; do shift; done
"$@" &
child=$!
trap 'kill -TERM $child' TERM
wait $child; status=$?
if [[ $status -gt 128 ]]; then wait $child; status=$?; fi
exit $status
""")
    _fake_bin(bin_dir, "scontrol", f'echo "scontrol $*" >> {log}\n')
    env = {**SLURM_JOB, "SLURM_JOB_NODELIST": "", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return env, log


@pytest.mark.slurm
def test_slurm_time_limit_checkpoints_and_requeues(tmp_path, fake_slurm):
    env, log = fake_slurm
    program = tmp_path / "train.py"
    ready = tmp_path / "ready"
    program.write_text(f"""import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda s, f: (print("saved checkpoint", os.environ["MARK"], flush=True), sys.exit(143)))
open({str(ready)!r}, "w").close()
time.sleep(60)
""")
    cmd = [SBATCH, "--env-setup", "export MARK=from-hook", "--", sys.executable, str(program)]
    p = subprocess.Popen(cmd, env=_clean_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(ready.exists)
    p.send_signal(signal.SIGUSR1)  # Slurm's --signal=B:USR1@180
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "saved checkpoint from-hook" in out and "requeueing job 41" in err
    calls = log.read_text().splitlines()
    assert calls[0].startswith("srun --nodes=8") and calls[-1] == "scontrol requeue 41"

    log.unlink()
    ready.unlink()
    p = subprocess.Popen(cmd, env=_clean_env({**env, "SLURM_RESTART_COUNT": "20"}), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    _wait_for(ready.exists)
    p.send_signal(signal.SIGUSR1)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143 and "--max-restarts 20 reached" in err
    assert not any(c.startswith("scontrol requeue") for c in log.read_text().splitlines())


@pytest.mark.slurm
def test_slurm_success_and_failure_statuses(fake_slurm):
    env, log = fake_slurm
    for code in (0, 3):
        r = subprocess.run([SBATCH, "--", "sh", "-c", f"exit {code}"], env=_clean_env(env), capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == code, r.stderr
    assert "scontrol" not in log.read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_launch_scripts_are_shellcheck_clean():
    scripts = [LOCAL, TPU, JOB, SBATCH, SUBMIT, SLURM_LOCAL]
    r = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True)  # -x: follow shquote.sh
    assert r.returncode == 0, r.stdout


# ----------------------------------------------------------------------------- a real (local) Slurm cluster

GLOO_PROGRAM = """import os, signal, sys, time
restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
from llmjax.config import load_config
from llmjax.parallel.distributed import initialize
plan = initialize(load_config(None, []))
import jax
import numpy as np
from jax.experimental import multihost_utils
got = multihost_utils.process_allgather(np.array([jax.process_index() + 10 * restart]))
print(f"restart {restart}: process {jax.process_index()} of {jax.process_count()} ({plan.mode}) gathered "
      f"{got.ravel().tolist()}", flush=True)
if restart == 0:  # wait for the end of the time limit (USR1), then checkpoint and stop
    signal.signal(signal.SIGTERM, lambda s, f: (print(f"process {jax.process_index()}: saved checkpoint", flush=True),
                                                sys.exit(143)))
    open(os.path.join(sys.argv[1], f"ready{jax.process_index()}"), "w").close()
    time.sleep(300)
"""


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_submit_runs_a_two_task_gloo_job_and_requeues_it(tmp_path, slurm_cluster):
    """launch/slurm_submit.sh on the local cluster: 2 tasks of one CPU job form one jax.distributed run (gloo)
    through the coordinator the sbatch script sets; USR1 (what --signal=B:USR1@grace sends before the time
    limit) makes every task save a checkpoint and stop, and the script requeue the job, which runs again
    (SLURM_RESTART_COUNT=1) into the same, appended output file."""
    env = {**os.environ, **slurm_cluster, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    (tmp_path / "prog.py").write_text(GLOO_PROGRAM)
    out = tmp_path / "job.out"
    with socket.socket() as s:  # a free coordinator port (the default one, from the job id, may be taken here)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([SUBMIT, "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "10",
                        "--port", str(port), "--output", str(out), "--", sys.executable, str(tmp_path / "prog.py"),
                        str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.split()[-1]  # "Submitted batch job N"
    _wait_for(lambda: (tmp_path / "ready0").exists() and (tmp_path / "ready1").exists(), timeout=300)
    _wait_for(lambda: out.read_text().count("restart 0: process") == 2, timeout=60)  # srun forwards the output
    text = out.read_text()
    assert "restart 0: process 0 of 2 (explicit) gathered [0, 1]" in text, text
    assert f":{port}" in text  # the coordinator on the port given to slurm_submit.sh
    assert "restart 0: process 1 of 2 (explicit) gathered [0, 1]" in text
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    _wait_for(lambda: "requeueing job" in out.read_text(), timeout=120)
    # Slurm holds a requeued job for two minutes before it may start again: once it waits, start it now.
    _wait_for(lambda: subprocess.run(["squeue", "-h", "-j", job, "-o", "%r"], env=env, capture_output=True,
                                     text=True).stdout.strip() == "BeginTime", timeout=120)
    # slurmd revokes the first run's credential at the requeue, to the second: a run started within that same
    # second is killed at once ("Job credential revoked"), so start it in a later second.
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env, check=True)
    _wait_for(lambda: out.read_text().count("restart 1: process") == 2, timeout=300)
    _wait_for(lambda: not subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True,
                                         text=True).stdout.strip(), timeout=120)
    text = out.read_text()
    assert "process 0: saved checkpoint" in text and "process 1: saved checkpoint" in text, text
    assert "restart 1: process 0 of 2 (explicit) gathered [10, 11]" in text
    assert "restart 1: process 1 of 2 (explicit) gathered [10, 11]" in text
