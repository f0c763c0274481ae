"""A sweep worker of several processes: process 0 claims, the others follow its commands.

A worker whose points need several processes (a multi-node Slurm job step, `launch/local.sh N`, a
multi-host TPU slice) runs `llmjax sweep work DIR` in every process. Process 0 claims points,
heartbeats their leases and writes DONE/FAILED (worker.py); before it starts each trainer command
(`llmjax train ...`, a trunk's advance) it broadcasts the command, and every other process runs
exactly that command, so that all of them join the same `jax.distributed` run. When no point is
left process 0 broadcasts the end and the others exit.

The broadcast is a file in the sweep directory (a shared file system, or gs://: the hosts of a TPU
slice share no file system; through llmjax.storage): `DIR/.leases/<channel>.announce`
({"seq", "cmd", "end"}, replaced atomically by process 0). Process i > 0 runs each new command and
acknowledges it in `<channel>.ack.<i>`; process 0 broadcasts the next command only once every
process has acknowledged the last one, so no process skips a command (say its trainer failed at
once on one side and the other is still starting). The channel is the worker's name plus the Slurm
step and restart count, so that a requeued worker never reads the end its previous run announced.

The process count and index: Slurm's SLURM_STEP_NUM_TASKS/SLURM_PROCID, launch/local.sh's
LLMJAX_NUM_PROCESSES/LLMJAX_PROCESS_ID, and on a TPU slice (whose environment names neither)
LLMJAX_WORKER_PROCESSES, the slice's host count that launch/tpu_pod.sh --workers exports from
--type, with the host's index from LLMJAX_WORKER_PROCESS_ID, else TPU_WORKER_ID, else the TPU VM
metadata's `agent-worker-number` (what jax's cloud_tpu_cluster reads), else the hostname's -w-<i>.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

from llmjax.storage import is_url, write_atomic

METADATA = "http://{host}/computeMetadata/v1/instance/attributes/agent-worker-number"


def process_index() -> tuple[int, int]:
    """(this process's index within its worker, the worker's process count): a Slurm job step's task
    (SLURM_PROCID), launch/local.sh's LLMJAX_PROCESS_ID, a TPU slice's host (module docstring; a
    slice started without LLMJAX_WORKER_PROCESSES: count 0, "several, not known")."""
    env = os.environ
    if env.get("SLURM_STEP_ID") is not None and env.get("SLURM_PROCID"):
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or 1)
    if env.get("LLMJAX_NUM_PROCESSES"):
        return int(env.get("LLMJAX_PROCESS_ID", "0")), int(env["LLMJAX_NUM_PROCESSES"])
    if env.get("LLMJAX_WORKER_PROCESSES"):  # launch/tpu_pod.sh --workers: the slice's host count
        count = int(env["LLMJAX_WORKER_PROCESSES"])
        return (tpu_host_index() if count > 1 else 0), count
    if env.get("LLMJAX_WORKER"):  # a slice started by hand: its size unknown
        return tpu_host_index(), 0
    return 0, 1


def tpu_host_index() -> int:
    """This TPU VM host's index in its slice: LLMJAX_WORKER_PROCESS_ID, TPU_WORKER_ID, the metadata
    server's agent-worker-number (GCE_METADATA_IP overrides its address, as for jax), the hostname's
    -w-<i>, else 0."""
    env = os.environ
    for name in ("LLMJAX_WORKER_PROCESS_ID", "TPU_WORKER_ID"):
        if (env.get(name) or "").strip().isdigit():
            return int(env[name])
    url = METADATA.format(host=env.get("GCE_METADATA_IP", "metadata.google.internal"))
    try:
        req = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(req, timeout=5) as r:
            text = r.read().decode().strip()
        if text.isdigit():
            return int(text)
    except (OSError, ValueError):
        pass  # not on a TPU VM
    m = re.search(r"-w-(\d+)$", socket.gethostname())
    return int(m.group(1)) if m else 0


def channel(worker: str) -> str:
    """The broadcast's name: the worker's, plus the Slurm step and restart count (a requeued array task
    keeps its job id and its worker name)."""
    env = os.environ
    name = worker
    if env.get("SLURM_JOB_ID"):
        name += f".s{env.get('SLURM_STEP_ID', '0')}.r{env.get('SLURM_RESTART_COUNT', '0')}"
    return re.sub(r"[^A-Za-z0-9_.:-]", "_", name)


class Broadcast:
    """Process 0's side: `announce(cmd)` before running a command, `acked(seq)` after. `count`: the
    worker's processes (0 when not known: a TPU slice; then process 0 does not wait for the others)."""

    def __init__(self, directory: Any, name: str, count: int):
        self.dir, self.name, self.count = directory, name, count
        self.seq = 0
        self.followers = range(1, count)  # empty when the count is not known (0): no acknowledgements

    def announce(self, cmd: list[str] | None) -> int:
        """Publish the next command (None: the end); its sequence number."""
        self.seq += 1
        write_atomic(self.dir / f"{self.name}.announce", json.dumps({"seq": self.seq, "cmd": cmd, "end": cmd is None}))
        return self.seq

    def acked(self, seq: int) -> bool:
        """Whether every other process has finished command `seq`."""
        return all(_read_seq(self.dir / f"{self.name}.ack.{i}") >= seq for i in self.followers)


def _read_seq(path: Any) -> int:
    try:
        return int(json.loads(path.read_text())["seq"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def follow(directory: Any, name: str, rank: int, die_with_parent: Any = None) -> int:
    """Process `rank` > 0: run each command process 0 announces until it announces the end; 0, or 143
    when stopped by SIGTERM/SIGINT (passed to the running command)."""
    state: dict[str, Any] = {"child": None, "stopping": False}

    def on_signal(signum: int, _frame: Any) -> None:
        state["stopping"] = True
        if state["child"] is not None and state["child"].poll() is None:
            state["child"].send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"llmjax sweep work: process {rank} of worker {name} follows process 0", flush=True)
    seen, ran = 0, 0
    while not state["stopping"]:
        try:
            msg = json.loads((directory / f"{name}.announce").read_text())
        except (OSError, ValueError):
            msg = {"seq": 0}
        if int(msg.get("seq", 0)) > seen:
            seen = int(msg["seq"])
            if msg.get("end"):
                print(f"llmjax sweep work: process {rank} of worker {name} done after {ran} commands", flush=True)
                return 0
            state["child"] = subprocess.Popen(msg["cmd"], preexec_fn=die_with_parent)
            rc = state["child"].wait()
            state["child"] = None
            ran += 1
            write_atomic(directory / f"{name}.ack.{rank}", json.dumps({"seq": seen, "exit_status": rc}))
            continue
        time.sleep(1.0 if is_url(directory) else 0.1)  # an object store: one read a second
    sys.stdout.flush()
    return 143


__all__ = ["Broadcast", "channel", "follow", "process_index", "tpu_host_index"]
