"""llmjax.runtime: the opt-in XLA:CPU flags (`train.cpu_xla_flags`, issue 27) and the host memory that XLA:CPU's
per-step buffers reused under tcmalloc (`exec_with_tcmalloc`)."""

import json
import os
import subprocess
import sys

import jaxlib
import pytest

from llmjax import runtime
from llmjax.config import load_config
from llmjax.runtime import (
    CPU_XLA_FLAGS,
    CPU_XLA_FLAGS_JAXLIB,
    TCMALLOC_ENV,
    exec_with_tcmalloc,
    find_tcmalloc,
    setup_jax,
    tcmalloc_environment,
    with_cpu_xla_flags,
)
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


# A jitted function whose 64 MiB dot output is a temporary of each call; prints LD_PRELOAD, the result and the median
# page faults of 5 calls (tcmalloc's heap can grow once, at any of the first calls: one call of ~16 k faults, seen in
# a full suite's run; the median says what the steady call costs). exec_with_tcmalloc re-executes this same command
# line (`python -c ...`) with tcmalloc preloaded.
_FAULT_PROBE = """
import os, resource, statistics
from llmjax.runtime import exec_with_tcmalloc
exec_with_tcmalloc(["train"])
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sort(x @ x.T, axis=0)[0].sum())
x = jnp.ones((4096, 64), jnp.float32)
for _ in range(2):
    jax.block_until_ready(f(x))
per_call = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = float(f(x))
    per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(repr(os.environ.get("LD_PRELOAD", "")), out, statistics.median(per_call))
"""


def _probe(tcmalloc: bool) -> tuple[str, str, int]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", TCMALLOC_ENV: "1" if tcmalloc else "0"}
    env.pop("LD_PRELOAD", None)
    env.pop("TCMALLOC_RELEASE_RATE", None)
    r = subprocess.run([sys.executable, "-c", _FAULT_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tcmalloc: large alloc" not in r.stderr
    preload, value, faults = r.stdout.split()[-3:]
    return preload.strip("'"), value, int(faults)


def test_tcmalloc_environment_only_where_it_can_act(tmp_path) -> None:
    lib = str(tmp_path / "libtcmalloc_minimal.so.4")
    env = tcmalloc_environment({"PATH": "/bin"}, lib)
    assert env is not None and env["LD_PRELOAD"] == lib and env["PATH"] == "/bin"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 2**40  # no stderr line per large block
    assert env["TCMALLOC_RELEASE_RATE"] == "0"  # freed blocks stay for the next step
    user_rate = tcmalloc_environment({"TCMALLOC_RELEASE_RATE": "5"}, lib)
    assert user_rate is not None and user_rate["TCMALLOC_RELEASE_RATE"] == "5"  # the user's rate is kept
    # the user's preloads are kept; the re-executed process changes nothing
    env = tcmalloc_environment({"LD_PRELOAD": "/opt/libfoo.so"}, lib)
    assert env is not None and env["LD_PRELOAD"] == f"{lib} /opt/libfoo.so"
    assert tcmalloc_environment(env, lib) is None
    assert tcmalloc_environment({TCMALLOC_ENV: "0"}, lib) is None
    assert tcmalloc_environment({}, None) is None
    assert find_tcmalloc([str(tmp_path)]) is None
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert find_tcmalloc([str(tmp_path / "missing"), str(tmp_path)]) == lib


def test_only_the_verbs_that_run_steps_re_execute(monkeypatch) -> None:
    execs: list[list[str]] = []
    monkeypatch.setattr(os, "execve", lambda path, args, env: execs.append(args))
    monkeypatch.setattr(runtime, "find_tcmalloc", lambda: "/usr/lib/libtcmalloc_minimal.so.4")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(TCMALLOC_ENV, raising=False)
    for argv in (["config", "show"], ["sweep", "collect", "d"], ["sweep", "status", "d"], ["--version"], [],
                 ["fit", "x.csv"], ["generate", "--workdir", "w"]):
        exec_with_tcmalloc(argv)
    assert execs == []
    for argv in (["train"], ["bench", "--steps", "2"], ["sweep", "run", "s.yaml"], ["sweep", "work", "d"],
                 ["mup-check", "--config", "c.yaml"]):
        exec_with_tcmalloc(argv)
    assert len(execs) == 5 and all(args[0] == sys.executable for args in execs)


@pytest.mark.skipif(find_tcmalloc() is None, reason="tcmalloc is not installed (apt install libtcmalloc-minimal4)")
def test_per_call_buffers_are_reused_under_tcmalloc() -> None:
    """With the system's malloc every call faults its 64 MiB temporary in afresh (~16 k page faults); re-executed
    with tcmalloc preloaded, the freed block serves the next call (almost no faults); the result is the same."""
    preload_off, value_off, faults_off = _probe(tcmalloc=False)
    preload_on, value_on, faults_on = _probe(tcmalloc=True)
    assert preload_off == "" and "tcmalloc" in preload_on
    assert value_on == value_off
    assert faults_off > 10_000 and faults_on * 20 < faults_off, (faults_on, faults_off)


def test_the_command_line_re_executes_before_parsing(monkeypatch) -> None:
    """`llmjax` (its own command line, argv None) hands its arguments to exec_with_tcmalloc first."""
    import llmjax.cli as cli

    calls: list[object] = []
    monkeypatch.setattr(cli, "exec_with_tcmalloc", lambda argv: calls.append(list(argv)))
    monkeypatch.setattr(cli, "_parser", lambda: calls.append("parse") or pytest.fail("stop here"))
    monkeypatch.setattr(sys, "argv", ["llmjax", "train", "train.steps=3"])
    with pytest.raises(pytest.fail.Exception):
        cli.main()
    assert calls == [["train", "train.steps=3"], "parse"]
    calls.clear()
    with pytest.raises(pytest.fail.Exception):
        cli.main(["train"])  # called as a function (tests, other programs): no re-execution
    assert calls == ["parse"]


def test_llmjax_bench_runs_under_tcmalloc_where_installed() -> None:
    """End to end: the `llmjax bench` command re-executes itself and says which malloc its steps ran with."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("LD_PRELOAD", None)
    env.pop(TCMALLOC_ENV, None)
    tiny = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=2", "model.d_ff=64",
            "model.vocab_size=256", "data.seq_len=32", "train.batch_size=8", "mesh.data=-1"]
    r = subprocess.run([sys.executable, "-m", "llmjax.cli", "bench", "--json", "--steps", "1", "--rounds", "1",
                        "--warmup", "0", *tiny], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    machine = json.loads(r.stdout[r.stdout.index("{"):])["machine"]
    assert machine["malloc"] == ("system" if find_tcmalloc() is None else "tcmalloc")
