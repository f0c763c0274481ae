"""llmjax.runtime: the opt-in XLA:CPU flags (`train.cpu_xla_flags`, issue 27) and the host memory that XLA:CPU's
per-step buffers keep (`keep_host_memory`)."""

import os
import subprocess
import sys

import jaxlib
import pytest

from llmjax.config import load_config
from llmjax.runtime import CPU_XLA_FLAGS, CPU_XLA_FLAGS_JAXLIB, setup_jax, with_cpu_xla_flags
from tests.helpers import ROOT


def test_flags_are_appended_for_a_checked_jaxlib_and_user_flags_kept() -> None:
    for version in ("0.10.2", "0.12.1", "0.11.0.dev20261201"):
        assert with_cpu_xla_flags("", version) == " ".join(CPU_XLA_FLAGS)
        got = with_cpu_xla_flags("--xla_force_host_platform_device_count=8", version)
        assert got == " ".join(["--xla_force_host_platform_device_count=8", *CPU_XLA_FLAGS])
    # a flag the user set keeps the user's value; only the missing one is added
    user = "--xla_cpu_experimental_onednn_custom_call=false"
    assert with_cpu_xla_flags(user, "0.10.2") == f"{user} {CPU_XLA_FLAGS[1]}"
    assert with_cpu_xla_flags(" ".join(CPU_XLA_FLAGS), "0.10.2") is None


def test_no_flags_outside_the_checked_jaxlib_range() -> None:
    for version in ("0.10.1", "0.9.0", "0.12.2", "0.13.0", "1.0.0"):
        assert with_cpu_xla_flags("", version) is None, version


def test_a_jaxlib_outside_the_range_is_named_in_one_warning_line(monkeypatch, capsys) -> None:
    """The key asked for flags this jaxlib is not checked to accept: one stderr line naming the key and the
    version, XLA_FLAGS left as it was; inside the range, no warning and the flags are set."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.environ.get("JAX_COMPILATION_CACHE_DIR", "unused"))  # kept
    cfg = load_config(None, ["train.cpu_xla_flags=true"])
    monkeypatch.setattr(jaxlib, "__version__", "0.13.0")
    setup_jax(cfg)
    err = capsys.readouterr().err.splitlines()
    assert err == ["llmjax: warning: train.cpu_xla_flags=true is ignored: jaxlib 0.13.0 is outside the versions "
                   "checked to accept the flags (0.10.2-0.12.1); running without them"]
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    monkeypatch.setattr(jaxlib, "__version__", "0.10.2")
    setup_jax(cfg)
    assert capsys.readouterr().err == ""
    assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", *CPU_XLA_FLAGS]
    setup_jax(load_config(None, []))  # the key off: nothing said whatever the version
    monkeypatch.setattr(jaxlib, "__version__", "0.9.0")
    setup_jax(load_config(None, []))
    assert capsys.readouterr().err == ""


@pytest.mark.slow  # a subprocess starting jax: ~3-7 s
def test_setup_jax_sets_them_and_this_jaxlib_accepts_them() -> None:
    """The config key reaches XLA_FLAGS and XLA starts with them (an unknown flag would abort the process)."""
    code = ("import os, jax, jax.numpy as jnp; from llmjax.config import load_config; from llmjax.runtime import "
            "setup_jax; setup_jax(load_config(None, ['train.cpu_xla_flags=true'])); "
            "print(os.environ.get('XLA_FLAGS', '')); print(float((jnp.ones((4, 4)) @ jnp.ones((4, 4))).sum()))")
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    flags, total = out.stdout.splitlines()[-2:]
    low, high = CPU_XLA_FLAGS_JAXLIB
    in_range = low <= tuple(int(n) for n in jaxlib.__version__.split(".")[:3]) <= high
    assert (flags == " ".join(CPU_XLA_FLAGS)) == in_range, (flags, jaxlib.__version__)
    assert float(total) == 64.0


# A jitted function whose 64 MiB dot output is a temporary of each call; prints (applied, page faults per call).
_FAULT_PROBE = """
import resource
from llmjax.runtime import keep_host_memory
applied = keep_host_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sort(x @ x.T, axis=0)[0].sum())
x = jnp.ones((4096, 64), jnp.float32)
for _ in range(2):
    jax.block_until_ready(f(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    jax.block_until_ready(f(x))
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 4)
"""


def _faults_per_call(keep: bool) -> tuple[bool, int]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "LLMJAX_KEEP_HOST_MEMORY": "1" if keep else "0"}
    r = subprocess.run([sys.executable, "-c", _FAULT_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    applied, faults = r.stdout.split()[-2:]
    return applied == "True", int(faults)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc settings")
def test_per_call_buffers_reuse_their_pages() -> None:
    """Without keep_host_memory every call maps its 64 MiB temporary afresh and faults ~16 k pages in; with it
    the freed block stays in the heap and the next call faults (almost) none."""
    applied_off, faults_off = _faults_per_call(keep=False)
    applied_on, faults_on = _faults_per_call(keep=True)
    assert not applied_off and applied_on
    if faults_off < 4000:  # e.g. transparent huge pages for every mapping: nothing to save here
        pytest.skip(f"this kernel faults only {faults_off} pages per call without the settings")
    assert faults_on * 20 < faults_off, (faults_on, faults_off)


def test_the_command_line_applies_it_first(monkeypatch) -> None:
    """`llmjax` calls keep_host_memory before parsing its arguments (before any thread allocates)."""
    import llmjax.cli as cli

    calls: list[str] = []
    monkeypatch.setattr(cli, "keep_host_memory", lambda: calls.append("keep") or True)
    monkeypatch.setattr(cli, "_parser", lambda: calls.append("parse") or pytest.fail("stop here"))
    with pytest.raises(pytest.fail.Exception):
        cli.main(["--version"])
    assert calls == ["keep", "parse"]
