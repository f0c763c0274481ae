"""Seeds as replicates and partial sweeps (issue 28).

- A spec's `replicates: R` gives R runs per point that differ only in their seeds (and so in data
  order and initialisation); replicate 0 is the point itself.
- `llmjax fit` fits each point's mean loss and reports the exponents' intervals from the replicate
  spread: near zero for identical replicates, wider with more seed noise (synthetic Chinchilla data).
- `sweep collect`, `fit` and `plot` on a partial sweep use the done points and name the others; too
  few done points is exit 2 naming the count.
- CSVs without replicates (the committed results) load and fit exactly as before.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import run_llmjax, tiny_config, tiny_train_overrides, write_csv

from llmjax.config import save_config
from llmjax.config.loading import to_dict
from llmjax.scaling import ScalingError
from llmjax.scaling.laws.fit import chinchilla_loss, chinchilla_optimum, fit_all, load_runs, summary
from llmjax.scaling.laws.replicates import replicate_intervals
from llmjax.scaling.plots import write_plots
from llmjax.scaling.sweep.collect import collect, point_status
from llmjax.scaling.sweep.replicates import seed_keys
from llmjax.scaling.sweep.spec import load_sweep, point_config

ROOT = Path(__file__).resolve().parents[2]
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
BUDGETS = [1e18, 3e18, 1e19, 3e19, 1e20, 3e20]
HEADER = ["name", "params", "tokens", "final_loss", "flops", "budget", "status", "replicate", "seed", "point"]


def replicate_rows(replicates: int, seed_noise: float, seed: int = 0, point_noise: float = 0.005) -> list[list]:
    """The Chinchilla law on 6 budgets x 9 sizes; each point's loss carries its own log-normal noise
    (`point_noise`, as one training run would) and each replicate an extra `seed_noise`."""
    rng = np.random.default_rng(seed)
    rows = []
    for C in BUDGETS:
        n_opt = chinchilla_optimum(TRUE, C)["N_opt"]
        for j, f in enumerate(np.geomspace(1 / 8, 8, 9)):
            N, point = n_opt * f, f"C{C:.0e}_{j}"
            D = C / (6 * N)
            loss = float(chinchilla_loss(TRUE, N, D)) * np.exp(rng.normal(0, point_noise))
            for r in range(replicates):
                name = point if r == 0 else f"{point}_r{r}"
                rows.append([name, N, D, loss * np.exp(rng.normal(0, seed_noise)), C, C, "done", r, r, point])
    return rows


def replicate_csv(tmp_path: Path, seed_noise: float, replicates: int = 3) -> Path:
    return write_csv(tmp_path / f"runs_{seed_noise}.csv", HEADER, replicate_rows(replicates, seed_noise))


def width(iv: list[float]) -> float:
    return iv[1] - iv[0]


def test_intervals_from_replicates_widen_with_seed_noise(tmp_path):
    """Identical replicates: the replicate intervals have zero width; seed noise of 0.5% and 2% of the
    loss widens them in that order. (Refits start from the true law, as `fit_all` starts them from its
    fit of the means, to keep the test fast.)"""
    a2 = {"a": 0.45}  # approach 2 succeeded on the means: refit it too
    spreads = []
    for noise in (0.0, 0.005, 0.02):
        runs = load_runs(replicate_csv(tmp_path, noise))
        assert len(runs.L) == 54 and [len(r) for r in runs.replicate_losses] == [3] * 54
        spreads.append(replicate_intervals(runs, TRUE, a2, bootstrap=12, seed=0))
    same, some, more = spreads
    assert same["points"] == 54 and same["runs"] == 162 and same["replicates"] == [3, 3]
    assert same["loss_sd"] < 1e-12 < some["loss_sd"] < more["loss_sd"]
    for approach, keys in (("approach3", ("alpha", "beta", "a", "b")), ("approach2", ("a", "b"))):
        for k in keys:
            w0, w1, w2 = (width(s[approach][k]) for s in spreads)
            assert w0 < 1e-9, (approach, k, w0)
            assert w0 < w1 < w2, (approach, k, w0, w1, w2)
    assert width(more["approach2"]["a"]) > 0.01


def test_fit_of_replicates_means_with_holdout_and_summary(tmp_path):
    fit = fit_all(load_runs(replicate_csv(tmp_path, 0.02)), holdout="largest", bootstrap=4)
    assert fit["n_runs"] == 54 and "averaged 162 runs into 54 points (3 to 3 replicates each)" in fit["notes"]
    assert fit["holdout"]["n_test"] == 9  # --holdout largest: the 9 points of the largest budget
    assert abs(fit["approach3"]["alpha"] - TRUE["alpha"]) < 0.1 and abs(fit["approach2"]["a"] - 0.4516) < 0.05
    rep = fit["replicates"]
    assert rep["bootstrap"] == 4 and set(rep["approach3"]) == {"alpha", "beta", "a", "b"}
    lines = summary(fit)
    assert "replicates: 162 runs of 54 points (3 to 3 seeds each)" in lines
    assert "approach 2 exponents, 95% interval from the replicate spread (4 refits): a [" in lines
    assert "(fit: [" in lines  # next to the fit's own interval


def test_replicate_bootstrap_is_deterministic_and_counts_single_seed_points(tmp_path):
    rows = replicate_rows(3, 0.01)
    rows = [r for r in rows if not (r[-1].startswith("C1e+18") and r[7] > 0)]  # one budget with one seed
    runs = load_runs(write_csv(tmp_path / "runs.csv", HEADER, rows))
    fit = fit_all(runs, bootstrap=0)
    one = replicate_intervals(runs, fit["approach3"], fit["approach2"], bootstrap=8, seed=3)
    two = replicate_intervals(runs, fit["approach3"], fit["approach2"], bootstrap=8, seed=3)
    assert one == two and one is not None and one["replicates"] == [1, 3] and one["runs"] == 9 + 45 * 3
    assert fit["replicates"]["bootstrap"] == 0 and "approach3" not in fit["replicates"]


def test_plots_draw_each_points_seed_range_as_an_error_bar(tmp_path):
    from llmjax.scaling.plots import _spread_bars, pyplot

    plt = pyplot()
    runs = load_runs(replicate_csv(tmp_path, 0.02))
    single = load_runs(write_csv(tmp_path / "one.csv", HEADER, replicate_rows(1, 0.0)))
    fig, (ax, bare) = plt.subplots(1, 2)
    sel = runs.budget == 0
    _spread_bars(ax, runs, sel, "red")
    _spread_bars(bare, single, single.budget == 0, "red")
    (bars,) = ax.containers
    segments = bars.lines[2][0].get_segments()  # one vertical segment per point: lowest to highest seed
    assert len(segments) == sel.sum() == 9
    for seg, i in zip(segments, np.flatnonzero(sel), strict=True):
        assert seg[0][0] == seg[1][0] == runs.N[i]
        assert sorted([seg[0][1], seg[1][1]]) == pytest.approx([runs.replicate_losses[i].min(),
                                                                runs.replicate_losses[i].max()])
    assert not bare.containers  # one seed per point: no bars
    plt.close(fig)


def test_replicates_of_a_point_must_agree_in_size(tmp_path):
    rows = replicate_rows(2, 0.01)
    rows[1][1] *= 2  # the second replicate of the first point: another model size
    with pytest.raises(ScalingError, match="the replicates of point 'C1e\\+18_0' differ in params or tokens"):
        load_runs(write_csv(tmp_path / "runs.csv", HEADER, rows))


@pytest.mark.slow
def test_single_seed_csvs_fit_exactly_as_before(tmp_path, sweep="cpu_isoflop_rerun"):
    """The committed runs.csv (no replicate columns) and the same rows with `point` = name (what `sweep
    collect` now writes for one seed) give the same fit, bit for bit, with no replicate section."""
    committed = ROOT / "experiments" / "results" / sweep / "runs.csv"
    with open(committed, newline="") as f:
        rows = list(csv.DictReader(f))
    copy = tmp_path / "runs.csv"
    with open(copy, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], "replicate", "seed", "point"])
        w.writeheader()
        w.writerows([{**r, "replicate": 0, "seed": 0, "point": r["name"],
                      "workdir": str(committed.parent / r["workdir"])} for r in rows])  # the curves, for approach 1
    before, after = load_runs(committed), load_runs(copy)
    assert before.replicate_losses is None and after.replicate_losses is None and before.progress is None
    np.testing.assert_array_equal(before.L, after.L)
    fits = [fit_all(r, budgets=[1e13], holdout="largest", bootstrap=0) for r in (before, after)]
    assert "replicates" not in fits[0] and json.dumps(fits[0], default=float) == json.dumps(fits[1], default=float)
    committed_fit = json.loads((committed.parent / "fit.json").read_text())
    for name in ("approach2", "approach3"):
        assert fits[0][name]["a"] == pytest.approx(committed_fit[name]["a"], abs=1e-6)


# ----------------------------------------------------------------------------- sweep specs


def spec_file(tmp_path: Path, corpus: str, **extra) -> Path:
    spec = {"name": "rep", "overrides": [*tiny_train_overrides(corpus), "seed=7"],
            "shapes": [{"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64},
                       {"d_model": 64, "n_layers": 1, "n_heads": 4, "d_ff": 128}],
            "grid": {"tokens": [6 * 8 * 32]}, **extra}
    path = tmp_path / "rep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_replicates_differ_only_in_their_seeds(tmp_path, corpus):
    single = load_sweep(spec_file(tmp_path, corpus))
    sweep = load_sweep(spec_file(tmp_path, corpus, replicates=3))
    assert [p.name for p in sweep.points] == ["d32_L1_T1.54e3", "d32_L1_T1.54e3_r1", "d32_L1_T1.54e3_r2",
                                              "d64_L1_T1.54e3", "d64_L1_T1.54e3_r1", "d64_L1_T1.54e3_r2"]
    # replicate 0 is the point itself: name and overrides as without `replicates`
    assert [(p.name, p.overrides) for p in sweep.points[::3]] == [(p.name, p.overrides) for p in single.points]
    for group in (sweep.points[:3], sweep.points[3:]):
        cfgs = [point_config(sweep, p) for p in group]
        assert [c.seed for c in cfgs] == [7, 8, 9] and [p.replicate for p in group] == [0, 1, 2]
        assert {p.replicate_of for p in group} == {group[0].name}
        plain = []
        for c in cfgs:
            d = to_dict(c)
            for key in seed_keys(c):
                *parents, leaf = key.split(".")
                section = d
                for part in parents:
                    section = section[part]
                section.pop(leaf)
            plain.append(d)
        assert seed_keys(cfgs[0]) == {"seed": 7}
        assert plain[0] == plain[1] == plain[2]  # nothing but the seeds differs
    with pytest.raises(ScalingError, match="'replicates' must be a positive integer, got 0"):
        load_sweep(spec_file(tmp_path, corpus, replicates=0))
    with pytest.raises(ScalingError, match="'replicates' and a seed axis"):
        load_sweep(spec_file(tmp_path, corpus, replicates=2, hyperparameters={"seed": [1, 2]}))


@pytest.mark.slow
def test_replicates_change_data_order_and_initialisation(tmp_path, corpus):
    """What the seed moves: replicate 1's first training batch and its initial parameters differ from
    replicate 0's; the same replicate built twice gives the same batch and parameters."""
    import jax

    from llmjax.data.stream.data_module import DataModule
    from llmjax.train.setup import build_setup

    sweep = load_sweep(spec_file(tmp_path, corpus, replicates=2))
    first, second = (point_config(sweep, p) for p in sweep.points[:2])

    def batch_and_params(cfg):
        it = DataModule(cfg).train_iterator()
        batch = next(it)
        it.close()
        params = jax.device_get(build_setup(cfg, jax.devices()[:1]).init_state().params)
        return batch, jax.tree_util.tree_leaves(params)

    (b0, p0), (b0_again, p0_again), (b1, p1) = (batch_and_params(c) for c in (first, first, second))
    assert all(np.array_equal(b0[k], b0_again[k]) for k in b0)
    assert all(np.array_equal(x, y) for x, y in zip(p0, p0_again, strict=True))
    assert set(b0) == set(b1) and not all(np.array_equal(b0[k], b1[k]) for k in b0)  # another data order
    drawn = [(x, y) for x, y in zip(p0, p1, strict=True) if np.std(x) > 0]  # random leaves, not the norms' ones
    assert drawn and not any(np.array_equal(x, y) for x, y in drawn)  # another initialisation


@pytest.mark.slow
def test_example_replicates_spec_dry_run(tmp_path):
    """experiments/sweeps/cpu_isoflop_tuned_replicates.yaml: 19 points around the minima x 3 seeds."""
    r = run_llmjax("sweep", "run", "experiments/sweeps/cpu_isoflop_tuned_replicates.yaml", "--dry-run",
                   "--workdir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 57 and not any(tmp_path.iterdir())
    names = [line.split("--workdir ")[1].split()[0].rsplit("/", 1)[1] for line in lines]
    points = names[::3]
    assert len(points) == 19 and all(n.startswith("C") and "_r" not in n for n in points)
    assert names[1::3] == [f"{n}_r1" for n in points] and names[2::3] == [f"{n}_r2" for n in points]
    assert all(line.endswith(f" seed={i % 3}") for i, line in enumerate(lines) if i % 3)
    assert not any("seed=" in line for line in lines[::3])  # replicate 0: the tuned sweep's own run
    committed = {row["name"] for row in csv.DictReader(open(ROOT / "experiments/results/cpu_isoflop_tuned/runs.csv"))}
    assert set(points) <= committed  # trained into that sweep's directory, its runs are replicate 0


# ----------------------------------------------------------------------------- partial sweeps


def write_run(run_dir: Path, steps: int, final: float | None, seed: int = 0) -> None:
    """A fake run directory of the tiny model: its train records and, if `final`, the last eval."""
    run_dir.mkdir(parents=True)
    save_config(tiny_config(f"train.steps={steps}", f"seed={seed}"), run_dir / "config.yaml")
    with open(run_dir / "metrics.jsonl", "w") as f:
        for s in range(steps if final is not None else steps // 2):
            f.write(json.dumps({"kind": "train", "step": s, "loss": 5.0, "step_time": 0.1, "time": 0}) + "\n")
        f.write(json.dumps({"kind": "eval", "step": 0, "eval_loss": 6.0, "time": 0}) + "\n")
        if final is not None:
            f.write(json.dumps({"kind": "eval", "step": steps, "eval_loss": final, "time": 0}) + "\n")


def test_collect_a_partial_sweep_with_replicates(tmp_path, capsys):
    listing = [{"name": "a", "budget": 1e9, "replicate": 0, "point": "a"},
               {"name": "a_r1", "budget": 1e9, "replicate": 1, "point": "a"},
               {"name": "b", "budget": 1e9}, {"name": "c", "budget": 1e9}]
    (tmp_path / "sweep.json").write_text(json.dumps({"points": listing}))
    write_run(tmp_path / "a", 6, 4.5)
    write_run(tmp_path / "a_r1", 6, 4.7, seed=1)
    write_run(tmp_path / "b", 6, None)  # interrupted half-way
    assert [point_status(tmp_path / n, 6) for n in ("a", "b", "c")] == ["done", "unfinished", "pending"]
    (tmp_path / "b" / "FAILED").write_text("{}")
    assert point_status(tmp_path / "b", 6) == "failed"
    out = collect(tmp_path)
    printed = capsys.readouterr().out
    assert "partial sweep: 2 of 4 points done; missing 2: b (failed), c (pending)" in printed
    rows = {r["name"]: r for r in csv.DictReader(open(out))}
    assert set(rows) == {"a", "a_r1", "b"} and rows["b"]["status"] == "failed"
    assert [(rows[n]["replicate"], rows[n]["seed"], rows[n]["point"]) for n in ("a", "a_r1", "b")] == \
        [("0", "0", "a"), ("1", "1", "a"), ("0", "0", "b")]


def partial_sweep(tmp_path: Path, done: int) -> Path:
    """A sweep directory whose runs.csv has `done` done rows of a 54-point synthetic sweep, 3 unfinished
    ones, and a sweep.json listing all 54."""
    rows = [r[:7] for r in replicate_rows(1, 0.0)]
    for r in rows[done:done + 3]:
        r[6] = "unfinished"
    path = write_csv(tmp_path / "runs.csv", HEADER[:7], rows[:done + 3])
    (tmp_path / "sweep.json").write_text(json.dumps({"points": [{"name": r[0]} for r in rows]}))
    return path


@pytest.mark.slow
def test_fit_and_plot_on_a_half_finished_sweep(tmp_path, capsys):
    path = partial_sweep(tmp_path, 27)  # budgets 1e18, 3e18, 1e19 done; the rest not
    fit = fit_all(load_runs(path), bootstrap=0)
    assert fit["n_runs"] == 27 and fit["partial"]["done"] == 27 and fit["partial"]["total"] == 54
    missing = fit["partial"]["missing"]
    assert len(missing) == 27 and list(missing.values()).count("unfinished") == 3
    assert list(missing)[:4] == ["C3e+19_0", "C3e+19_1", "C3e+19_2", "C3e+19_3"] and missing["C3e+19_3"] == "pending"
    first = summary(fit).splitlines()[0]
    assert first.startswith("partial sweep: 27 of 54 points done; missing 27: C3e+19_0 (unfinished), ") and \
        first.endswith(", ... (7 more)")
    (tmp_path / "fit.json").write_text(json.dumps(fit, default=float))
    write_plots(path, tmp_path / "fit.json", tmp_path / "plots")
    assert capsys.readouterr().out.startswith("partial sweep: 27 of 54 points done; missing 27:")
    assert (tmp_path / "plots" / "isoflop.png").is_file()


def test_fit_cli_on_too_few_finished_points_exits_2_with_the_count(tmp_path):
    partial_sweep(tmp_path, 4)
    r = run_llmjax("fit", "--csv", tmp_path, "--out", tmp_path / "out", "--bootstrap", "0")  # the sweep directory
    assert r.returncode == 2, r.stderr
    error = [line for line in r.stderr.splitlines() if line.startswith("llmjax: error:")]
    assert len(error) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "partial sweep: 4 of 54 points done; missing 50:" in error[0] and "too few to fit" in error[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_two_point_two_seed_sweep_end_to_end(tmp_path, corpus, capsys):
    """2 points (one shape, two learning rates) x 2 seeds trained by `sweep run --pack 4` in one program,
    collected into 4 rows that `llmjax fit` reads as 2 points; with a replicate removed, `collect` names it."""
    spec = {"name": "e2e", "overrides": [*tiny_train_overrides(corpus), "sample.max_new_tokens=0"],
            "shapes": [{"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}], "grid": {"tokens": [6 * 8 * 32]},
            "hyperparameters": {"optim.lr": [1e-2, 3e-3]}, "replicates": 2}
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump(spec))
    points = load_sweep(path).points
    names = [p.name for p in points]
    assert len(names) == 4 and names[1] == names[0] + "_r1" and names[3] == names[2] + "_r1"
    work = tmp_path / "w"
    r = run_llmjax("sweep", "run", path, "--workdir", work, "--pack", "4", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    collect(work)
    assert "partial sweep" not in capsys.readouterr().out
    rows = {row["name"]: row for row in csv.DictReader(open(work / "runs.csv"))}
    assert sorted(rows) == sorted(names)
    for point in names[::2]:
        a, b = rows[point], rows[point + "_r1"]
        assert (a["replicate"], a["seed"], b["replicate"], b["seed"]) == ("0", "0", "1", "1")
        assert a["point"] == b["point"] == point and a["status"] == b["status"] == "done"
        assert a["params"] == b["params"] and a["tokens"] == b["tokens"] and a["final_loss"] != b["final_loss"]
    runs = load_runs(work / "runs.csv")
    assert sorted(runs.names) == sorted(names[::2]) and [len(x) for x in runs.replicate_losses] == [2, 2]
    i = runs.names.index(names[0])
    assert runs.L[i] == pytest.approx((float(rows[names[0]]["final_loss"]) + float(rows[names[1]]["final_loss"])) / 2)
    import shutil

    shutil.rmtree(work / names[3])
    collect(work)
    assert f"partial sweep: 3 of 4 points done; missing 1: {names[3]} (pending)" in capsys.readouterr().out
