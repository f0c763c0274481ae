"""Process-wide settings that the entry points apply: JAX's (train, bench, eval, generate, convert) and, for the
commands that run many steps, tcmalloc in place of the system's malloc."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence

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


TCMALLOC_ENV = "LLMJAX_TCMALLOC"  # "0": run with the system's malloc
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")  # gperftools (Debian: libtcmalloc-minimal4)
TCMALLOC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                 "/usr/local/lib")
# the verbs whose process runs many compiled steps (`sweep` only for `run` and `work`)
STEP_VERBS = frozenset({"train", "bench", "mup-check"})


def find_tcmalloc(dirs: Sequence[str] = TCMALLOC_DIRS) -> str | None:
    """The path of gperftools' tcmalloc on this machine, or None."""
    for d in dirs:
        for name in TCMALLOC_NAMES:
            path = os.path.join(d, name)
            if os.path.isfile(path):
                return path
    return None


def tcmalloc_preloaded(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `environ` (this process's by default) preloads tcmalloc."""
    return "tcmalloc" in environ.get("LD_PRELOAD", "")


def tcmalloc_environment(environ: Mapping[str, str], library: str | None) -> dict[str, str] | None:
    """The environment to re-execute with so that `library` (tcmalloc) serves malloc, or None where nothing is
    to change: opted out (`LLMJAX_TCMALLOC=0`), no library, or tcmalloc already preloaded (the re-executed
    process). tcmalloc's report of each allocation over 1 GiB on stderr is turned off, and it keeps freed memory
    (`TCMALLOC_RELEASE_RATE=0` unless the environment sets a rate)."""
    preload = environ.get("LD_PRELOAD", "")
    if environ.get(TCMALLOC_ENV, "1") == "0" or library is None or tcmalloc_preloaded(environ):
        return None
    # TCMALLOC_RELEASE_RATE=0: free memory is never handed back to the OS, so a step's block is always there for
    # the next (with the default rate, a busy machine's interleavings had tcmalloc return and re-fault some)
    return {"TCMALLOC_RELEASE_RATE": "0", **environ, "LD_PRELOAD": " ".join(p for p in (library, preload) if p),
            "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**62)}


def exec_with_tcmalloc(argv: Sequence[str]) -> None:
    """Re-execute this process (same PID, arguments and environment) with tcmalloc preloaded where the machine
    has it and `argv` (the command line's arguments) names a verb of `STEP_VERBS` or `sweep run|work`; else
    return.

    Why (issue 27): XLA:CPU mallocs each execution's temporaries (496 MiB for the default train step, 2.2 GiB at
    d_model 512) and frees them at its end. glibc serves blocks that large with a fresh `mmap` and unmaps them
    on free, so every step has the kernel zero and fault its temporaries in again, 4 KiB at a time (127 k page
    faults per default step, 165 s of system time in the 8-minute quickstart). tcmalloc keeps a freed block for
    the next step: 20-30 % shorter CPU steps, the losses bit-identical, at the cost of about one step's
    temporaries of extra resident memory (they are no longer returned between steps). glibc's own settings do
    not do it: one malloc arena without `mmap` keeps the pages but fragments (11.5 GiB resident at d_model 512
    instead of 3.2), and huge pages still zero every step's block. Linux only; the library is a system package
    (`apt install libtcmalloc-minimal4`), preloaded at start-up, hence the re-execution."""
    verbs = [a for a in argv if not a.startswith("-")][:2]
    if not verbs or not (verbs[0] in STEP_VERBS or verbs in (["sweep", "run"], ["sweep", "work"])):
        return
    if sys.platform != "linux":
        return
    env = tcmalloc_environment(os.environ, find_tcmalloc())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # no executable to re-execute (an embedded interpreter): go on with the system's malloc
        return


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
