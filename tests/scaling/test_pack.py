"""`sweep run --pack K`: K points trained in one program equal K lone runs (losses, evals, checkpoints),
also under a data x fsdp mesh; packing refuses points that cannot share a program."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import read_records, tiny_train_overrides

from llmjax import runlog
from llmjax.config import ConfigError, load_config
from llmjax.scaling.sweep.multipoint_loop import train_packed
from llmjax.train.checkpoint.manager import Checkpointer
from llmjax.train.loop import train
from llmjax.train.setup import build_setup

POINTS = [["seed=0", "optim.lr=1e-2"], ["seed=1", "optim.lr=3e-3"], ["seed=0", "optim.lr=3e-3", "optim.b2=0.99",
                                                                      "optim.weight_decay=0.0"]]


def _configs(corpus, *extra):
    common = [*tiny_train_overrides(corpus), "train.steps=6", "eval.every_steps=3", "checkpoint.every_steps=3",
              "sample.max_new_tokens=0", "checkpoint.async_save=false", *extra]
    return [load_config(None, common + p) for p in POINTS]


@pytest.fixture(scope="module")
def lone_runs(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("pack")
    dirs = []
    for i, cfg in enumerate(_configs(corpus)):
        try:
            assert train(cfg, tmp / f"lone{i}") == 0
        finally:
            runlog.detach()
        dirs.append(tmp / f"lone{i}")
    return tmp, corpus, dirs


def _params(workdir, cfg, devices):
    setup = build_setup(cfg, devices)
    ckpt = Checkpointer(workdir / "checkpoints", primary=True)
    try:
        return ckpt.steps(), jax.device_get(ckpt.restore_latest(setup.abstract_state)[1].params)
    finally:
        ckpt.close()


def _assert_same_runs(lone, packed, cfg, devices):
    for a, b in zip(lone, packed, strict=True):
        for kind in ("train", "eval"):
            ra, rb = read_records(a, kind), read_records(b, kind)
            assert sorted(ra) == sorted(rb), kind
            keys = ("loss", "grad_norm") if kind == "train" else ("eval_loss",)
            for step in ra:
                for k in keys:
                    assert rb[step][k] == pytest.approx(ra[step][k], rel=1e-5), (a.name, kind, step, k)
        steps_a, pa = _params(a, cfg, devices)
        steps_b, pb = _params(b, cfg, devices)
        assert steps_a == steps_b == [3, 6]
        for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)
        assert (b / "run_info.json").is_file() and (b / "config.yaml").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["map", "vmap"])
def test_packed_points_equal_lone_runs(lone_runs, mode):
    tmp, corpus, lone = lone_runs
    configs = _configs(corpus)
    packed = [tmp / f"packed_{mode}{i}" for i in range(len(configs))]
    assert train_packed(configs, packed, mode=mode) == [0, 0, 0]
    _assert_same_runs(lone, packed, configs[0], jax.devices())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["map", "vmap"])
def test_packed_points_equal_lone_runs_under_data_and_fsdp(lone_runs, mode):
    tmp, corpus, lone = lone_runs
    configs = _configs(corpus, "mesh.data=2", "mesh.fsdp=2")
    packed = [tmp / f"packed_fsdp_{mode}{i}" for i in range(len(configs))]
    assert train_packed(configs, packed, jax.devices()[:4], mode=mode) == [0, 0, 0]
    _assert_same_runs(lone, packed, configs[0], jax.devices()[:4])


def test_packing_refuses_points_of_different_shapes(tmp_path, corpus):
    a = _configs(corpus)[0]
    b = _configs(corpus, "model.d_model=32")[1]
    with pytest.raises(ConfigError, match="model.d_model differs"):
        train_packed([a, b], [tmp_path / "a", tmp_path / "b"])
    assert not (tmp_path / "a").exists()  # refused before anything was written
    lora = _configs(corpus, "lora.rank=2")
    with pytest.raises(ConfigError, match="a pack trains from scratch on the lm objective without LoRA"):
        train_packed(lora[:2], [tmp_path / "a", tmp_path / "b"])
    sgd = _configs(corpus, "optim.name=sgd")
    with pytest.raises(ConfigError, match="--pack-mode"):
        train_packed([a, a], [tmp_path / "a", tmp_path / "b"], mode="pmap")
    with pytest.raises(ConfigError, match="optim.b1 differs .* optim.name=sgd does not allow"):  # b1: momentum
        train_packed([sgd[0], _configs(corpus, "optim.name=sgd", "optim.b1=0.5")[0]], [tmp_path / "a", tmp_path / "b"])


@pytest.mark.slow
def test_sweep_run_pack_cli(tmp_path, corpus):
    """`sweep run --pack 2` on 2 shapes x 2 learning rates: one pack per shape (shapes never share one), each
    point DONE with its own curve; collect lists all four; --pack 0 is a usage error."""
    import subprocess
    import sys

    import yaml
    from helpers import ROOT

    from llmjax.scaling.sweep.runner import collect

    overrides = tiny_train_overrides(corpus) + [
        "checkpoint.every_steps=0", "sample.max_new_tokens=0"]
    spec = {"name": "packed", "overrides": overrides, "grid": {"tokens": [4 * 8 * 32]},
            "shapes": [{"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64},
                       {"d_model": 64, "n_layers": 1, "n_heads": 4, "d_ff": 128}],
            "hyperparameters": {"optim.lr": [3e-3, 1e-2]}}
    path = tmp_path / "packed.yaml"
    path.write_text(yaml.safe_dump(spec))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "llmjax.cli", "sweep", "run", str(path), "--workdir",
                               str(tmp_path / "w"), *args], cwd=ROOT, capture_output=True, text=True, timeout=900)

    bad = cli("--pack", "0")
    assert bad.returncode == 2 and "--pack must be >= 1" in bad.stderr and "Traceback" not in bad.stderr
    dry = cli("--pack", "2", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.count("# pack of 2: ") == 2, dry.stdout
    packs = [line.split(": ", 1)[1].split() for line in dry.stdout.splitlines() if line.startswith("# pack")]
    assert all(len({name.split("_")[0] for name in pack}) == 1 for pack in packs)  # one width per pack
    r = cli("--pack", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("pack of 2:") == 2
    names = [p for pack in packs for p in pack]
    for name in names:
        run = tmp_path / "w" / name
        assert (run / "DONE").is_file() and (run / "WALL_TIME").is_file()
        assert sorted(read_records(run, "train")) == [0, 1, 2, 3]
    import csv

    with open(collect(tmp_path / "w")) as f:
        rows = list(csv.DictReader(f))
    assert {r["name"] for r in rows} == set(names) and {r["status"] for r in rows} == {"done"}
