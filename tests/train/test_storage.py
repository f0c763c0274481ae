"""gs:// workdirs: training, resuming, metrics, checksums and eval on `gs://bucket/run` go through the same
code as on a real bucket (etils.epath for files, orbax's GCS paths for checkpoints); only the storage service
is replaced, by a local directory: epath's backends are swapped for one that maps `gs://B/P` to `ROOT/B/P`,
and tensorstore (which orbax uses for the array data) writes `ROOT/B/P` with its file driver."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import tiny_train_overrides

from llmjax.config import load_config
from llmjax.train.telemetry.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def local_gcs(root: Path) -> Iterator[None]:
    """Serve `gs://` URLs from the directory `root` for epath, orbax and tensorstore (in this process)."""
    from etils.epath import testing as epath_testing
    from orbax.checkpoint._src.path import gcs_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    def local(path):
        text = os.fspath(path)
        return str(root / text[len("gs://"):]) if text.startswith("gs://") else text

    def remote(path):
        text = os.fspath(path)
        return "gs://" + os.path.relpath(text, root) if text.startswith(str(root) + os.sep) else text

    def mapped(original, path, *args, **kwargs):
        return original(local(path), *[local(a) if isinstance(a, str) else a for a in args], **kwargs)

    def glob(original, path):
        return [remote(p) for p in original(local(path))]

    def walk(original, path, *args, **kwargs):
        for dirpath, dirs, files in original(local(path), *args, **kwargs):
            yield remote(dirpath), dirs, files

    names = ("copy", "exists", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rename", "replace",
             "rmtree", "stat")
    normalize = ts_utils._normalize_path
    with contextlib.ExitStack() as stack:
        stack.enter_context(epath_testing.mock_epath(glob=glob, walk=walk, **{n: mapped for n in names}))
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        mp.setattr(ts_utils, "_use_gcs_driver", lambda d: False)
        mp.setattr(ts_utils, "_normalize_path", lambda p: normalize(local(p)))
        mp.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda p: False)
        yield


def _train(url: str, corpus: str, *extra: str) -> int:
    from llmjax.runtime import setup_jax
    from llmjax.train.loop import train

    cfg = load_config(None, [*tiny_train_overrides(corpus), "train.tensorboard=true", *extra])
    setup_jax(cfg)
    return train(cfg, url)


@pytest.mark.slow
def test_train_resume_and_eval_on_a_gs_workdir(corpus, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("LLMJAX_CACHE", str(tmp_path / "cache"))
    bucket = tmp_path / "bucket-root"
    url = "gs://my-bucket/runs/tiny"
    with local_gcs(bucket):
        assert _train(url, corpus, "train.steps=8", "train.stop_after=4", "checkpoint.every_steps=2",
                      "eval.every_steps=4") == 0
        assert _train(url, corpus, "train.steps=8", "checkpoint.every_steps=2", "eval.every_steps=4") == 0
        err = capfd.readouterr().err
        assert f"resumed from {url}/checkpoints/4" in err
        records = read_metrics(f"{url}/metrics.jsonl")
        assert sorted(records) == list(range(8))  # the first run's records were kept: appended remotely

        from llmjax.infer.workdir_model import Loaded

        loaded = Loaded(url)
        assert loaded.step == 8
    run = bucket / "my-bucket" / "runs" / "tiny"
    # Everything landed in the bucket stand-in, nothing in a local directory named after the URL.
    assert {"config.yaml", "metrics.jsonl", "llmjax.log", "checkpoints", "tensorboard"} <= {p.name for p in
                                                                                             run.iterdir()}
    assert not Path("gs:").exists() and not (Path.cwd() / "gs:").exists()
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 6, 8]  # checkpoint.keep=3 deleted the older ones through orbax's GCS path
    for step in steps:
        assert list((run / "checkpoints" / str(step)).glob("llmjax_checksums.*.json"))
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    log = (run / "llmjax.log").read_text()
    assert log.count("llmjax ") >= 2  # both runs, the first one kept when the second uploaded
    # The remote tokenizer copy was loaded (resume, eval) through one local mirror, not a temp dir per load.
    mirrors = [p for p in (tmp_path / "cache" / "remote_tokenizers").iterdir() if not p.name.startswith(".")]
    assert len(mirrors) == 1 and (mirrors[0] / "llmjax_tokenizer.json").is_file()


def test_a_gs_url_is_never_a_local_path(tmp_path):
    from llmjax.storage import as_path, free_space, is_url, writable_ancestor

    assert is_url("gs://b/x") and not is_url("/tmp/x") and not is_url("runs/x")
    assert str(as_path("gs://b/x/y")) == "gs://b/x/y"
    assert str(as_path("runs/x")) == os.path.abspath("runs/x")
    assert "object store" in free_space("gs://b/x") and writable_ancestor("gs://b/x") is None
    assert "free of" in free_space(tmp_path / "not" / "yet")


def test_cli_accepts_a_gs_workdir_for_check(corpus, tmp_path):
    """Without a GCS backend installed the URL is refused with exit 2 naming it; nothing is written locally.
    The test extra installs gcsfs (the gs:// sweep tests run it against an emulator), so the subprocess gets a
    `gcsfs` that fails to import, as on a machine without it (with it and no network, gcsfs would retry for a
    minute and log tracebacks: not this test's subject)."""
    hidden = tmp_path / "no-gcsfs" / "gcsfs"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError(\"No module named 'gcsfs'\")\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden.parent), str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "llmjax.cli", "train", "--check", "--workdir", "gs://b/run",
                        *tiny_train_overrides(corpus), "train.steps=4"], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=env)
    assert "Traceback" not in r.stderr
    assert r.returncode == 2 and "pip install gcsfs" in r.stderr, r.stderr
    assert not (ROOT / "gs:").exists()
