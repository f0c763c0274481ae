"""Tests of the `llmjax` command line, run as real subprocesses.

Every usage or configuration error must exit with status 2 and a one-line message on stderr
that names the offending key, file or value, without a traceback, and before anything is
compiled or checkpointed. The subprocesses inherit conftest's environment (8 virtual CPU
devices, compilation cache, LLMJAX_CACHE).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmjax.config import load_config, save_config

ROOT = Path(__file__).resolve().parent.parent

# A tiny model that is valid on 8 devices (mesh.data=-1 -> 8, batch 8); cases change one thing.
TINY = [
    "model.vocab_size=384", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.d_ff=128", "model.max_seq_len=64", "model.compute_dtype=float32", "data.seq_len=32",
    "train.batch_size=8", "train.steps=4", "train.progress=false", "train.tensorboard=false",
    "optim.warmup_steps=1", "eval.every_steps=0", "sample.max_new_tokens=0",
]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmjax.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def assert_usage_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2, no traceback, and every needle in stderr. Returns stderr."""
    err = result.stderr
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{err}"
    assert "Traceback" not in err, err
    assert "llmjax: error:" in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in stderr:\n{err}"
    return err


def train(tmp_path: Path, *args: str, workdir: Path | None = None) -> subprocess.CompletedProcess:
    workdir = workdir or tmp_path / "run"
    return run_cli("train", "--workdir", str(workdir), *TINY, f"data.cache_dir={tmp_path / 'cache'}", *args)


def assert_nothing_trained(tmp_path: Path, workdir: Path | None = None) -> None:
    """The run stopped before setup: at most the saved config.yaml and the log of the failure in the workdir,
    no checkpoints/metrics."""
    workdir = workdir or tmp_path / "run"
    if workdir.exists():
        assert {p.name for p in workdir.iterdir()} <= {"config.yaml", "llmjax.log"}, sorted(workdir.iterdir())


@pytest.fixture
def tiny_text(tmp_path: Path) -> Path:
    """A corpus far smaller than one batch of 8 x 33 tokens."""
    path = tmp_path / "tiny.txt"
    path.write_text("hello world\n")
    return path


# ----------------------------------------------------------------------------- help and argparse


def test_help_exits_zero():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "bench" in result.stdout
    result = run_cli("train", "--help")
    assert result.returncode == 0, result.stderr
    assert "--workdir" in result.stdout and "--config" in result.stdout
    result = run_cli("bench", "--help")
    assert result.returncode == 0, result.stderr
    assert "--steps" in result.stdout


@pytest.mark.skipif(shutil.which("llmjax") is None, reason="console script not installed")
def test_console_script_help():
    result = subprocess.run(["llmjax", "train", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--workdir" in result.stdout


@pytest.mark.parametrize("args", [[], ["fly"], ["bench", "--steps", "many"]])
def test_argparse_errors_exit_2(args):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "usage:" in result.stderr and "Traceback" not in result.stderr


def test_bench_steps_zero(tmp_path):
    result = run_cli("bench", "--steps", "0", *TINY, f"data.cache_dir={tmp_path / 'cache'}")
    assert_usage_error(result, "--steps", "0")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["model.d_modle=64"], ["model.d_modle"]),
        (["trian.steps=4"], ["trian"]),
        (["model.d_model=big"], ["model.d_model", "big"]),
        (["train.progress=2.5"], ["train.progress", "2.5"]),
        (["optim.name=[adamw]"], ["optim.name"]),
        (["model.d_model"], ["model.d_model", "section.key=value"]),
        (["mesh.data=3"], ["mesh", "data=3", "8 devices"]),
        (["mesh.data=-1", "mesh.fsdp=-1"], ["mesh.data", "mesh.fsdp"]),
        (["mesh.data=1", "mesh.tensor=8"], ["model.n_heads=4", "mesh.tensor=8"]),
        (["train.batch_size=12"], ["train.batch_size=12", "mesh.data", "mesh.fsdp"]),
        (["data.seq_len=128"], ["data.seq_len=128", "model.max_seq_len=64"]),
        (["optim.b2=5"], ["optim.b2=5", "[0, 1)"]),
        (["optim.name=adam"], ["optim.name", "adam"]),
        (["mesh.rules.embedding=null"], ["mesh.rules.embedding"]),
        (["train.profile_steps=[3,2]"], ["train.profile_steps", "start < stop"]),
        (["model.attention=splash", "model.attention_block_kv=100"], ["model.attention_block_kv=100", "128"]),
    ],
)
def test_config_errors(tmp_path, overrides, needles):
    result = train(tmp_path, *overrides)
    assert_usage_error(result, *needles)
    assert not (tmp_path / "run").exists()  # refused before the workdir was created


def test_missing_config_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    result = run_cli("train", "--config", str(missing), "--workdir", str(tmp_path / "run"))
    assert_usage_error(result, "missing.yaml")
    assert not (tmp_path / "run").exists()


def test_relative_missing_config_file(tmp_path):
    result = run_cli("train", "--config", "missing.yaml", "--workdir", str(tmp_path / "run"))
    assert_usage_error(result, "missing.yaml")
    assert not (tmp_path / "run").exists() and not (ROOT / "runs" / "missing").exists()


def test_yaml_syntax_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  d_model: 64\n  n_heads: [4\ntrain:\n  steps: 4\n")
    result = run_cli("train", "--config", str(path), "--workdir", str(tmp_path / "run"))
    assert_usage_error(result, "broken.yaml", "YAML")
    assert not (tmp_path / "run").exists()


def test_unknown_key_in_config_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  d_model: 64\n  layers: 2\n")
    result = run_cli("train", "--config", str(path), "--workdir", str(tmp_path / "run"))
    assert_usage_error(result, "model.layers")


def test_workdir_is_a_file(tmp_path):
    path = tmp_path / "run"
    path.write_text("not a directory\n")
    result = train(tmp_path, workdir=path)
    assert_usage_error(result, "--workdir", str(path))
    assert path.read_text() == "not a directory\n"


# ----------------------------------------------------------------------------- data errors


def test_data_path_missing(tmp_path):
    missing = tmp_path / "no_such_corpus"
    assert_usage_error(train(tmp_path, f"data.path={missing}"), "data.path", str(missing), "does not exist")
    assert_nothing_trained(tmp_path)


def test_data_path_empty_directory(tmp_path):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "data.bin").write_bytes(b"\x00")  # an ignored extension does not count
    assert_usage_error(train(tmp_path, f"data.path={empty}"), "data.path", str(empty), "data.extensions")
    assert_nothing_trained(tmp_path)


def test_data_path_empty_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_usage_error(train(tmp_path, f"data.path={empty}"), "data.path", str(empty), "empty")
    assert_nothing_trained(tmp_path)


def test_corpus_smaller_than_one_batch(tmp_path, tiny_text):
    err = assert_usage_error(train(tmp_path, f"data.path={tiny_text}"), "train split", "data.seq_len",
                             "train.batch_size=8")
    assert "compiled" not in err
    assert_nothing_trained(tmp_path)


def test_tokenizer_file_missing(tmp_path, tiny_text):
    missing = tmp_path / "nope.model"
    result = train(tmp_path, f"data.path={tiny_text}", f"data.tokenizer={missing}")
    assert_usage_error(result, "data.tokenizer", str(missing))
    assert not (tmp_path / "cache" / "tokenizers").exists()  # refused before a tokenizer was trained
    assert_nothing_trained(tmp_path)


def test_tokenizer_file_not_a_model(tmp_path, tiny_text):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a sentencepiece model")
    result = train(tmp_path, f"data.path={tiny_text}", f"data.tokenizer={junk}")
    assert_usage_error(result, "data.tokenizer", str(junk))
    assert_nothing_trained(tmp_path)


# ----------------------------------------------------------------------------- resume guard


@pytest.mark.parametrize("saved_override, needle", [("model.d_model=128", "model.d_model"),
                                                    ("optim.name=lion", "optim.name")])
def test_workdir_of_another_model_is_refused(tmp_path, saved_override, needle):
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    save_config(load_config(None, [*TINY, saved_override]), workdir / "config.yaml")
    before = (workdir / "config.yaml").read_bytes()
    saved = yaml.safe_load(before)
    # data.path does not exist: the workdir check must come before the data (and before any compile)
    result = train(tmp_path, f"data.path={tmp_path / 'no_such_corpus'}")
    assert_usage_error(result, str(workdir), needle)
    assert (workdir / "config.yaml").read_bytes() == before
    assert yaml.safe_load((workdir / "config.yaml").read_bytes()) == saved
    assert sorted(p.name for p in workdir.iterdir()) == ["checkpoints", "config.yaml"]
    assert list((workdir / "checkpoints").iterdir()) == []


def test_env_is_inherited():
    """Sanity check of the harness: the subprocesses see conftest's 8 CPU devices."""
    assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")


def test_cli_import_is_light():
    """`llmjax --help` and config errors must not wait for JAX/orbax to import."""
    code = "import sys, llmjax.cli; print(sorted(m for m in ('jax', 'orbax', 'flax') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
