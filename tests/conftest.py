"""Test session setup: 8 virtual CPU devices, persistent compilation cache, private caches.

The environment variables are set before JAX is imported anywhere, and are inherited by
the `llmjax` subprocesses that the CLI tests start.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("LLMJAX_TEST_CACHE", ROOT / ".cache" / "tests"))

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags = f"{_flags} --xla_force_host_platform_device_count=8".strip()


def _with_patient_collectives(flags: str) -> str:
    """`flags` plus a longer wait for the 8 virtual devices' collectives where this XLA knows the flags.

    XLA:CPU aborts the process when one device thread reaches an all-reduce 40 s after another
    (`Termination timeout ... exceeded`), which a loaded 2-core machine can cause; the flags do not
    exist in every jaxlib and XLA aborts on unknown flags, so a subprocess tries them first."""
    import subprocess
    import sys

    extra = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=300 "
             "--xla_cpu_collective_call_terminate_timeout_seconds=1200")
    if "collective_call_terminate_timeout" in flags:
        return flags
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True, timeout=120,
                           env={**os.environ, "XLA_FLAGS": f"{flags} {extra}", "JAX_PLATFORMS": "cpu"})
    return f"{flags} {extra}" if probe.returncode == 0 else flags


os.environ["XLA_FLAGS"] = _with_patient_collectives(_flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE / "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ["LLMJAX_CACHE"] = str(CACHE / "data")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


def _seed_cpu_peak() -> None:
    """Every training run reads the CPU matmul peak (its MFU denominator) from the cache in LLMJAX_CACHE and,
    until one measurement was taken on a quiet machine, measures it again: ~2 s of every core per run, which
    while the suite runs (never quiet: two pytest-xdist workers on two cores) was paid by each of hundreds of
    training runs, `train --check` included. A nominal figure marked quiet stands in for the session (the MFU
    the test runs log is against it; nothing asserts on it); a real quiet measurement already cached is kept.
    tests/train/test_optim_metrics.py tests the measurement and its cache in their own directories."""
    from llmjax.train.telemetry import peak

    path = Path(os.environ["LLMJAX_CACHE"]) / "cpu_peak_flops.json"
    cache = peak._read_cache(path)
    keys = [peak._cpu_cache_key(dtype) for dtype in ("float32", "bfloat16", "float16")]
    if all(isinstance(cache.get(k), dict) and cache[k].get("quiet") is True for k in keys):
        return
    for k in keys:
        if not (isinstance(cache.get(k), dict) and cache[k].get("quiet") is True):
            cache[k] = {"flops": 1e11, "quiet": True, "note": "nominal, written by tests/conftest.py"}
    peak._write_cache(path, cache)


_seed_cpu_peak()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> str:
    """helpers.small_corpus, made once for the session and only read by the tests. The trained tokenizer is
    cached (LLMJAX_CACHE) under the corpus's path and mtimes, so every training run on it, subprocesses
    included, trains the tokenizer once per session instead of once per module or test."""
    from helpers import small_corpus

    return small_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def eval_run(tmp_path_factory, corpus):
    """One tiny training run shared by test_evals.py and test_tracking.py (helpers.eval_run)."""
    from helpers import eval_run as run

    return run(tmp_path_factory.mktemp("eval_run"), corpus)


# Session fixtures whose users run on one pytest-xdist worker, so that the session builds them once.
SHARED_SESSION_FIXTURES = ("slurm_cluster", "eval_run")


def xdist_group(item) -> str | None:
    """The pytest-xdist group of a test (run with `--dist loadgroup`, pyproject's addopts): every user of the
    local Slurm cluster on one worker (one cluster per session, not one per worker), the users of `eval_run`
    on one worker (one training run), and the tests of a module that share a module-scoped fixture (a trained
    model, compiled setups, a Hugging Face reference) on one worker, which builds it once; None (any worker)
    for the rest."""
    names = getattr(item, "fixturenames", ())
    for name in SHARED_SESSION_FIXTURES:
        if name in names:
            return name
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    if any(d.scope == "module" for name in names for d in defs.get(name, ())):
        return item.nodeid.split("::")[0]  # the test file
    return None


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection, and before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """hf and multiprocess tests are slow too (pyproject's markers), so `-m "not slow"` leaves them out; every
    test gets its xdist group (`xdist_group` above)."""
    for item in items:
        if item.get_closest_marker("hf") or item.get_closest_marker("multiprocess"):
            item.add_marker(pytest.mark.slow)
        group = xdist_group(item)
        if group and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node Slurm cluster for the session (launch/slurm_local.sh up, down at the end): the environment
    its clients need ({"SLURM_CONF": ...}). Skips where it cannot start (not root, Debian's Slurm not installed,
    daemons that do not come up)."""
    import shutil
    import subprocess

    script = ROOT / "launch" / "slurm_local.sh"
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root (slurmd runs the jobs)")
    if shutil.which("slurmctld", path=os.environ.get("PATH", "") + ":/usr/sbin") is None:
        pytest.skip("Slurm is not installed (apt-get install slurm-wlm)")
    state = tmp_path_factory.mktemp("slurm")
    r = subprocess.run([str(script), "up", str(state)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        subprocess.run([str(script), "down", str(state)], capture_output=True, timeout=60)
        pytest.skip(f"the local Slurm cluster did not start: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    env = dict(line.removeprefix("export ").split("=", 1) for line in r.stdout.splitlines()
               if line.startswith("export "))
    yield env
    subprocess.run([str(script), "down", str(state)], capture_output=True, timeout=60)
