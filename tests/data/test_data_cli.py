"""The data path end to end through the CLI: self-contained workdirs, a source that disappears mid-run,
bad data input (exit 2, nothing damaged), `llmjax data prepare` and `llmjax bench-data`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import small_corpus, tiny_train_overrides

from llmjax.train.telemetry.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def llmjax(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmjax.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def usage_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr and "llmjax: error:" in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in r.stderr, f"{n!r} not in {r.stderr[-3000:]}"


@pytest.mark.slow
def test_workdir_generates_identically_without_its_corpus(tmp_path):
    corpus = small_corpus(tmp_path / "corpus")
    cache = tmp_path / "cache"
    work = tmp_path / "work"
    r = llmjax("train", "--workdir", work, *tiny_train_overrides(corpus), f"data.cache_dir={cache}",
               "train.steps=3", "optim.warmup_steps=1", "eval.every_steps=0")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((work / "tokenizer" / "llmjax_tokenizer.json").read_text())
    assert manifest["kind"] == "sentencepiece" and (work / "tokenizer" / "tokenizer.model").is_file()
    gen = ("generate", "--workdir", work, "--prompt", "def f(x):\n", "--max-new-tokens", 12)
    before = llmjax(*gen)
    assert before.returncode == 0, before.stderr
    shutil.rmtree(corpus)
    shutil.rmtree(cache)  # nor the cached tokenizer: the workdir's copy is used
    moved = tmp_path / "moved"
    shutil.move(work, moved)
    after = llmjax(*gen[:2], moved, *gen[3:])
    assert after.returncode == 0, after.stderr
    assert after.stdout == before.stdout and not cache.exists()
    out = tmp_path / "hf"
    r = llmjax("convert", "to-hf", moved, out)
    assert r.returncode == 0, r.stderr
    assert (out / "tokenizer.model").read_bytes() == (moved / "tokenizer" / "tokenizer.model").read_bytes()


def _many_files(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"f{i:04d}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i % 7}  # file {i}\n")
    return root


@pytest.mark.slow
def test_a_source_that_disappears_mid_run_stops_cleanly(tmp_path):
    corpus = _many_files(tmp_path / "corpus", 400)
    backup = tmp_path / "backup"
    shutil.copytree(corpus, backup)
    work = tmp_path / "work"
    base = [sys.executable, "-m", "llmjax.cli", "train", "--workdir", str(work), *tiny_train_overrides(str(corpus)),
            "model.vocab_size=320", "checkpoint.every_steps=2", "eval.every_steps=0", "data.prefetch=1",
            "data.shuffle_window=0"]
    log = tmp_path / "stderr.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([*base, "train.steps=2000"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f, text=True)
    deadline = time.time() + 300
    while not ((work / "checkpoints" / "2").is_dir() and (work / "metrics.jsonl").exists()):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    shutil.rmtree(corpus)
    proc.wait(timeout=300)
    err = log.read_text()
    assert proc.returncode == 2, err[-3000:]
    assert "Traceback" not in err and "llmjax: error: data.path: cannot read" in err and str(corpus) in err
    assert "disappeared" in err
    metrics = read_metrics(work / "metrics.jsonl")
    assert metrics and max(metrics) < 1999  # intact and readable
    saved = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert saved
    shutil.copytree(backup, corpus)  # the corpus is back: the run resumes from its last checkpoint
    r = subprocess.run([*base, f"train.steps={saved[-1] + 2}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {work / 'checkpoints' / str(saved[-1])}" in r.stderr


def _tiny(corpus, *extra):
    return [*tiny_train_overrides(corpus), "train.steps=2", "optim.warmup_steps=1", "eval.every_steps=0", *extra]


@pytest.mark.slow
def test_bad_data_input_exits_2_before_training(corpus, tmp_path):
    work = tmp_path / "work"
    config_json = tmp_path / "config.json"
    config_json.write_text('{"model_type": "llama"}')
    cases = [
        ([f"data.tokenizer={config_json}"], ["data.tokenizer", "config.json", "not a Hugging Face tokenizer"]),
        ([f"data.path={_many_files(tmp_path / 'e', 0)}"], ["data.path", "no files with data.extensions"]),
        (["data.path=null", f"data.sources=[{{path: {corpus}, weight: 0}}]"], ["data.sources", "sum to 0"]),
        (["data.path=null", f"data.sources=[{{path: {corpus}, weight: -2}}]"], ["data.sources[0].weight"]),
        (["data.packing=first_fit"], ["data.packing", "first_fit"]),
        (["data.workers=-1"], ["data.workers"]),
    ]
    for extra, needles in cases:
        r = llmjax("train", "--workdir", work, *_tiny(corpus, *extra))
        usage_error(r, *needles)
        assert not (work / "checkpoints").exists() and not (work / "metrics.jsonl").exists()


@pytest.mark.slow
def test_prepare_then_train_and_a_truncated_shard(corpus, tmp_path):
    out = tmp_path / "prepared"
    r = llmjax("data", "prepare", out, f"data.path={corpus}", "model.vocab_size=512", "data.validation_fraction=0.2",
               f"data.cache_dir={tmp_path / 'cache'}")
    assert r.returncode == 0, r.stderr
    assert f"train with data.path={out}" in r.stderr
    r = llmjax("data", "prepare", out, f"data.path={corpus}", "model.vocab_size=512")
    usage_error(r, "OUT", "not an empty directory")
    work = tmp_path / "work"
    r = llmjax("train", "--workdir", work, *_tiny(str(out)))
    assert r.returncode == 0, r.stderr
    assert "prepared" in r.stderr
    shard = next(out.glob("train-*.array_record"))
    shard.write_bytes(shard.read_bytes()[:100])
    before = sorted(p.name for p in (work / "checkpoints").iterdir())
    r = llmjax("train", "--workdir", work, *_tiny(str(out), "train.steps=4"))
    usage_error(r, str(shard), "truncated")
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == before


@pytest.mark.slow
def test_bench_data_prints_figures(corpus):
    r = llmjax("bench-data", "--batches", 20, *tiny_train_overrides(corpus))
    assert r.returncode == 0, r.stderr
    for needle in ("time to first batch:", "tokens/s:", "peak memory:", "mixing: ", "files per batch of 8 rows",
                   "% of rows from a file of the previous batch (21 batches)",
                   "mixing if every row were an independent"):
        assert needle in r.stdout
    usage_error(llmjax("bench-data", "--batches", 0, *tiny_train_overrides(corpus)), "--batches")
