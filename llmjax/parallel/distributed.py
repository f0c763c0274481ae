"""Start JAX's multi-controller runtime (`jax.distributed`) when the run spans processes.

One `llmjax train` process runs per host (TPU), per GPU or per node (Slurm), or per
group of CPU devices (launch/local.sh); they find each other through a coordinator
(process 0). Where the settings come from, first match wins:

1. explicit: CLI flags `--coordinator HOST:PORT --num-processes N --process-id I`, else the
   environment `LLMJAX_COORDINATOR / LLMJAX_NUM_PROCESSES / LLMJAX_PROCESS_ID` (what
   launch/local.sh sets), else the config section `distributed.*`; inside a detected
   cluster some may be left out (launch/slurm_gpu.sbatch sets only the coordinator: the
   process count and id come from Slurm);
2. auto-detected cluster (`distributed.auto_detect`, default on): a Cloud TPU pod slice
   (no arguments needed) or a Slurm job step with several tasks (`SLURM_*`) -- JAX reads
   the coordinator, process count and id from the environment;
3. otherwise a single process: nothing to do.

`initialize` must run before anything touches a device.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

from llmjax.config import Config, ConfigError

ENV_COORDINATOR = "LLMJAX_COORDINATOR"
ENV_NUM_PROCESSES = "LLMJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "LLMJAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How to start the runtime: `mode` is "explicit", "auto" (a detected cluster) or "single"."""

    mode: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    cluster: str | None = None  # the detected environment, for messages

    @property
    def kwargs(self) -> dict[str, Any]:
        if self.mode != "explicit":
            return {}
        return {"coordinator_address": self.coordinator, "num_processes": self.num_processes,
                "process_id": self.process_id}


def _int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected an integer, got {value!r}") from None


def plan(cfg: Config, coordinator: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, environ: dict[str, str] | None = None) -> Plan:
    """Decide how to initialise from flags (arguments), environment and config. Raises ConfigError."""
    env = os.environ if environ is None else environ
    d = cfg.distributed
    coord = coordinator or env.get(ENV_COORDINATOR) or d.coordinator
    n = num_processes if num_processes is not None else (
        _int(env[ENV_NUM_PROCESSES], ENV_NUM_PROCESSES) if env.get(ENV_NUM_PROCESSES) else
        (d.num_processes or None))
    pid = process_id if process_id is not None else (
        _int(env[ENV_PROCESS_ID], ENV_PROCESS_ID) if env.get(ENV_PROCESS_ID) else
        (d.process_id if d.process_id >= 0 else None))
    given = {"--coordinator": coord, "--num-processes": n, "--process-id": pid}
    if any(v is not None for v in given.values()):
        if coord is not None and (":" not in coord or not coord.rsplit(":", 1)[1].isdigit()):
            raise ConfigError(f"distributed: coordinator must be HOST:PORT, got {coord!r}")
        if n is not None and n < 1:
            raise ConfigError(f"distributed: num_processes must be >= 1, got {n}")
        if pid is not None and (pid < 0 or (n is not None and pid >= n)):
            raise ConfigError(f"distributed: need 0 <= process_id < num_processes, got {pid} of {n}")
        missing = [k for k, v in given.items() if v is None]
        cluster = detect_cluster(environ) if missing and d.auto_detect else None
        if missing and cluster is None:
            raise ConfigError(
                f"distributed: {', '.join(missing)} missing (set all of --coordinator, --num-processes, --process-id, "
                f"or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}, or distributed.*)"
            )
        if n == 1 and not missing:
            return Plan("single")
        # What is not given comes from the detected cluster (e.g. the Slurm task's rank).
        return Plan("explicit", coord, n, pid, cluster=cluster)
    if d.auto_detect:
        cluster = detect_cluster(environ)
        if cluster is not None:
            return Plan("auto", cluster=cluster)
    return Plan("single")


def detect_cluster(environ: dict[str, str] | Any = None) -> str | None:
    """Name of a multi-process cluster environment that `jax.distributed.initialize()` can read, or None.

    Slurm counts only inside a job step with more than one task (`srun`): a one-task job, or
    the batch script itself, is a single process. Cloud TPU VMs are detected as JAX does
    (metadata server / TPU worker variables).
    """
    env = os.environ if environ is None else environ
    if env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_ID") is not None:
        try:
            ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1")
        except ValueError:
            ntasks = 1
        return "slurm" if ntasks > 1 else None
    if environ is not None:  # a test's fake environment: no probing of the real machine
        return None
    try:  # private JAX API: the list of environments jax.distributed.initialize() knows
        from jax._src import clusters

        for env_type in clusters.ClusterEnv._cluster_types:
            if env_type.opt_in_only_method or env_type.__name__.startswith("Slurm"):
                continue
            if env_type.is_env_present():
                return env_type.__name__
    except Exception:  # detection is best effort; an explicit setting always works
        return None
    return None


def initialize(cfg: Config, coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> Plan:
    """Start `jax.distributed` as `plan` decides (no-op for a single process); return the plan."""
    p = plan(cfg, coordinator, num_processes, process_id)
    if p.mode == "single":
        return p
    import jax

    if _cpu_only():
        # Cross-process collectives on CPU devices (the default in recent JAX; older ones need it).
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except Exception:
            pass
    try:
        jax.distributed.initialize(**p.kwargs, initialization_timeout=cfg.distributed.initialization_timeout)
    except Exception as e:
        where = f"coordinator {p.coordinator}" if p.coordinator else f"the detected {p.cluster} environment"
        raise ConfigError(f"distributed: could not initialise with {where}: {type(e).__name__}: {e}") from None
    if jax.process_index() == 0:
        print(f"distributed: {jax.process_count()} processes, {jax.device_count()} devices "
              f"({jax.local_device_count()} per process) via "
              f"{p.coordinator or p.cluster}", file=sys.stderr, flush=True)
    return p


def _cpu_only() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    return platforms.strip().lower() == "cpu"
