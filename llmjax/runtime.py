"""Process-wide JAX settings that every entry point (train, bench, eval, generate, convert) applies."""

from __future__ import annotations

import ctypes
import os
import platform
import re
import sys

from llmjax.config import Config

# `train.cpu_xla_flags`: oneDNN matmul custom calls and no YNNPACK fusions on XLA:CPU (issue 27). XLA aborts the
# process on a flag it does not know, so they are added only for jaxlib versions checked to accept them:
# 0.10.2 (Python 3.11 here) and 0.12.1 (the MaxText venv), by starting a backend with them set.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_onednn_custom_call=true", "--xla_cpu_experimental_ynn_fusion_type=")
CPU_XLA_FLAGS_JAXLIB = ((0, 10, 2), (0, 12, 1))  # the checked range, both ends included


def _version(text: str) -> tuple[int, ...]:
    """"0.10.2", "0.10.2.dev20261201" -> (0, 10, 2)."""
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


def outside_checked_jaxlib(jaxlib_version: str) -> str | None:
    """The one-line reason `train.cpu_xla_flags=true` does nothing with this jaxlib, or None inside the range."""
    low, high = CPU_XLA_FLAGS_JAXLIB
    if low <= _version(jaxlib_version) <= high:
        return None
    checked = "-".join(".".join(map(str, v)) for v in CPU_XLA_FLAGS_JAXLIB)
    return (f"train.cpu_xla_flags=true is ignored: jaxlib {jaxlib_version} is outside the versions checked to "
            f"accept the flags ({checked}); running without them")


def with_cpu_xla_flags(xla_flags: str, jaxlib_version: str) -> str | None:
    """`xla_flags` (the XLA_FLAGS value) with the `CPU_XLA_FLAGS` it does not name appended, or None where
    nothing is to change: a jaxlib outside the checked range, or every flag already named (the user's value
    of a flag is never replaced)."""
    if outside_checked_jaxlib(jaxlib_version):
        return None
    missing = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in xla_flags]
    return " ".join([xla_flags.strip(), *missing]).strip() if missing else None


# glibc's mallopt parameters (<malloc.h>)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_TRIM_THRESHOLD = 2**31 - 1  # the largest an int holds: 2 GiB of free memory at the heap's top stays mapped
KEEP_HOST_MEMORY_ENV = "LLMJAX_KEEP_HOST_MEMORY"
# The same settings for another program, set in its environment before it starts (benchmarks/vs_maxtext.py)
GLIBC_TUNABLES = f"glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={_TRIM_THRESHOLD}"


def keep_host_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process instead of unmapping it, so that XLA:CPU's
    per-step buffers reuse the same pages. Returns whether the settings were applied.

    XLA:CPU allocates each execution's temporaries with malloc from its worker threads (496 MiB for the default
    train step). glibc serves an allocation that large from a worker thread with a fresh `mmap` and unmaps it on
    free, so every step page-faults ~127 k new, zeroed pages in and unmaps them again: 165 s of system time in
    the 8-minute quickstart, a quarter of the default step's wall time. With one malloc arena, no `mmap` for
    large blocks and a 2 GiB trim threshold, the freed block stays in the heap and the next step reuses it.
    Nothing computed changes (the losses are bit-identical); the process's resident memory stays at its peak
    rather than dropping between steps. Temporaries above 2 GiB are still returned and faulted in again.

    Effective only before threads other than the main one first allocate (the command-line entry point calls it
    first; in-process users call it before importing jax). Linux with glibc only; `LLMJAX_KEEP_HOST_MEMORY=0`
    leaves malloc as it is."""
    if os.environ.get(KEEP_HOST_MEMORY_ENV, "1") == "0" or sys.platform != "linux":
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return all(mallopt(param, value) == 1 for param, value in settings)


def setup_jax(cfg: Config) -> None:
    """Partitionable RNG (the same values under any sharding), the persistent compilation cache in
    `<cache dir>/xla` unless `JAX_COMPILATION_CACHE_DIR` is set (re-runs and resumes skip compilation),
    and with `train.cpu_xla_flags` the opt-in XLA:CPU flags (effective when called before the first
    device use, as the CLI entry points do; with a jaxlib outside the checked range, one warning line on stderr
    instead)."""
    import jax

    if cfg.train.cpu_xla_flags:
        import jaxlib

        note = outside_checked_jaxlib(jaxlib.__version__)
        if note:
            print(f"llmjax: warning: {note}", file=sys.stderr, flush=True)
        flags = with_cpu_xla_flags(os.environ.get("XLA_FLAGS", ""), jaxlib.__version__)
        if flags is not None:
            os.environ["XLA_FLAGS"] = flags
    jax.config.update("jax_threefry_partitionable", True)
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        from llmjax.data.stream.files import resolve_cache_dir

        jax.config.update("jax_compilation_cache_dir", str(resolve_cache_dir(cfg) / "xla"))
