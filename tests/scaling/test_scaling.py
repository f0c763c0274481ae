"""The scaling-law workflow without training: fits recover the parameters of synthetic data,
approaches 2 and 3 agree, malformed CSVs are refused, sweep specs expand as documented,
`sweep collect` reads run directories, plots are written.

Synthetic data: the Chinchilla law (Hoffmann et al. 2022, eq. 10: E = 1.69, A = 406.4,
B = 410.7, alpha = 0.34, beta = 0.28) times log-normal noise of 0.5%, on 6 IsoFLOP budgets
(1e18 .. 3e20) x 9 sizes spaced by 2x around each budget's optimum, D = C / (6N).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import run_llmjax, tiny_config, tiny_train_overrides, write_csv

from llmjax.config import save_config
from llmjax.scaling import ScalingError
from llmjax.scaling.laws.fit import (
    approach1,
    chinchilla_loss,
    chinchilla_optimum,
    fit_all,
    kaplan,
    load_curves,
    load_runs,
)
from llmjax.scaling.plots import write_plots
from llmjax.scaling.sweep.runner import collect, is_finished
from llmjax.scaling.sweep.spec import load_sweep, point_config, rule_shape
from llmjax.train.telemetry.metrics import flops_per_token

ROOT = Path(__file__).resolve().parents[2]
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
TRUE_A = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])  # N_opt ∝ C^a, a = 0.4516
BUDGETS = [1e18, 3e18, 1e19, 3e19, 1e20, 3e20]


cli = run_llmjax  # `llmjax ARGS` from the repository root


def chinchilla_rows(seed=0, noise=0.005):
    rng = np.random.default_rng(seed)
    rows = []
    for C in BUDGETS:
        n_opt = chinchilla_optimum(TRUE, C)["N_opt"]
        for f in np.geomspace(1 / 8, 8, 9):
            N = n_opt * f
            D = C / (6 * N)
            rows.append([N, D, float(chinchilla_loss(TRUE, N, D)) * np.exp(rng.normal(0, noise)), C])
    return rows


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic")
    path = write_csv(d / "runs.csv", ["params", "tokens", "loss", "flops"], chinchilla_rows())
    fit = fit_all(load_runs(path), budgets=[1e21], holdout="largest", bootstrap=20)
    return path, fit


def test_approach3_recovers_the_chinchilla_parameters(synthetic):
    _, fit = synthetic
    a3 = fit["approach3"]
    # Tolerances: exponents to ±0.03, E to 3%, A and B to a factor 1.5 (A, B and the exponents trade off).
    assert abs(a3["alpha"] - TRUE["alpha"]) < 0.03 and abs(a3["beta"] - TRUE["beta"]) < 0.03, a3
    assert abs(a3["E"] / TRUE["E"] - 1) < 0.03, a3
    assert abs(np.log(a3["A"] / TRUE["A"])) < np.log(1.5) and abs(np.log(a3["B"] / TRUE["B"])) < np.log(1.5), a3
    assert abs(a3["a"] - TRUE_A) < 0.02
    for k in ("E", "A", "B", "alpha", "beta"):
        lo, hi = a3["intervals"][k]
        assert lo <= a3[k] <= hi, (k, lo, a3[k], hi)
    assert a3["rmse_log"] < 0.01


def test_approach2_recovers_the_exponents_and_agrees_with_approach3(synthetic):
    _, fit = synthetic
    a2 = fit["approach2"]
    assert len(a2["minima"]) == len(BUDGETS) and all(m["inside"] for m in a2["minima"])
    assert abs(a2["a"] - TRUE_A) < 0.02 and abs(a2["b"] - (1 - TRUE_A)) < 0.02, a2
    assert abs(a2["a"] + a2["b"] - 1) < 1e-6  # D = C / 6N on every row
    assert abs(a2["a"] - fit["approach3"]["a"]) < 0.03 and abs(a2["b"] - fit["approach3"]["b"]) < 0.03
    for m in a2["minima"]:  # each IsoFLOP minimum lies within 20% of the true optimum
        assert abs(m["N_opt"] / chinchilla_optimum(TRUE, m["C"])["N_opt"] - 1) < 0.2, m
    lo, hi = a2["N_law"]["interval"]
    assert lo < a2["a"] < hi


def test_compute_optimal_allocation_and_holdout(synthetic):
    _, fit = synthetic
    (row,) = fit["compute_optimal"]
    truth = chinchilla_optimum(TRUE, 1e21)
    assert abs(row["approach3"]["N_opt"] / truth["N_opt"] - 1) < 0.3
    assert abs(row["approach3"]["tokens_per_param"] / truth["tokens_per_param"] - 1) < 0.5
    assert abs(row["approach2"]["N_opt"] / truth["N_opt"] - 1) < 0.3
    h = fit["holdout"]
    assert h["n_test"] == 9 and h["n_train"] == 45
    assert h["mean_abs_relative_error"] < 0.02 and abs(h["best_run"]["relative_error"]) < 0.02, h
    assert fit["approach1"]["skipped"].startswith("no 'workdir' column")


def test_kaplan_power_law_with_irreducible_term(tmp_path):
    rng = np.random.default_rng(1)
    N = np.geomspace(1e6, 1e10, 12)
    L = (2.0 + 300.0 / N**0.3) * np.exp(rng.normal(0, 0.003, len(N)))
    path = write_csv(tmp_path / "runs.csv", ["params", "tokens", "loss"],
                     [[n, 1e12, x] for n, x in zip(N, L, strict=True)])
    runs = load_runs(path)
    k = kaplan(runs)["L_N"]
    assert abs(k["alpha"] - 0.3) < 0.03 and abs(k["E"] / 2.0 - 1) < 0.03, k
    assert not runs.flops_given and np.allclose(runs.C, 6 * N * 1e12)


def write_run(run_dir: Path, steps: int, losses: list[float], evals: dict[int, float], **config) -> None:
    """A fake run directory: config.yaml (the tiny test model) and a hand-written metrics.jsonl."""
    run_dir.mkdir(parents=True)
    save_config(tiny_config(f"train.steps={steps}", *[f"{k}={v}" for k, v in config.items()]),
                run_dir / "config.yaml")
    with open(run_dir / "metrics.jsonl", "w") as f:
        for s, x in enumerate(losses):
            f.write(json.dumps({"kind": "train", "step": s, "loss": x, "step_time": 0.5, "time": 0}) + "\n")
        for s, x in evals.items():
            f.write(json.dumps({"kind": "eval", "step": s, "eval_loss": x, "time": 0}) + "\n")


def test_approach1_envelope_of_training_curves(tmp_path):
    """Curves that follow the Chinchilla law at every step (0.3% noise): the envelope's N_opt(C)
    slope is a to ±0.05."""
    rows, steps, tokens_per_step = [], 400, 1e7
    for i, N in enumerate(np.geomspace(2e7, 2e9, 12)):
        D = np.arange(1, steps + 1) * tokens_per_step
        curve = chinchilla_loss(TRUE, N, D) * np.exp(np.random.default_rng(i).normal(0, 0.003, steps))
        name = f"run{i}"
        write_run(tmp_path / name, steps, [float(x) for x in curve], {steps: float(curve[-1])})
        rows.append([name, N, D[-1], float(curve[-1]), 6 * N * D[-1], name])
    path = write_csv(tmp_path / "runs.csv", ["name", "params", "tokens", "loss", "flops", "workdir"], rows)
    a1 = approach1(load_runs(path))
    assert len(a1["envelope"]) > 30 and a1["fitted_points"] >= 8
    assert abs(a1["a"] - TRUE_A) < 0.05 and abs(a1["b"] - (1 - TRUE_A)) < 0.05, a1


@pytest.mark.parametrize("header,rows,message", [
    (["params", "loss"], [[1e6, 3.0]], "missing column(s) ['tokens']"),
    (["params", "tokens", "loss"], [[1e6, -5, 3.0]], "row 2: column 'tokens' must be positive"),
    (["params", "tokens", "loss"], [[1e6, "abc", 3.0]], "column 'tokens' is not a number"),
    (["params", "tokens", "final_loss"], [[1e6, 1e8, 3.0], [2e6, 1e8, 2.9]], "too few runs for approach 3"),
])
def test_malformed_csv_is_refused(tmp_path, header, rows, message):
    path = write_csv(tmp_path / "runs.csv", header, rows)
    with pytest.raises(ScalingError) as e:
        fit_all(load_runs(path), bootstrap=0)
    assert message in str(e.value)


def test_fit_cli_exit_status_2_on_a_missing_column(tmp_path):
    path = write_csv(tmp_path / "runs.csv", ["params", "loss"], [[1e6, 3.0]])
    r = cli("fit", "--csv", str(path), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "llmjax: error:" in r.stderr and "'tokens'" in r.stderr, r.stderr


@pytest.mark.slow
def test_fit_and_plot_cli_write_json_and_figures(synthetic, tmp_path):
    path, _ = synthetic
    r = cli("fit", "--csv", str(path), "--out", str(tmp_path), "--budgets", "1e19,1e21", "--bootstrap", "5")
    assert r.returncode == 0, r.stderr
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert {"E", "A", "B", "alpha", "beta", "intervals"} <= set(fit["approach3"])
    assert {"a", "b", "minima"} <= set(fit["approach2"]) and len(fit["compute_optimal"]) == 2
    paths = write_plots(path, tmp_path / "fit.json", tmp_path / "plots")
    names = {p.name for p in paths}
    for stem in ("isoflop", "frontier", "optimal", "residuals"):
        assert {f"{stem}.png", f"{stem}.svg"} <= names
        assert (tmp_path / "plots" / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        assert b"<svg" in (tmp_path / "plots" / f"{stem}.svg").read_bytes()[:2000]


# ----------------------------------------------------------------------------- sweeps


def test_width_depth_rule():
    assert rule_shape(256, {}) == {"d_model": 256, "n_layers": 4, "n_heads": 4, "d_ff": 1024}
    assert rule_shape(96, {"ff_multiple_of": 128}) == {"d_model": 96, "n_layers": 2, "n_heads": 1, "d_ff": 384}


def test_isoflop_spec_expansion(tmp_path):
    spec = {"name": "t", "overrides": ["data.seq_len=64", "train.batch_size=4", "model.max_seq_len=64",
                                       "model.vocab_size=512"],
            "sizes": {"d_model": [32, 64, 128]}, "isoflop": {"budgets": [6e10, 2e11], "min_steps": 50}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep = load_sweep(path)
    assert len(sweep.points) == 6 and len({p.name for p in sweep.points}) == 6
    for p in sweep.points:
        cfg = point_config(sweep, p)
        fpt = flops_per_token(cfg.model, cfg.data.seq_len)
        assert p.tokens == p.steps * 4 * 64 == cfg.train.steps * 4 * 64
        assert abs(p.tokens * fpt / p.budget - 1) < 0.01, p  # D · flops_per_token ≈ C
        assert p.flops == pytest.approx(p.tokens * fpt)
        assert cfg.model.d_model == p.shape["d_model"] and cfg.model.n_kv_heads == cfg.model.n_heads
    most = max(p.steps for p in sweep.points)
    spec["isoflop"]["max_steps"] = most - 1  # a window of sizes per budget: the longest point drops out
    path.write_text(yaml.safe_dump(spec))
    assert [p for p in load_sweep(path).points if p.steps == most] == []
    assert len(load_sweep(path).points) == 5
    spec["isoflop"]["min_steps"] = 10**6
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ScalingError, match="no points"):
        load_sweep(path)


def test_sweep_dry_run_prints_one_command_per_point(tmp_path):
    r = cli("sweep", "run", "experiments/sweeps/grid_example.yaml", "--dry-run", "--workdir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 9
    assert all(line.startswith("llmjax train --config experiments/configs/default.yaml --workdir ") for line in lines)
    assert f"--workdir {tmp_path}/d64_L2_T2e5 " in lines[0] and "train.steps=98" in lines[0]
    assert not any(tmp_path.iterdir())  # a dry run creates nothing
    r = cli("sweep", "run", "experiments/sweeps/cpu_isoflop.yaml", "--dry-run")
    assert r.returncode == 0 and len(r.stdout.strip().splitlines()) >= 16, r.stderr


def test_sweep_collect_reads_run_directories(tmp_path):
    write_run(tmp_path / "a", 10, [5.0 - 0.1 * s for s in range(10)], {0: 6.0, 5: 4.6, 10: 4.7})
    (tmp_path / "a" / "DONE").write_text(json.dumps({"wall_time": 12.5}))
    write_run(tmp_path / "b", 20, [4.0] * 20, {0: 6.0, 20: 3.9}, **{"model.d_model": 128, "model.d_ff": 256})
    write_run(tmp_path / "c", 20, [4.0] * 5, {})  # not evaluated yet: left out
    (tmp_path / "sweep.json").write_text(json.dumps({"points": [{"name": "a", "budget": 1e9}]}))
    out = collect(tmp_path)
    rows = {r["name"]: r for r in csv.DictReader(open(out))}
    assert set(rows) == {"a", "b"}
    a, b = rows["a"], rows["b"]
    assert int(a["tokens"]) == 10 * 8 * 32 and int(b["tokens"]) == 20 * 8 * 32
    cfg = tiny_config("train.steps=10")
    assert float(a["flops"]) == pytest.approx(flops_per_token(cfg.model, 32) * 10 * 8 * 32)
    assert float(a["final_loss"]) == 4.7 and float(a["best_loss"]) == 4.6 and float(b["final_loss"]) == 3.9
    assert float(a["wall_time"]) == 12.5 and float(b["wall_time"]) == 10.0  # DONE, else the step times
    assert a["budget"] == "1000000000.0" and b["budget"] == "" and a["workdir"] == "a"
    assert int(a["params"]) == int(a["active_params"]) > int(a["non_embedding_params"]) > 0
    assert int(b["params"]) > int(a["params"])
    assert is_finished(tmp_path / "b", 20) and not is_finished(tmp_path / "c", 20)
    assert is_finished(tmp_path / "a", 999)  # the DONE marker wins
    # --export: a small self-contained copy whose curves approach 1 still reads
    exported = collect(tmp_path, export=tmp_path / "export")
    rows_x = {r["name"]: r for r in csv.DictReader(open(exported))}
    assert rows_x["a"]["workdir"] == "runs/a" and rows_x["a"]["final_loss"] == a["final_loss"]
    assert load_curves(load_runs(exported))[0][1].size == 10


def test_sweep_collect_starts_no_jax_backend(tmp_path):
    """`sweep collect` only reads files: with JAX_PLATFORMS naming a platform this machine cannot start, it still
    succeeds (the parameter counts come from shapes traced without a backend)."""
    write_run(tmp_path / "a", 10, [5.0] * 10, {0: 6.0, 10: 4.7})
    env = {**os.environ, "JAX_PLATFORMS": "cuda"}
    r = subprocess.run([sys.executable, "-m", "llmjax.cli", "sweep", "collect", str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote" in r.stdout and (tmp_path / "runs.csv").is_file()


@pytest.mark.slow
def test_wsd_cooldown_branches_equal_independent_runs(tmp_path, corpus):
    """One trunk per shape; each shorter point branches from it before its decay and ends exactly where
    an independent run of the same point ends (same seed, same warmup, same data order)."""
    overrides = tiny_train_overrides(corpus) + [
        "optim.schedule=wsd", "optim.decay_fraction=0.25", "checkpoint.every_steps=0", "sample.max_new_tokens=0"]
    rows = 8 * 32  # batch_size x seq_len tokens per step
    spec = {"name": "wsd", "overrides": overrides, "cooldown_branches": True, "warmup_fraction": 0.1,
            "shapes": [{"d_model": 64, "n_layers": 1, "n_heads": 4, "d_ff": 128}],
            "grid": {"tokens": [12 * rows, 24 * rows, 40 * rows]}}
    path = tmp_path / "wsd.yaml"
    path.write_text(yaml.safe_dump(spec))
    sweep = load_sweep(path)
    short, middle, trunk = sweep.points
    assert (short.trunk, short.branch_at, middle.trunk, middle.branch_at, trunk.trunk) == \
        (trunk.name, 9, trunk.name, 18, None)
    assert all("optim.warmup_steps=1" in p.overrides for p in sweep.points)  # one warmup per shape
    dry = cli("sweep", "run", str(path), "--dry-run", "--workdir", str(tmp_path / "w"))
    assert dry.returncode == 0 and dry.stdout.count("train.stop_after=") == 2 and "cp -a" in dry.stdout

    r = cli("sweep", "run", str(path), "--workdir", str(tmp_path / "w"), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "branching from" in r.stdout
    solo = cli("train", "--workdir", str(tmp_path / "solo"), *middle.overrides)
    assert solo.returncode == 0, solo.stderr[-3000:]

    def curve(run: Path, kind: str, key: str) -> dict[int, float]:
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r[key] for r in records if r["kind"] == kind}

    runs = ("w/" + middle.name, "solo", "w/" + trunk.name)
    branch, alone, long = (curve(tmp_path / d, "train", "loss") for d in runs)
    assert sorted(branch) == list(range(24)) and sorted(long) == list(range(40))
    np.testing.assert_allclose([branch[s] for s in range(24)], [alone[s] for s in range(24)], rtol=1e-6)
    np.testing.assert_allclose([branch[s] for s in range(18)], [long[s] for s in range(18)], rtol=1e-6)
    assert branch[23] != long[23]  # the branch decayed, the trunk did not
    final = lambda d: curve(tmp_path / d, "eval", "eval_loss")  # noqa: E731
    assert final("w/" + middle.name)[24] == pytest.approx(final("solo")[24], rel=1e-6)
    with open(collect(tmp_path / "w")) as f:
        assert {r["name"] for r in csv.DictReader(f)} == {p.name for p in sweep.points}


@pytest.mark.parametrize(("sweep", "runs"), [("cpu_isoflop", 32), ("cpu_isoflop_rerun", 32), ("cpu_isoflop_tuned", 70)])
def test_committed_sweep_results_reproduce_all_three_approaches(sweep, runs):
    """experiments/results/<sweep> holds the curves approach 1 needs (runs/<name>/, not ignored by git)."""
    results = ROOT / "experiments" / "results" / sweep
    tracked = subprocess.run(["git", "ls-files", str(results / "runs")], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode == 0:  # in a git checkout: the curves are committed
        assert tracked.stdout.count("metrics.jsonl") == runs, tracked.stdout[:500]
    committed = json.loads((results / "fit.json").read_text())
    fit = fit_all(load_runs(results / "runs.csv"), bootstrap=0)
    for name in ("approach1", "approach2", "approach3"):
        assert "skipped" not in fit[name], fit[name]
        assert fit[name]["a"] == pytest.approx(committed[name]["a"], abs=1e-6), name
        assert fit[name]["b"] == pytest.approx(committed[name]["b"], abs=1e-6), name
