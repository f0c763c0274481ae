"""Shared test utilities: tiny configs and synthetic packed batches."""

from __future__ import annotations

import numpy as np

from llmjax.config import Config, load_config, mesh_axis_names


def tiny_config(*overrides: str) -> Config:
    """A small float32 model that compiles in seconds; extra `key=value` overrides win."""
    base = [
        "model.vocab_size=128", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.d_ff=128", "model.max_seq_len=64", "model.compute_dtype=float32", "model.param_dtype=float32",
        "data.seq_len=32", "train.batch_size=8", "train.steps=4", "optim.warmup_steps=1", "optim.lr=1e-2",
        "mesh.data=1",
    ]
    return load_config(None, base + list(overrides))


def full_mesh_shape(**sizes: int) -> dict[str, int]:
    """A resolved mesh shape over every mesh axis: the given sizes, 1 elsewhere."""
    return {name: sizes.get(name, 1) for name in mesh_axis_names()}


def packed_batch(cfg: Config, seed: int = 0, rows: int | None = None) -> dict[str, np.ndarray]:
    """Random tokens packed from documents of random lengths: exercises the segment mask."""
    rng = np.random.default_rng(seed)
    B, L = rows or cfg.train.batch_size, cfg.data.seq_len
    inputs = rng.integers(1, cfg.model.vocab_size, size=(B, L), dtype=np.int32)
    targets = rng.integers(1, cfg.model.vocab_size, size=(B, L), dtype=np.int32)
    segment_ids = np.zeros((B, L), np.int32)
    positions = np.zeros((B, L), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, L), size=2, replace=False))
        seg = np.searchsorted(cuts, np.arange(L), side="right") + 1
        segment_ids[b] = seg
        starts = np.concatenate([[0], cuts])
        positions[b] = np.arange(L) - starts[seg - 1]
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids, "positions": positions,
            "weights": np.ones((B, L), np.float32)}


# Mesh layouts and tree comparison shared by tests/parallel, tests/models and tests/post (they lived in
# test_parallel.py, which other folders' tests cannot import by name).
LAYOUTS = {
    "data8": ("mesh.data=8",),
    "fsdp8": ("mesh.data=1", "mesh.fsdp=8"),
    "tensor4_data2": ("mesh.data=2", "mesh.tensor=4"),
    "data2_fsdp2_tensor2": ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
    # tiny_config runs the layers as a Python loop (the default preset); check nn.scan too.
    "data2_fsdp2_tensor2_scanned": ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "model.scan_layers=true"),
}
STEPS = 3
RTOL, ATOL = 1e-5, 1e-6  # atol is relative to the largest entry of each tensor


def run(cfg, devices):
    """Gradients at step 0 and the losses of STEPS optimizer steps on fixed batches."""
    import jax

    from llmjax.train.setup import build_setup

    setup = build_setup(cfg, devices)
    state = setup.init_state()
    batches = [setup.put_batch(packed_batch(cfg, seed=0))] * STEPS  # one batch, so the loss must fall
    grads, _ = setup.jit_gradients()(state.params, batches[0])
    grads = jax.device_get(grads)
    step = setup.jit_train_step()
    losses = []
    for b in batches:
        state, metrics = step(state, b)
        losses.append(float(metrics["loss"]))
    return grads, losses


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    import jax

    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
    assert tree_a == tree_b
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        scale = float(np.max(np.abs(y))) or 1.0
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * scale, err_msg=jax.tree_util.keystr(path))


def small_corpus(directory) -> str:
    """~0.3 MB of real text (standard-library modules) copied into `directory`; returns its path."""
    import shutil
    import sysconfig
    from pathlib import Path

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    for name in ("argparse.py", "textwrap.py", "shlex.py", "heapq.py", "bisect.py", "fnmatch.py", "glob.py",
                 "colorsys.py", "string.py", "queue.py", "sched.py", "numbers.py"):
        shutil.copy(stdlib / name, target / name)
    return str(target)


def tiny_train_overrides(corpus: str) -> list[str]:
    """CLI overrides for a run of a tiny model on `corpus` that takes seconds."""
    return [
        f"data.path={corpus}", "data.seq_len=32", "data.validation_fraction=0.2",
        "model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.d_ff=128", "model.max_seq_len=64", "model.compute_dtype=float32",
        "train.batch_size=8", "train.progress=false", "train.tensorboard=false", "optim.warmup_steps=2",
        "eval.batches=2", "sample.max_new_tokens=4",
    ]


def lm_batch(arrays):
    """A dict of [B, L] arrays (as `packed_batch` gives) -> the typed `LMBatch` the train step takes."""
    import jax.numpy as jnp

    from llmjax.models.families import LMBatch

    return LMBatch(**{k: jnp.asarray(v) for k, v in arrays.items()})


def family_loss(model, params, batch, z_loss=0.0):
    """(total, sums) of the model's family loss on a dict batch (see `ModelFamily.loss`)."""
    from llmjax.models.families import build_family

    return build_family(model.cfg).loss(model, params, lm_batch(batch), z_loss)


ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
TASK = ROOT / "experiments" / "data" / "python_mc.jsonl"  # the committed multiple-choice task


def run_llmjax(*args, env: dict | None = None, timeout: int = 600):
    """`python -m llmjax.cli ARGS` from the repository root -> CompletedProcess (text)."""
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "llmjax.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def wandb_env(tmp) -> dict[str, str]:
    """wandb's own files (settings, caches) under `tmp`, not the home directory."""
    return {"WANDB_CONFIG_DIR": str(tmp / "wandb-config"), "WANDB_CACHE_DIR": str(tmp / "wandb-cache"),
            "WANDB_DATA_DIR": str(tmp / "wandb-data"), "WANDB_SILENT": "true"}


def read_records(workdir, kind: str) -> dict[int, dict]:
    from llmjax.train.telemetry.metrics import read_metrics

    return read_metrics(workdir / "metrics.jsonl", kind)


def eval_run(tmp, corpus: str | None = None):
    """10 training steps of a tiny model on `corpus` (default: a new small_corpus under `tmp`) with the committed
    task scored at every evaluation (5 steps), TensorBoard on and, when wandb is installed, W&B offline
    -> (workdir, corpus, CompletedProcess)."""
    import importlib.util

    corpus = corpus or small_corpus(tmp / "corpus")
    workdir = tmp / "run"
    tracking = ["log.wandb.project=llmjax-tests", "log.wandb.mode=offline"] if importlib.util.find_spec("wandb") else []
    r = run_llmjax("train", "--workdir", workdir, *tiny_train_overrides(corpus), "train.steps=10",
                   "eval.every_steps=5", "sample.max_new_tokens=0", "train.tensorboard=true", f"eval.tasks=[{TASK}]",
                   "eval.tasks_limit=12", *tracking, env=wandb_env(tmp))
    assert r.returncode == 0, r.stderr[-4000:]
    return workdir, corpus, r


def write_csv(path, header: list[str], rows: list[list]):
    """A CSV file with `header` and `rows` -> its path."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def assert_each_point_won_once(wins: dict[int, list[str]], points: list[str], leases) -> None:
    """Concurrent lease claimers (`wins`: claimer index -> the points it claimed) took every point exactly once, each
    point's lease names its winner and is fresh, and the race had several winners (`leases`: a lease store)."""
    won = [point for w in wins.values() for point in w]
    assert sorted(won) == sorted(points), [p for p in set(won) if won.count(p) > 1]
    for point in points:
        lease, age = leases.read(point)
        assert lease.worker != "gone" and age < 30 and point in wins[int(lease.worker.removeprefix("claimer"))]
    assert sum(1 for w in wins.values() if w) > 1  # the race really had several winners
