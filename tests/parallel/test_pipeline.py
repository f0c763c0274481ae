"""Pipeline parallelism: every pipelined layout (GPipe and circular, dense and MoE, combined with
data/fsdp/tensor, remat, scanned or looped units) equals the single-device unpipelined computation
(float32, rtol 1e-5, 8 virtual CPU devices); the schedule lowers to collective-permutes with the
parameters kept in the stacked layout; checkpoints move between pipelined and unpipelined
layouts; bad pipeline settings are usage errors (exit 2)."""

from __future__ import annotations

import collections
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import RTOL, assert_trees_close, packed_batch, tiny_config, tiny_train_overrides
from jax.sharding import PartitionSpec as P

from llmjax.config import ConfigError, validate
from llmjax.parallel.pipeline import Schedule
from llmjax.train.setup import build_setup
from llmjax.train.telemetry.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
DENSE = ("model.n_layers=4",)
MOE = ("model.n_layers=4", "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.aux_loss_weight=0.1",
       "model.moe.z_loss_weight=0.01")

DENSE_LAYOUTS = {
    "pipe2_data4": ("mesh.pipeline=2", "mesh.data=4"),
    "pipe4_data2_micro2": ("mesh.pipeline=4", "mesh.data=2", "pipeline.microbatches=2"),
    "pipe2_data2_tensor2_micro4": ("mesh.pipeline=2", "mesh.data=2", "mesh.tensor=2", "pipeline.microbatches=4"),
    "circular_pipe2_data2_tensor2_scanned_remat": (
        "mesh.pipeline=2", "mesh.data=2", "mesh.tensor=2", "pipeline.microbatches=2", "pipeline.repeats=2",
        "model.scan_layers=true", "model.remat=full"),
    "pipe2_fsdp4_micro2_remat": ("mesh.pipeline=2", "mesh.data=1", "mesh.fsdp=4", "pipeline.microbatches=2",
                                 "model.remat=dots"),
}
MOE_LAYOUTS = {
    "moe_pipe2_data4_micro2": ("mesh.pipeline=2", "mesh.data=4", "pipeline.microbatches=2"),
    # experts split over `expert` (all-to-all in shard_map, under the stage vmap) inside pipeline stages
    "moe_pipe2_expert2_data2_micro2": ("mesh.pipeline=2", "mesh.expert=2", "mesh.data=2", "pipeline.microbatches=2"),
    "moe_circular_pipe2_data2_tensor2_scanned": (
        "mesh.pipeline=2", "mesh.data=2", "mesh.tensor=2", "pipeline.microbatches=2", "pipeline.repeats=2",
        "model.scan_layers=true"),
}


def run(cfg, devices):
    """Gradients and metrics at step 0, and the metrics of STEPS optimizer steps on one fixed batch."""
    setup = build_setup(cfg, devices)
    state = setup.init_state()
    batch = setup.put_batch(packed_batch(cfg, seed=0))
    grads, metrics0 = jax.device_get(setup.jit_gradients()(state.params, batch))
    step = setup.jit_train_step()
    history = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        history.append({k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0})
    return grads, metrics0, history


@pytest.fixture(scope="module")
def dense_reference():
    return run(tiny_config(*DENSE), jax.devices()[:1])


@pytest.fixture(scope="module")
def moe_reference():
    return run(tiny_config(*MOE), jax.devices()[:1])


def check_matches(result, reference):
    grads, metrics0, history = result
    ref_grads, ref_metrics0, ref_history = reference
    np.testing.assert_allclose([h["loss"] for h in history], [h["loss"] for h in ref_history], rtol=RTOL)
    assert history[-1]["loss"] < history[0]["loss"]  # it trains
    assert_trees_close(grads, ref_grads)
    assert set(metrics0) == set(ref_metrics0)
    for k in ref_metrics0:  # MoE router statistics too (per layer, per expert)
        np.testing.assert_allclose(metrics0[k], ref_metrics0[k], rtol=RTOL, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("layout", [name if name == "pipe2_data4" else pytest.param(name, marks=pytest.mark.slow)
                                    for name in DENSE_LAYOUTS])  # the quick run keeps one; each takes 30-50 s cold
def test_dense_layout_matches_single_device(layout, dense_reference):
    assert jax.device_count() == 8
    cfg = tiny_config(*DENSE, *DENSE_LAYOUTS[layout])
    validate(cfg, 8)
    check_matches(run(cfg, jax.devices()), dense_reference)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(MOE_LAYOUTS))
def test_moe_layout_matches_single_device(layout, moe_reference):
    cfg = tiny_config(*MOE, *MOE_LAYOUTS[layout])
    validate(cfg, 8)
    result = run(cfg, jax.devices())
    check_matches(result, moe_reference)
    assert result[1]["moe_aux_loss"] > 0.5  # the load-balancing loss is on (and merged over microbatches)


@pytest.mark.slow
def test_capacity_moe_drops_the_same_through_microbatches():
    """Capacity groups are sequences, so microbatching drops exactly the same assignments."""
    capped = (*MOE, "model.moe.capacity_factor=0.5")
    result = run(tiny_config(*capped, "mesh.pipeline=2", "mesh.data=4", "pipeline.microbatches=2"), jax.devices())
    reference = run(tiny_config(*capped), jax.devices()[:1])
    check_matches(result, reference)
    assert reference[1]["moe_dropped_fraction"] > 0.05


def test_schedule_bubble_and_description():
    s = Schedule(stages=4, microbatches=8, repeats=2)
    assert s.iterations == 2 * 8 + 4 - 1
    assert s.bubble == pytest.approx(3 / 19)
    assert Schedule(2).bubble == pytest.approx(1 / 2)
    text = s.describe()
    assert "4 stages" in text and "2 repeats" in text and "8 microbatches" in text and "15.8%" in text


def collectives(compiled_text: str) -> collections.Counter:
    """Collective ops of a compiled HLO module by kind; gathers of the (vocab-split) embedding table,
    which every tensor-parallel layout has, are counted apart as "embed all-gather"."""
    ops: collections.Counter = collections.Counter()
    for line in compiled_text.splitlines():
        m = re.search(r" (all-gather|collective-permute|all-reduce|all-to-all|reduce-scatter)(?:-start)?\(", line)
        if m:
            embed = m.group(1) == "all-gather" and "/embed/" in line
            ops["embed all-gather" if embed else m.group(1)] += 1
    return ops


@pytest.mark.slow
def test_params_stay_stacked_and_split_over_stages():
    cfg = tiny_config(*DENSE, "mesh.pipeline=2", "mesh.data=2", "mesh.tensor=2", "pipeline.microbatches=2")
    setup = build_setup(cfg)
    flat = build_setup(tiny_config(*DENSE), jax.devices()[:1])
    # The same tree and shapes as the unpipelined model: checkpoints are layout-independent.
    assert jax.tree.structure(setup.abstract_state.params) == jax.tree.structure(flat.abstract_state.params)
    assert jax.tree.map(lambda s: s.shape, setup.abstract_state.params) == \
        jax.tree.map(lambda s: s.shape, flat.abstract_state.params)
    q = setup.abstract_state.params["layers"]["attn"]["q"]["kernel"]  # [layers, embed, heads, head_dim]
    assert q.sharding.spec == P("pipeline", "fsdp", "tensor", None)
    state = setup.init_state()
    shard = state.params["layers"]["attn"]["q"]["kernel"].addressable_shards[0]
    assert shard.data.shape == (2, 64, 2, 16)  # stage 0 holds layers 0-1 (R=1: a free reshape)
    assert shard.index[0] == slice(0, 2)
    assert state.params["embed"]["embedding"].sharding.spec[0] != "pipeline"
    # The schedule moves activations with collective-permutes; R=1 moves no parameters between stages.
    hlo = setup.jit_gradients().lower(setup.abstract_state.params, setup.abstract_batch()).compile().as_text()
    ops = collectives(hlo)
    assert ops["collective-permute"] >= 2, ops  # forward and backward shifts
    assert ops["all-to-all"] == 0 and ops["all-gather"] == 0, ops


@pytest.mark.slow
def test_pipelined_model_decodes_unpipelined():
    """Batch-1 decoding (the end-of-training sample) runs the same params without the schedule."""
    cfg = tiny_config(*DENSE, "mesh.pipeline=2", "mesh.data=4", "pipeline.microbatches=2")
    setup = build_setup(cfg)
    assert setup.schedule == Schedule(2, 2, 1)
    assert setup.decode_model.pipeline is None and setup.decode_model.cfg == setup.model.cfg
    params = setup.init_state().params
    tokens = packed_batch(cfg)["inputs"]
    from llmjax.parallel.rules import use_sharding

    with use_sharding(setup.mesh, setup.rules):
        piped = jax.jit(lambda p, t: setup.model.apply({"params": p}, t))(params, tokens)
    plain = jax.jit(lambda p, t: setup.decode_model.apply({"params": p}, t))(params, tokens)
    np.testing.assert_allclose(piped, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_memory_per_device_falls_as_stages_grow():
    """XLA's per-device estimate for the train step, at a fixed per-device batch (data=2, 2 x S devices):
    parameters and optimizer state split over the stages, saved activations over their layers."""
    totals, arguments = [], []
    for stages, micro in ((1, 1), (2, 4), (4, 4)):
        piped = [f"mesh.pipeline={stages}", f"pipeline.microbatches={micro}"] if stages > 1 else []
        cfg = tiny_config("model.n_layers=8", "model.d_model=128", "model.d_ff=512", "model.vocab_size=256",
                          "mesh.data=2", *piped)
        setup = build_setup(cfg, jax.devices()[:2 * stages])
        m = setup.jit_train_step().lower(setup.abstract_state, setup.abstract_batch()).compile().memory_analysis()
        arguments.append(m.argument_size_in_bytes)
        totals.append(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                      - m.alias_size_in_bytes)
    assert arguments[1] < 0.6 * arguments[0] and arguments[2] < 0.6 * arguments[1], arguments
    assert totals[0] > totals[1] > totals[2], totals


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("overrides, keys", [
    (["mesh.pipeline=4", "mesh.data=2", "model.n_layers=2"], ["model.n_layers=2", "mesh.pipeline", "4 x 1"]),
    (["mesh.pipeline=2", "mesh.data=4", "model.n_layers=4", "pipeline.repeats=4", "pipeline.microbatches=2"],
     ["model.n_layers=4", "2 x 4"]),
    (["mesh.pipeline=2", "mesh.data=4", "pipeline.microbatches=4"], ["pipeline.microbatches=4", "per-replica batch 2"]),
    (["mesh.pipeline=2", "mesh.data=2", "model.n_layers=4", "pipeline.repeats=2", "mesh.tensor=2"],
     ["pipeline.repeats=2", "pipeline.microbatches >= mesh.pipeline"]),
])
def test_bad_pipeline_settings_name_the_keys(overrides, keys):
    cfg = tiny_config(*overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, 8)
    for key in keys:
        assert key in str(e.value), str(e.value)


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmjax.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("verb, overrides, needle", [
    ("train", ["mesh.pipeline=4", "mesh.data=2"], "model.n_layers=2 is not divisible by mesh.pipeline"),
    ("train", ["mesh.pipeline=2", "mesh.data=4", "pipeline.microbatches=4"], "pipeline.microbatches=4"),
    ("bench", ["mesh.pipeline=2", "mesh.data=4", "pipeline.microbatches=3"], "pipeline.microbatches=3"),
])
def test_cli_exits_2_before_compiling(corpus, tmp_path, verb, overrides, needle):
    where = ["--workdir", str(tmp_path / "run")] if verb == "train" else []
    r = run_cli(verb, *where, *tiny_train_overrides(corpus), f"data.cache_dir={tmp_path / 'cache'}", *overrides)
    assert r.returncode == 2, r.stderr
    assert "llmjax: error:" in r.stderr and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- checkpoints across layouts


@pytest.mark.slow
def test_checkpoint_moves_from_pipelined_to_unpipelined(corpus, tmp_path):
    """Train pipelined (circular, 2 stages x 2 repeats) with checkpoints, rewind to step 4 and resume on
    the plain data-parallel layout: the loss curve continues as the pipelined run went on."""
    steps = ("train.steps=8", "checkpoint.every_steps=4", "checkpoint.keep=10", "eval.every_steps=4",
             "model.n_layers=4", "sample.max_new_tokens=2")
    piped = ("mesh.pipeline=2", "mesh.data=2", "mesh.tensor=2", "pipeline.microbatches=2", "pipeline.repeats=2")
    train = ("train", "--workdir", str(tmp_path), *tiny_train_overrides(corpus), *steps)
    first = run_cli(*train, *piped)
    assert first.returncode == 0, first.stderr
    assert "pipeline: 2 stages (circular, 2 repeats), 2 microbatches, 5 iterations" in first.stderr
    assert "bubble (S-1)/(R*M+S-1) = 1/5 = 20.0%" in first.stderr
    assert "--- sample (greedy) ---" in first.stdout  # decoding runs unpipelined over the same params
    reference = {k: r["loss"] for k, r in read_metrics(tmp_path / "metrics.jsonl").items()}
    ckpts = tmp_path / "checkpoints"
    (ckpts / "8").rename(tmp_path / "later")
    second = run_cli(*train, "mesh.data=8")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and "/4" in second.stderr and "pipeline:" not in second.stderr
    after = {k: r["loss"] for k, r in read_metrics(tmp_path / "metrics.jsonl").items()}
    np.testing.assert_allclose([after[s] for s in range(4, 8)], [reference[s] for s in range(4, 8)], rtol=2e-5)
