"""Hyperparameter sweeps and fit options without training (except two tiny runs): sweep-spec axes,
best-over-hyperparameters selection and the optimal-hyperparameter laws on synthetic data with
known parameters, `--params/--loss/--flops`, the extrapolation and learning-rate transfer plots,
run_info.json (XLA's FLOPs, bytes per token), and usage errors (exit status 2).

Synthetic hyperparameter data: the Chinchilla law of tests/scaling/test_scaling.py on its 6 budgets x 9
sizes, each trained at 7 learning rates (3e-3 x 2^k) and 5 batch sizes (64 x 2^k), with
L = L_chinchilla(N, D) + CURVATURE·(log10 lr - log10 lr*(N))² + CURVATURE·(log10 B - log10 B*(C))²
times 0.2% log-normal noise, lr*(N) = LR_COEF·N^LR_EXP and B*(C) = BS_COEF·C^BS_EXP.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import run_llmjax, tiny_config, write_csv

from llmjax.config import ConfigError, save_config
from llmjax.scaling import ScalingError
from llmjax.scaling.laws.chinchilla import chinchilla_loss, chinchilla_optimum
from llmjax.scaling.laws.fit import fit_all, load_runs, runs_for_plots
from llmjax.scaling.laws.hparams import configurations, detect_axes, refine_optimum
from llmjax.scaling.plots import write_plots
from llmjax.scaling.plots_hparams import lr_transfer_table, write_lr_transfer
from llmjax.scaling.sweep.collect import collect
from llmjax.scaling.sweep.spec import load_sweep, model_param_counts, point_config

ROOT = Path(__file__).resolve().parents[2]
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
TRUE_A = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
BUDGETS = [1e18, 3e18, 1e19, 3e19, 1e20, 3e20]
LR_COEF, LR_EXP = 0.12, -0.2  # lr*(N): 0.0048 at N = 1e8
BS_COEF, BS_EXP = 2.5e-3, 0.25  # B*(C): 140 at 1e18 .. 580 at 3e20
CURVATURE = 0.5  # loss per decade² away from the optimum
LRS = [3e-3 * 2.0**k for k in range(-3, 4)]
BATCHES = [64 * 2**k for k in range(5)]


cli = run_llmjax  # `llmjax ARGS` from the repository root


def hparam_rows(seed: int = 0, noise: float = 0.002) -> list[list]:
    rng = np.random.default_rng(seed)
    rows = []
    for C in BUDGETS:
        n_opt = chinchilla_optimum(TRUE, C)["N_opt"]
        for f in np.geomspace(1 / 8, 8, 9):
            N = n_opt * f
            D = C / (6 * N)
            base = float(chinchilla_loss(TRUE, N, D))
            lr_star, bs_star = LR_COEF * N**LR_EXP, BS_COEF * C**BS_EXP
            for lr in LRS:
                for bs in BATCHES:
                    penalty = CURVATURE * (np.log10(lr / lr_star) ** 2 + np.log10(bs / bs_star) ** 2)
                    loss = (base + penalty) * np.exp(rng.normal(0, noise))
                    # the warmup is 5% of the steps: a function of the batch size, not an axis
                    steps = round(D / (bs * 1024))
                    rows.append([f"C{C:.0e}_N{N:.3g}_lr{lr:.3g}_bs{bs}", N, 0.8 * N, D, loss, C, C, lr, bs,
                                 max(1, round(0.05 * steps)), "done"])
    return rows


HEADER = ["name", "params", "non_embedding_params", "tokens", "final_loss", "flops", "budget", "optim.lr",
          "train.batch_size", "optim.warmup_steps", "status"]


@pytest.fixture(scope="module")
def hparam_fit(tmp_path_factory):
    path = write_csv(tmp_path_factory.mktemp("hparams") / "runs.csv", HEADER, hparam_rows())
    return path, fit_all(load_runs(path), budgets=[1e21], bootstrap=10)


def test_refine_optimum_recovers_a_parabola_vertex():
    values = 3e-3 * 2.0 ** np.arange(-3, 4)
    for star in (1.1e-3, 3e-3, 7.7e-3):
        losses = 2.0 + 0.5 * np.log10(values / star) ** 2
        optimum, edge = refine_optimum(values, losses)
        assert optimum == pytest.approx(star, rel=1e-9) and not edge
    optimum, edge = refine_optimum(values, 2.0 + np.log10(values / 1e-1) ** 2)  # beyond the grid: a bound
    assert edge and optimum == values.max()


def test_axes_are_detected_and_derived_columns_are_not(hparam_fit):
    path, fit = hparam_fit
    runs = load_runs(path)
    groups = configurations(runs)
    assert len(np.unique(groups)) == len(BUDGETS) * 9
    # optim.warmup_steps varies within a configuration, but only with the batch size
    assert detect_axes(runs, groups) == ["optim.lr", "train.batch_size"]
    assert fit["options"]["hparams"] == ["optim.lr", "train.batch_size"]


def test_best_over_hyperparameters_then_chinchilla_fit(hparam_fit):
    path, fit = hparam_fit
    sel = fit["selection"]
    assert sel["rows"] == len(BUDGETS) * 9 * len(LRS) * len(BATCHES) and sel["kept"] == len(BUDGETS) * 9
    runs = load_runs(path)
    kept = runs_for_plots(path, fit)
    groups = configurations(runs)
    for name, loss in zip(kept.names, kept.L, strict=True):  # each kept run is its configuration's best
        g = groups[runs.names.index(name)]
        assert loss == runs.L[groups == g].min()
    # The best grid points sit <= 0.15 decades from the optima: the fitted law is Chinchilla's.
    a3 = fit["approach3"]
    assert abs(a3["alpha"] - TRUE["alpha"]) < 0.03 and abs(a3["beta"] - TRUE["beta"]) < 0.03, a3
    assert abs(a3["E"] / TRUE["E"] - 1) < 0.03 and abs(a3["a"] - TRUE_A) < 0.02, a3
    assert abs(fit["approach2"]["a"] - TRUE_A) < 0.02, fit["approach2"]
    # Fitting every run instead mixes in mistuned ones: approach 2's exponent moves off by 0.04.
    everything = fit_all(load_runs(path), bootstrap=0, select="all")
    assert everything["n_runs"] == sel["rows"]
    assert abs(everything["approach2"]["a"] - TRUE_A) > 0.02 > abs(fit["approach2"]["a"] - TRUE_A)


def test_optimal_lr_and_batch_size_laws_recover_known_exponents(hparam_fit):
    _, fit = hparam_fit
    lr, bs = fit["hyperparameters"]["optim.lr"], fit["hyperparameters"]["train.batch_size"]
    assert len(lr["optima"]) == len(BUDGETS) * 9 and not any(o["at_edge"] for o in lr["optima"])
    law = lr["vs_N"]
    assert law["of"] == "params" and abs(law["exponent"] - LR_EXP) < 0.02, law
    assert law["interval"][0] < law["exponent"] < law["interval"][1]
    n = 1e8
    assert law["coef"] * n ** law["exponent"] == pytest.approx(LR_COEF * n**LR_EXP, rel=0.05)
    law = bs["vs_C"]
    assert law["of"] == "flops" and abs(law["exponent"] - BS_EXP) < 0.02, law
    c = 1e19
    assert law["coef"] * c ** law["exponent"] == pytest.approx(BS_COEF * c**BS_EXP, rel=0.05)


def test_params_loss_and_flops_options(tmp_path, hparam_fit):
    path, _ = hparam_fit
    fit = fit_all(load_runs(path, params="non_embedding", flops="6nd"), bootstrap=0)
    assert fit["options"]["params"] == "non_embedding" and fit["flops_source"].startswith("6*N*D")
    assert fit["flops_per_param_token"] == pytest.approx(6.0)
    # N scaled by 0.8: the same exponents, A scaled by 0.8^alpha
    assert abs(fit["approach3"]["alpha"] - TRUE["alpha"]) < 0.04
    assert fit["hyperparameters"]["optim.lr"]["vs_N"]["of"] == "non_embedding_params"
    header = ["params", "tokens", "final_loss", "final_bpb", "flops"]
    rows = [[r[1], r[3], r[4], r[4] / math.log(2) / 3.5, r[5]] for r in hparam_rows()[::35]]
    bpb = write_csv(tmp_path / "bpb.csv", header, rows)
    fit = fit_all(load_runs(bpb, loss="final_bpb"), bootstrap=0)
    assert fit["loss_unit"] == "bits/byte" and fit["options"]["loss"] == "final_bpb"
    with pytest.raises(ScalingError, match="--params non_embedding needs the column 'non_embedding_params'"):
        load_runs(bpb, params="non_embedding")
    with pytest.raises(ScalingError, match="--flops xla needs the column 'flops_xla'"):
        load_runs(bpb, flops="xla")
    with pytest.raises(ScalingError, match="--loss nope: no such column"):
        load_runs(bpb, loss="nope")


@pytest.mark.parametrize("args,message", [
    (["--params", "non_embedding"], "--params non_embedding needs the column 'non_embedding_params'"),
    (["--flops", "xla"], "--flops xla needs the column 'flops_xla'"),
    (["--hparams", "optim.nope"], "--hparams: no column(s) ['optim.nope']"),
])
def test_fit_cli_usage_errors_exit_2(tmp_path, args, message):
    rows = [[r[1], r[3], r[4]] for r in hparam_rows()[::35]]
    path = write_csv(tmp_path / "runs.csv", ["params", "tokens", "loss"], rows)
    r = cli("fit", "--csv", str(path), "--out", str(tmp_path / "out"), "--bootstrap", "0", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


# ----------------------------------------------------------------------------- plots


@pytest.mark.slow
def test_plots_extrapolate_to_the_budgets_in_the_fits_units(hparam_fit, tmp_path):
    path, fit = hparam_fit
    (row,) = fit["compute_optimal"]
    for name in ("approach2", "approach3"):
        lo, hi = row[name]["N_opt_interval"]
        assert lo < row[name]["N_opt"] < hi, (name, row[name])
    fit_path = tmp_path / "fit.json"
    fit_path.write_text(json.dumps(fit))
    names = {p.name for p in write_plots(path, fit_path, tmp_path)}
    assert {"isoflop.png", "frontier.png", "optimal.png", "residuals.png", "hparams.png", "hparams.svg"} <= names
    svg = (tmp_path / "optimal.svg").read_text()
    assert "20 tokens/parameter" in svg and "extrapolation to --budgets" in svg
    assert "nats/token" in (tmp_path / "isoflop.svg").read_text()


def transfer_rows() -> list[list]:
    """Widths 64-512 x 7 learning rates 2x apart: under 'standard' the optimum halves per doubling of the
    width (2e-2 at 64), under 'mup' it stays at 4e-3; one run diverged."""
    rows = []
    lrs = [1.25e-3 * 2.0**k for k in range(7)]
    for param in ("standard", "mup"):
        for j, width in enumerate((64, 128, 256, 512)):
            star = 2e-2 / 2**j if param == "standard" else 4e-3
            for lr in lrs:
                loss = 3.0 - 0.1 * j + 0.3 * np.log10(lr / star) ** 2
                status = "failed" if (param, width, lr) == ("standard", 512, lrs[-1]) else "done"
                rows.append([f"{param}_w{width}_lr{lr:.3g}", width, lr, param, loss, status])
    return rows


def test_lr_transfer_table_and_plot(tmp_path):
    path = write_csv(tmp_path / "runs.csv", ["name", "d_model", "optim.lr", "model.parametrization", "final_loss",
                                             "status"], transfer_rows())
    table = lr_transfer_table(path)
    assert list(table["panels"]) == ["standard", "mup"] and table["unit"] == "nats/token"
    std, mup = table["best"]["standard"], table["best"]["mup"]
    # grid 1.25e-3 * 2^k: standard's best is k = 4, 3, 2, 1 (2e-2 .. 2.5e-3), mup's k = 2 (5e-3 is nearest 4e-3)
    assert [std[w]["index"] for w in (64, 128, 256, 512)] == [4, 3, 2, 1]
    assert {mup[w]["index"] for w in mup} == {2} and table["drift"] == {"standard": 3, "mup": 0}
    assert table["panels"]["standard"][512][-1][1] is None  # the failed run: no loss
    (png, svg) = write_lr_transfer(path, tmp_path / "plots")
    assert png.read_bytes()[:4] == b"\x89PNG" and "drifts by 3 grid points" in svg.read_text()
    r = cli("plot", "--kind", "lr-transfer", "--csv", str(path), "--out", str(tmp_path / "cli"))
    assert r.returncode == 0 and (tmp_path / "cli" / "lr_transfer.png").is_file(), r.stderr
    bad = write_csv(tmp_path / "bad.csv", ["d_model", "final_loss"], [[64, 3.0]])
    r = cli("plot", "--kind", "lr-transfer", "--csv", str(bad), "--out", str(tmp_path / "cli"))
    assert r.returncode == 2 and "needs column(s) ['optim.lr']" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- sweep specs


def write_spec(tmp_path: Path, hyperparameters: dict, **extra) -> Path:
    spec = {"name": "hp", "overrides": ["data.seq_len=64", "train.batch_size=4", "model.max_seq_len=64",
                                        "model.vocab_size=512"],
            "sizes": {"d_model": [32, 64, 128]}, "isoflop": {"budgets": [6e10], "min_steps": 20},
            "hyperparameters": hyperparameters, **extra}
    path = tmp_path / "hp.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_hyperparameter_axes_grids_rules_and_laws(tmp_path):
    sweep = load_sweep(write_spec(tmp_path, {"optim.lr": [1e-3, 4e-3], "train.batch_size": [4, 8],
                                             "optim.b2": 0.99}))
    assert len(sweep.points) == 3 * 2 * 2
    by_name = {p.name: p for p in sweep.points}
    a, b = by_name["C6e10_d64_L1_b2-0.99_lr0.001_bs4"], by_name["C6e10_d64_L1_b2-0.99_lr0.004_bs8"]
    assert a.hyperparameters == {"optim.lr": 1e-3, "train.batch_size": 4, "optim.b2": 0.99}
    cfg_a, cfg_b = point_config(sweep, a), point_config(sweep, b)
    assert (cfg_a.optim.lr, cfg_a.train.batch_size, cfg_b.optim.lr, cfg_b.train.batch_size) == (1e-3, 4, 4e-3, 8)
    assert cfg_a.optim.b2 == 0.99 and abs(b.steps - a.steps / 2) <= 1  # the same tokens at twice the batch
    assert abs(b.tokens / a.tokens - 1) < 0.01 and cfg_b.train.steps == b.steps
    assert cfg_b.optim.warmup_steps == max(1, round(0.05 * b.steps))
    # a rule: lr ∝ width^-1, 4e-3 at d_model 64, with multipliers around it
    sweep = load_sweep(write_spec(tmp_path, {"optim.lr": {"rule": {"of": "d_model", "at": 64, "value": 4e-3,
                                                                   "exponent": -1}, "times": [0.5, 1]}}))
    lrs = {(p.shape["d_model"], round(p.hyperparameters["optim.lr"], 12)) for p in sweep.points}
    assert lrs == {(32, 4e-3), (32, 8e-3), (64, 2e-3), (64, 4e-3), (128, 1e-3), (128, 2e-3)}
    # a law fitted by `llmjax fit` (vs N, N = non-embedding parameters)
    law = {"coef": 0.5, "exponent": -0.4, "of": "non_embedding_params"}
    (tmp_path / "fit.json").write_text(json.dumps({"hyperparameters": {"optim.lr": {"vs_N": law}}}))
    sweep = load_sweep(write_spec(tmp_path, {"optim.lr": {"law": "fit.json", "vs": "N"}}))
    for p in sweep.points:
        n = model_param_counts(point_config(sweep, p))["non_embedding"]
        assert point_config(sweep, p).optim.lr == pytest.approx(0.5 * n**-0.4, rel=1e-12)
    assert len(sweep.points) == 3 and sweep.points[0].name.startswith("C6e10_d32_L1_lr")


@pytest.mark.parametrize("axes,message", [
    ({"optim.lrr": [1e-3]}, "hyperparameter axis 'optim.lrr' is not a config key (optim has: b1, b2,"),
    ({"optimizer.lr": [1e-3]}, "hyperparameter axis 'optimizer.lr' is not a config key (the config root has:"),
    ({"optim": [1e-3]}, "hyperparameter axis 'optim' is a config section, not a key"),
    ({"model.d_model": [64]}, "hyperparameter axis 'model.d_model' is set by the sweep itself"),
    ({"optim.lr": {"rule": {"of": "width", "exponent": -1, "coef": 1}}}, "rule.of must be one of d_model"),
    ({"optim.lr": {"law": "missing.json"}}, "hyperparameters.optim.lr.law: cannot read the fit"),
    ({"optim.lr": [-1e-3]}, "optim.lr=-0.001 must be > 0"),
    ({"train.batch_size": [4, 6.5]}, "hyperparameters.train.batch_size must be finite ints"),
])
def test_bad_hyperparameter_axes_exit_2(tmp_path, axes, message):
    path = write_spec(tmp_path, axes)
    with pytest.raises(ConfigError) as e:  # ScalingError, or the config's own check: exit status 2 both
        load_sweep(path)
    assert message in str(e.value)
    if "lrr" in str(axes):
        r = cli("sweep", "run", str(path), "--dry-run")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_spec_extends_another_and_two_specs_share_a_directory(tmp_path):
    from llmjax.scaling.sweep.runner import _write_listing

    parent = write_spec(tmp_path, {"optim.lr": [1e-3, 4e-3]})
    child = tmp_path / "wider.yaml"
    child.write_text(yaml.safe_dump({"extends": parent.name, "sizes": {"d_model": [128]},
                                     "hyperparameters": {"optim.lr": [1.6e-2]}}))
    wide = load_sweep(child)
    assert wide.name == "hp" and [p.name for p in wide.points] == ["C6e10_d128_L2_lr0.016"]
    assert point_config(wide, wide.points[0]).data.seq_len == 64  # the parent's overrides
    first = load_sweep(parent)
    listing = lambda sweep: [{"name": p.name, "budget": p.budget} for p in sweep.points]  # noqa: E731
    _write_listing(tmp_path, first, listing(first))
    _write_listing(tmp_path, wide, listing(wide))  # the second spec keeps the first one's points listed
    names = [p["name"] for p in json.loads((tmp_path / "sweep.json").read_text())["points"]]
    assert names == [p.name for p in first.points] + ["C6e10_d128_L2_lr0.016"]
    loop = tmp_path / "loop.yaml"
    loop.write_text(yaml.safe_dump({"extends": "loop.yaml"}))
    with pytest.raises(ScalingError, match="'extends' loops back"):
        load_sweep(loop)
    child.write_text(yaml.safe_dump({"extends": "missing.yaml"}))
    with pytest.raises(ScalingError, match="extends 'missing.yaml': no such file"):
        load_sweep(child)


def fake_run(run_dir: Path, steps: int, final: float, overrides: list[str], info: dict | None = None,
             finished: bool = True) -> None:
    run_dir.mkdir(parents=True)
    save_config(tiny_config(f"train.steps={steps}", *overrides), run_dir / "config.yaml")
    records = [{"kind": "train", "step": s, "loss": 5.0 - s / steps, "step_time": 0.1} for s in range(steps)]
    records += [{"kind": "eval", "step": 0, "eval_loss": 6.0}]
    if finished:
        records += [{"kind": "eval", "step": steps, "eval_loss": final}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if info is not None:
        (run_dir / "run_info.json").write_text(json.dumps(info))


def test_collect_keeps_hyperparameters_status_and_bits_per_byte(tmp_path):
    info = {"xla_flops_per_token": 1.5e6, "xla_flops_exact": True, "eval_bytes_per_token": 2.0}
    fake_run(tmp_path / "a_lr0.01", 10, 4.0, ["optim.lr=0.01"], info)
    fake_run(tmp_path / "a_lr0.1", 10, 6.0, ["optim.lr=0.1"], {**info, "xla_flops_exact": False}, finished=False)
    (tmp_path / "a_lr0.1" / "FAILED").write_text(json.dumps({"exit_status": 1}))
    fake_run(tmp_path / "old", 10, 4.5, ["optim.lr=0.01"])  # from before run_info.json
    # not in sweep.json (another spec's point): budget and hyperparameters from its DONE marker
    (tmp_path / "old" / "DONE").write_text(json.dumps({"budget": 2e9, "hyperparameters": {"warmup_fraction": 0.2}}))
    (tmp_path / "sweep.json").write_text(json.dumps({"points": [
        {"name": "a_lr0.01", "budget": 1e9, "hyperparameters": {"optim.lr": 0.01, "warmup_fraction": 0.1}},
        {"name": "a_lr0.1", "budget": 1e9, "hyperparameters": {"optim.lr": 0.1, "warmup_fraction": 0.1}}]}))
    with open(collect(tmp_path)) as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, {r["name"]: r for r in reader}
    assert header[-1] == "workdir" and {"optim.lr", "train.batch_size", "optim.b2", "warmup_fraction"} <= set(header)
    a, failed, old = rows["a_lr0.01"], rows["a_lr0.1"], rows["old"]
    assert (a["status"], failed["status"], old["status"]) == ("done", "failed", "done")
    assert float(a["optim.lr"]) == 0.01 and float(failed["optim.lr"]) == 0.1 and a["warmup_fraction"] == "0.1"
    assert a["d_model"] == "64" and a["train.batch_size"] == "8"
    assert float(a["final_bpb"]) == pytest.approx(4.0 / math.log(2) / 2.0) and old["final_bpb"] == ""
    assert float(old["budget"]) == 2e9 and old["warmup_fraction"] == "0.2"
    assert float(a["flops_xla"]) == pytest.approx(1.5e6 * 10 * 8 * 32) and failed["flops_xla"] == ""
    runs = load_runs(tmp_path / "runs.csv")
    assert sorted(runs.names) == ["a_lr0.01", "old"] and "status is not 'done': a_lr0.1" in runs.notes[0]
    with pytest.raises(ScalingError, match="'flops_xla' is empty for old"):
        load_runs(tmp_path / "runs.csv", flops="xla")


# ----------------------------------------------------------------------------- runs (tiny trainings)


@pytest.mark.slow
def test_xla_flops_of_the_compiled_step_unrolled_and_scanned():
    """XLA's count of an unrolled step is the formula's plus what it leaves out (norms, softmax, optimizer):
    a little above it; a scanned stack counts its body once and is flagged inexact."""
    import jax

    from llmjax.train.setup import build_setup
    from llmjax.train.telemetry.metrics import flops_per_token
    from llmjax.train.telemetry.run_info import xla_flops, xla_flops_caveats

    ratios = {}
    for scan in (False, True):
        cfg = tiny_config(f"model.scan_layers={str(scan).lower()}", "model.n_layers=4")
        setup = build_setup(cfg, jax.devices()[:1])
        compiled = setup.jit_train_step().lower(setup.abstract_state, setup.abstract_batch()).compile()
        per_token = xla_flops(compiled) / (cfg.train.batch_size * cfg.data.seq_len)
        ratios[scan] = per_token / flops_per_token(cfg.model, cfg.data.seq_len)
        assert bool(xla_flops_caveats(cfg)) == scan
    assert 1.0 < ratios[False] < 1.25 and ratios[True] < 0.6, ratios


@pytest.mark.slow
def test_keep_going_marks_a_diverging_point_and_the_trainer_records_run_info(tmp_path, corpus):
    from helpers import tiny_train_overrides

    overrides = tiny_train_overrides(corpus) + [
        "checkpoint.every_steps=0", "sample.max_new_tokens=0", "model.scan_layers=false"]
    spec = {"name": "kg", "overrides": overrides, "shapes": [{"d_model": 64, "n_layers": 2, "n_heads": 4,
                                                              "d_ff": 128}],
            "grid": {"tokens": [6 * 8 * 32]}, "hyperparameters": {"optim.lr": [1e-2, 1e30]}}
    path = tmp_path / "kg.yaml"
    path.write_text(yaml.safe_dump(spec))
    r = cli("sweep", "run", str(path), "--workdir", str(tmp_path / "w"), "--keep-going", timeout=600)
    assert r.returncode == 1 and "(--keep-going: next point)" in r.stderr, r.stderr[-3000:]
    good, bad = tmp_path / "w" / "d64_L2_T1.54e3_lr0.01", tmp_path / "w" / "d64_L2_T1.54e3_lr1e30"
    assert (good / "DONE").is_file() and json.loads((bad / "FAILED").read_text()) == {"exit_status": 1}
    info = json.loads((good / "run_info.json").read_text())
    assert info["xla_flops_exact"] and info["devices"] == 8 and 1.0 < info["eval_bytes_per_token"] < 8.0
    assert 1.0 < info["xla_flops_per_token"] / info["flops_per_token_formula"] < 1.5, info
    with open(collect(tmp_path / "w")) as f:
        rows = {row["name"]: row for row in csv.DictReader(f)}
    assert rows[good.name]["status"] == "done" and rows[bad.name]["status"] == "failed"
    assert float(rows[good.name]["final_bpb"]) == pytest.approx(
        float(rows[good.name]["final_loss"]) / math.log(2) / info["eval_bytes_per_token"])


def test_integer_grid_values_are_kept_and_rule_values_rounded_to_at_least_one():
    from llmjax.scaling.sweep.axes import Axis

    assert Axis("seed", "grid", [0, 1, 2], integer=True).values_at({}) == [0, 1, 2]
    rule = Axis("train.batch_size", "rule", [], rule={"of": "d_model", "coef": 0.001, "exponent": 1.0},
                times=[1.0, 100.0], integer=True)
    assert rule.values_at({"d_model": 64.0}) == [1, 6]
