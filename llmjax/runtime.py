"""Process-wide JAX settings that every entry point (train, bench, eval, generate, convert) applies."""

from __future__ import annotations

import os
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
