"""Tests for llmjax.train.optim and llmjax.train.telemetry.metrics (small, CPU only)."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llmjax.config import ModelConfig, OptimConfig
from llmjax.models.roles import decay_mask
from llmjax.train import optim as O
from llmjax.train.setup import model_abstract_params
from llmjax.train.telemetry import metrics as M
from llmjax.train.telemetry import peak

# ----------------------------------------------------------------------------- schedules


def _cfg(**kw) -> OptimConfig:
    base = dict(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2, weight_decay=0.0, clip_norm=0.0)
    base.update(kw)
    return OptimConfig(**base)


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("cosine", {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.55, 100: 0.1, 150: 0.1}),
        ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.55, 100: 0.1, 150: 0.1}),
        ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 55: 1.0, 100: 1.0}),
        ("wsd", {0: 0.0, 5: 0.5, 10: 1.0, 79: 1.0, 80: 1.0, 90: 0.55, 100: 0.1, 150: 0.1}),
    ],
)
def test_schedule_boundaries(schedule: str, expected: dict[int, float]) -> None:
    cfg = _cfg(schedule=schedule)
    fn = O.make_schedule(cfg, total_steps=100)
    for step, lr in expected.items():
        assert float(fn(step)) == pytest.approx(lr, abs=1e-6), (schedule, step)
        assert O.current_lr(cfg, 100, step) == pytest.approx(lr, abs=1e-6)
    assert float(jax.jit(fn)(jnp.int32(5))) == pytest.approx(0.5)


def test_schedule_without_warmup_and_cosine_shape() -> None:
    cfg = _cfg(schedule="cosine", warmup_steps=0)
    fn = O.make_schedule(cfg, 100)
    assert float(fn(0)) == pytest.approx(1.0)
    assert float(fn(25)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), abs=1e-6)
    # wsd whose decay window would overlap warmup starts decaying right after warmup.
    wsd = O.make_schedule(_cfg(schedule="wsd", warmup_steps=90, decay_fraction=0.5), 100)
    assert float(wsd(90)) == pytest.approx(1.0) and float(wsd(100)) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- masks


def _param_tree(layers: int = 2, d: int = 4) -> dict:
    return {
        "params": {
            "embed": {"embedding": jnp.ones((16, d))},
            "pos_embed": {"embedding": jnp.ones((8, d))},
            "layers": {
                "attn": {"q": {"kernel": jnp.ones((layers, d, 2, 2)), "bias": jnp.ones((layers, 2, 2))}},
                "ln": {"scale": jnp.ones((layers, d)), "bias": jnp.zeros((layers, d))},
            },
            "lm_head": {"kernel": jnp.ones((d, 16))},
        }
    }


_HAND_ROLES = {"kernel": "matrix", "scale": "norm", "bias": "bias", "embedding": "embedding"}


def _roles(tree) -> dict:
    """Roles of a hand-written test tree, by leaf name (the models derive them from logical axes)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _HAND_ROLES[path[-1].key], tree)


def test_weight_decay_mask() -> None:
    roles = _roles(_param_tree())
    roles["params"]["lm_head"]["kernel"] = "head"
    m = decay_mask(roles, decay_embeddings=False)["params"]
    assert m["layers"]["attn"]["q"]["kernel"] and m["lm_head"]["kernel"]
    assert not m["layers"]["attn"]["q"]["bias"] and not m["layers"]["ln"]["scale"] and not m["layers"]["ln"]["bias"]
    assert not m["embed"]["embedding"] and not m["pos_embed"]["embedding"]
    m = decay_mask(roles, decay_embeddings=True)["params"]
    assert m["embed"]["embedding"] and m["pos_embed"]["embedding"] and not m["layers"]["ln"]["scale"]


# ----------------------------------------------------------------------------- optimizers


def _quadratic_params() -> dict:
    k = jax.random.split(jax.random.key(0), 2)
    return {"w": {"kernel": jax.random.normal(k[0], (8, 8))}, "n": {"scale": 1.0 + jax.random.normal(k[1], (8,))}}


def _run(tx: optax.GradientTransformation, params: dict, steps: int) -> tuple[float, float]:
    def loss_fn(p):
        return sum(jnp.sum((x - 0.5) ** 2) for x in jax.tree_util.tree_leaves(p))

    @jax.jit
    def step(p, s):
        g = jax.grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    start = float(loss_fn(params))
    for _ in range(steps):
        params, state = step(params, state)
    return start, float(loss_fn(params))


@pytest.mark.parametrize("name, lr", [("adamw", 0.05), ("adafactor", 0.1), ("lion", 0.02), ("sgd", 0.05)])
def test_optimizers_reduce_quadratic(name: str, lr: float) -> None:
    cfg = _cfg(name=name, lr=lr, warmup_steps=2, schedule="constant", weight_decay=0.01, clip_norm=1.0)
    start, end = _run(O.make_optimizer(cfg, 100, _roles(_quadratic_params())), _quadratic_params(), steps=40)
    assert end < 0.5 * start, (name, start, end)


def test_sgd_is_exact() -> None:
    cfg = _cfg(name="sgd", lr=0.5, warmup_steps=0, schedule="constant", b1=0.9)
    p = {"w": {"kernel": jnp.zeros(3)}}
    tx = O.make_optimizer(cfg, 10, _roles(p))
    g1, g2 = {"w": {"kernel": jnp.array([1.0, 2.0, 3.0])}}, {"w": {"kernel": jnp.array([1.0, 0.0, -1.0])}}
    s = tx.init(p)
    u1, s = tx.update(g1, s, p)
    u2, s = tx.update(g2, s, p)
    np.testing.assert_allclose(u1["w"]["kernel"], -0.5 * g1["w"]["kernel"], rtol=1e-6)
    np.testing.assert_allclose(u2["w"]["kernel"], -0.5 * (g2["w"]["kernel"] + 0.9 * g1["w"]["kernel"]), rtol=1e-6)


def test_adamw_decay_is_masked() -> None:
    cfg = _cfg(name="adamw", lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5)
    params = _param_tree()
    tx = O.make_optimizer(cfg, 10, _roles(params))
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    u, _ = tx.update(zeros, tx.init(params), params)
    u = u["params"]
    np.testing.assert_allclose(u["layers"]["attn"]["q"]["kernel"], -0.05, rtol=1e-6)  # -lr * wd * 1
    for leaf in (u["layers"]["ln"]["scale"], u["layers"]["attn"]["q"]["bias"], u["embed"]["embedding"]):
        np.testing.assert_allclose(leaf, 0.0)


def test_adafactor_matches_optax_without_decay_and_decays_kernels() -> None:
    params = {"w": {"kernel": jnp.linspace(-1.0, 1.0, 32).reshape(4, 8)}, "n": {"scale": jnp.linspace(0.5, 1.5, 8)}}
    grads = jax.tree_util.tree_map(lambda x: jnp.cos(3 * x), params)
    cfg = _cfg(name="adafactor", lr=0.01, warmup_steps=0, schedule="constant")
    ours, ref = O.make_optimizer(cfg, 10, _roles(params)), optax.adafactor(learning_rate=0.01)
    u, _ = ours.update(grads, ours.init(params), params)
    r, _ = ref.update(grads, ref.init(params), params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), u, r)
    decayed = O.make_optimizer(dataclasses.replace(cfg, weight_decay=0.1), 10, _roles(params))
    d, _ = decayed.update(grads, decayed.init(params), params)
    np.testing.assert_allclose(d["n"]["scale"], u["n"]["scale"])
    np.testing.assert_allclose(d["w"]["kernel"], u["w"]["kernel"] - 0.01 * 0.1 * params["w"]["kernel"], rtol=1e-5)


def test_clipping_bounds_update() -> None:
    params = {"w": {"kernel": jnp.zeros((4, 4))}}
    grads = {"w": {"kernel": jnp.full((4, 4), 100.0)}}
    sgd = dict(name="sgd", b1=0.0, warmup_steps=0, schedule="constant")
    clipped = O.make_optimizer(_cfg(**sgd, clip_norm=1.0), 10, _roles(params))
    u, _ = clipped.update(grads, clipped.init(params), params)
    assert float(optax.tree.norm(u)) == pytest.approx(1.0, rel=1e-5)
    free = O.make_optimizer(_cfg(**sgd, clip_norm=0.0), 10, _roles(params))
    u, _ = free.update(grads, free.init(params), params)
    assert float(optax.tree.norm(u)) == pytest.approx(400.0, rel=1e-5)


# ----------------------------------------------------------------------------- opt-state shardings


def _sharding_setup() -> tuple[dict, dict]:
    params = {
        "params": {
            "layers": {"mlp": {"wi_0": {"kernel": jax.ShapeDtypeStruct((2, 128, 256), jnp.float32)}}},
            "norm": {"scale": jax.ShapeDtypeStruct((128,), jnp.float32)},
        }
    }
    shardings = {"params": {"layers": {"mlp": {"wi_0": {"kernel": "S_KERNEL"}}}, "norm": {"scale": "S_SCALE"}}}
    return params, shardings


def _leaves_by_path(tree) -> dict[str, object]:
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "sgd"])
def test_opt_state_shardings(name: str) -> None:
    params, shardings = _sharding_setup()
    tx = O.make_optimizer(_cfg(name=name, weight_decay=0.1, clip_norm=1.0), 100, _roles(params))
    state_shapes = jax.eval_shape(tx.init, params)
    out = O.opt_state_shardings(state_shapes, shardings, params, "REPL")
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(state_shapes)
    got = _leaves_by_path(out)
    shapes = _leaves_by_path(state_shapes)
    for path, s in got.items():
        shape = shapes[path].shape
        if path.endswith("['kernel']") and shape == (2, 128, 256):
            assert s == "S_KERNEL", path
        elif path.endswith("['scale']") and shape == (128,):
            assert s == "S_SCALE", path
        else:
            assert s == "REPL", path
    kernel_hits = [p for p, s in got.items() if s == "S_KERNEL"]
    if name == "adamw":
        assert any(".mu" in p for p in kernel_hits) and any(".nu" in p for p in kernel_hits)
        assert all(s == "REPL" for p, s in got.items() if "count" in p)
    if name == "adafactor":  # factored: row/col vectors replicated, kernel has no full-size state
        assert not kernel_hits
        assert any(".v_row" in p for p in got) and all(s == "REPL" for p, s in got.items() if ".v_row" in p)
        assert any(s == "S_SCALE" for p, s in got.items() if ".v" in p)  # unfactored 1-D scale
    if name in ("lion", "sgd"):
        assert kernel_hits


def test_opt_state_shardings_inject_hyperparams_and_named_shardings() -> None:
    mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
    params = {"params": {"w": {"kernel": jnp.ones((4, 8))}, "n": {"scale": jnp.ones((8,))}}}
    kernel_sh = NamedSharding(mesh, PartitionSpec("fsdp", None))
    repl = NamedSharding(mesh, PartitionSpec())
    shardings = {"params": {"w": {"kernel": kernel_sh}, "n": {"scale": repl}}}
    tx = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3)
    shapes = jax.eval_shape(tx.init, params)
    out = O.opt_state_shardings(shapes, shardings, jax.eval_shape(lambda: params), repl)
    assert out.inner_state[0].mu["params"]["w"]["kernel"] is kernel_sh
    assert out.hyperparams["learning_rate"] is repl and out.count is repl
    state = jax.jit(tx.init, out_shardings=out)(params)  # the shardings are usable
    assert state.inner_state[0].nu["params"]["w"]["kernel"].sharding == kernel_sh


# ----------------------------------------------------------------------------- sizes and FLOPs


def _hand_shapes(m: ModelConfig) -> dict:
    """Abstract params following the model's conventions, written out by hand."""
    L, d, H, K, h, F, V = m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.resolved_head_dim, m.d_ff, m.vocab_size
    s = jax.ShapeDtypeStruct
    mlp = {"wi_0": {"kernel": s((L, d, F), jnp.float32)}, "wo": {"kernel": s((L, F, d), jnp.float32)}}
    if m.mlp in ("swiglu", "geglu"):
        mlp["wi_1"] = {"kernel": s((L, d, F), jnp.float32)}
    layers = {
        "attn": {
            "q": {"kernel": s((L, d, H, h), jnp.float32)},
            "k": {"kernel": s((L, d, K, h), jnp.float32)},
            "v": {"kernel": s((L, d, K, h), jnp.float32)},
            "o": {"kernel": s((L, H, h, d), jnp.float32)},
        },
        "mlp": mlp,
        "ln_1": {"scale": s((L, d), jnp.float32)},
        "ln_2": {"scale": s((L, d), jnp.float32)},
    }
    params = {"embed": {"embedding": s((V, d), jnp.float32)}, "layers": layers}
    params["final_norm"] = {"scale": s((d,), jnp.float32)}
    if m.position == "learned":
        params["pos_embed"] = {"embedding": s((m.max_seq_len, d), jnp.float32)}
    if not m.tie_embeddings:
        params["lm_head"] = {"kernel": s((d, V), jnp.float32)}
    return {"params": params}


def _hand_matmul_params(tree: dict, tied: bool) -> int:
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path)
        if name.endswith("['kernel']") or (tied and "['embed']" in name):
            total += math.prod(leaf.shape)
    return total


@pytest.mark.parametrize(
    "model",
    [
        ModelConfig(vocab_size=96, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=80, mlp="swiglu"),
        ModelConfig(
            vocab_size=64,
            d_model=24,
            n_layers=2,
            n_heads=3,
            n_kv_heads=3,
            head_dim=16,
            d_ff=48,
            mlp="gelu",
            tie_embeddings=True,
            position="learned",
            max_seq_len=40,
        ),
    ],
)
def test_flops_and_param_counts_match_hand_count(model: ModelConfig) -> None:
    tree = _hand_shapes(model)
    n_matmul = _hand_matmul_params(tree, model.tie_embeddings)
    assert M.matmul_params(model) == n_matmul
    T = 32
    attention = 6 * 2 * model.n_layers * model.n_heads * model.resolved_head_dim * T
    assert M.flops_per_token(model, T) == 6 * n_matmul + attention
    real = model_abstract_params(model)
    counts = M.param_counts(real.shapes, real.logical, model)
    total = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))
    positions = model.max_seq_len if model.position == "learned" else 0
    embeddings = (model.vocab_size + positions) * model.d_model
    assert counts == {"total": total, "non_embedding": total - embeddings, "active": total}
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape), real.shapes)
    assert M.param_counts(zeros, real.logical) == counts


# ----------------------------------------------------------------------------- peak FLOP/s and MFU


def _dev(kind: str, platform: str = "gpu") -> SimpleNamespace:
    return SimpleNamespace(device_kind=kind, platform=platform)


@pytest.mark.parametrize(
    "kind, flops",
    [
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5p", 459e12),
        ("TPU v5", 459e12),
        ("TPU v6 lite", 918e12),
        ("TPU v6e", 918e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("nvidia h100 pcie", 756e12),
    ],
)
def test_peak_table(kind: str, flops: float) -> None:
    assert M.lookup_peak(kind)[0] == flops
    total, desc = M.peak_flops([_dev(kind, "tpu" if "TPU" in kind else "gpu")] * 4, "bfloat16")
    assert total == 4 * flops and desc


def test_unknown_device_and_mfu() -> None:
    total, desc = M.peak_flops([_dev("NVIDIA A100-SXM4-40GB"), _dev("Mystery Accelerator 9000")], "bfloat16")
    assert total == 0.0 and desc.startswith("unknown device kind")
    assert M.mfu(1000.0, 6e9, 0.0) is None
    assert M.mfu(1000.0, 6e9, 12e12) == pytest.approx(0.5)


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch) -> None:
    calls = []
    real = M.measure_matmul_flops

    def measure(dtype: str) -> float:
        calls.append(dtype)
        return real(dtype, n=512, seconds=0.1)

    monkeypatch.setattr(peak, "measure_matmul_flops", measure)
    monkeypatch.setattr(peak, "others_cpu_share", lambda fn: (fn(), 0.02))  # a quiet machine
    cpus = [_dev("cpu", "cpu")] * 8  # virtual devices share the cores: counted once
    first, desc1 = M.peak_flops(cpus, "float32", str(tmp_path))
    second, desc2 = M.peak_flops(cpus, "float32", str(tmp_path))
    assert calls == ["float32"] and first == second > 1e8
    assert "measured now" in desc1 and "cached" in desc2
    data = json.loads((tmp_path / "cpu_peak_flops.json").read_text())
    (key,) = data
    assert "float32" in key and jax.__version__ in key and M.cpu_model_name() in key
    monkeypatch.setenv("LLMJAX_CACHE", str(tmp_path))
    assert M.peak_flops(cpus, "float32", None)[0] == first and calls == ["float32"]


def test_cpu_peak_under_load_is_measured_again_and_marked_unreliable(tmp_path, monkeypatch) -> None:
    figures = iter([5e10, 4e10, 2e11, 1e11])  # slow (busy), slower (busier), fast (quiet), never reached
    shares = iter([0.6, 0.7, 0.01])
    monkeypatch.setattr(peak, "measure_matmul_flops", lambda dtype: next(figures))
    monkeypatch.setattr(peak, "others_cpu_share", lambda fn: (fn(), next(shares)))
    cpus = [_dev("cpu", "cpu")]
    flops, source, reliable = peak.peak_info(cpus, "float32", str(tmp_path))
    assert (flops, reliable) == (5e10, False) and "under load" in source and "60%" in source
    flops, source, reliable = peak.peak_info(cpus, "float32", str(tmp_path))
    assert (flops, reliable) == (5e10, False)  # measured again; the fastest figure so far is kept
    flops, source, reliable = peak.peak_info(cpus, "float32", str(tmp_path))
    assert (flops, reliable) == (2e11, True) and "measured now" in source
    flops, source, reliable = peak.peak_info(cpus, "float32", str(tmp_path))
    assert (flops, reliable) == (2e11, True) and "cached" in source  # quiet figure: not measured again


@pytest.mark.slow
def test_others_cpu_share_sees_a_busy_neighbour() -> None:
    """A process spinning on every one of our CPUs while we sleep: most of their time is someone else's."""
    import multiprocessing
    import os

    n = len(os.sched_getaffinity(0))
    ctx = multiprocessing.get_context("spawn")
    spinners = [ctx.Process(target=_spin, args=(1.5,)) for _ in range(n)]
    for p in spinners:
        p.start()
    time.sleep(0.3)
    _, busy = peak.others_cpu_share(lambda: time.sleep(0.5))
    for p in spinners:
        p.join()
    assert busy is not None and busy > 0.5, busy


def _spin(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


# ----------------------------------------------------------------------------- writers, progress, memory


def test_metrics_writer_appends_and_writes_tensorboard(tmp_path) -> None:
    w = M.MetricsWriter(tmp_path, enabled=True, tensorboard=True)
    w.write(1, {"loss": np.float32(2.5), "lr": 1e-3, "note": "x"})
    w.close()
    w = M.MetricsWriter(tmp_path, enabled=True, tensorboard=True)
    w.write(2, {"loss": jnp.float32(2.0)})
    w.write(2, {"eval_loss": 2.2}, kind="eval")
    with pytest.raises(ValueError, match="loss"):
        w.write(3, {"accuracy": 1.0})
    w.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("eval", 2)]
    assert records[0]["loss"] == 2.5 and records[2]["eval_loss"] == 2.2 and all("time" in r for r in records)
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_metrics_writer_disabled(tmp_path) -> None:
    w = M.MetricsWriter(tmp_path / "run", enabled=False, tensorboard=True)
    w.write(1, {"loss": 1.0})
    w.close()
    assert not (tmp_path / "run").exists()


def test_progress_bar_plain_lines(capsys) -> None:
    bar = M.ProgressBar(total_steps=6, initial_step=0, enabled=True, log_every=3, tty=False)
    for step in range(1, 7):
        bar.update(step, loss=1.0 / step, tokens_per_s=1234.0, mfu=None if step < 6 else 0.25, lr=1e-3)
    bar.write("eval done")
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("step 3/6") and "MFU n/a" in lines[0]
    assert "MFU 25.0%" in lines[1] and "ETA" in lines[1] and lines[2] == "eval done"
    tty_bar = M.ProgressBar(total_steps=4, initial_step=1, enabled=True, tty=True)
    tty_bar.update(2, 1.0, 10.0, 0.1, 1e-3)
    tty_bar.close()


def test_memory_summary() -> None:
    compiled = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0)).lower(jnp.ones((256, 128))).compile()
    text = M.memory_summary(compiled)
    assert "arguments 0.1" in text and "total" in text, text
    assert "not available" in M.memory_summary(SimpleNamespace(memory_analysis=lambda: None))
    assert "not available" in M.memory_summary(SimpleNamespace(memory_analysis=lambda: object()))
    assert "arguments 1.0" in M.memory_summary(
        SimpleNamespace(memory_analysis=lambda: SimpleNamespace(argument_size_in_bytes=2**20))
    )


def test_progress_bar_fits_narrow_terminals() -> None:
    """At every width the line fits; the bar is either at least MIN_BAR wide or left out, never a sliver; the
    least important fields go first."""
    from tqdm import tqdm

    from llmjax.train.telemetry import progress as P

    variants = P.stats_variants(3.21234, 3.3, 2345.0, 0.45, 3e-3)
    seen = []
    for width in range(20, 200, 3):
        line = tqdm.format_meter(37, 600, 12.3, ncols=width, bar_format=P.bar_layout(width, variants))
        assert len(line) <= width, (width, line)
        bar = line.split("|")[1] if line.count("|") >= 2 else ""
        assert bar == "" or len(bar) >= P.MIN_BAR, (width, line)
        seen.append(line)
    assert "lr 3.00e-03" in seen[-1] and "MFU 45.0%" in seen[-1] and "(avg 3.3000)" in seen[-1]
    at80 = tqdm.format_meter(37, 600, 12.3, ncols=80, bar_format=P.bar_layout(80, variants))
    assert "loss 3.2123 (avg 3.3000)" in at80 and "lr" not in at80
    assert "loss 3.300" in tqdm.format_meter(37, 600, 12.3, ncols=40, bar_format=P.bar_layout(40, variants))


def test_progress_bar_smoothed_loss(capsys) -> None:
    bar = M.ProgressBar(total_steps=40, enabled=True, log_every=40, tty=False, mfu_mark="?")
    for step in range(1, 41):
        bar.update(step, loss=2.0 + (1.0 if step % 2 else -1.0), tokens_per_s=1.0, mfu=0.5, lr=1e-3)
    line = capsys.readouterr().out.strip()
    avg = float(line.split("(avg ")[1].split(")")[0])
    assert abs(avg - 2.0) < 0.1  # the noisy step loss (1 or 3) averages out
    assert "MFU 50.0%?" in line  # an unreliable peak is marked
    assert bar.smoothed(float("nan")) != bar.smoothed(float("nan"))  # a NaN is shown, not averaged away
