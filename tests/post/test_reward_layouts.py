"""Reward-model steps on one batch of preference pairs: the loss and gradients (decoder and `score` head) under
{data=2, fsdp=2, tensor=2} and {fsdp=4} equal one device (rtol 1e-5); with LoRA the head is trained whole next to
the adapters while the base stays as it was."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import assert_trees_close, tiny_config

from llmjax.post.dpo import PreferenceBatch
from llmjax.train.setup import build_setup

REWARD = ["train.objective=reward", "data.seq_len=16", "eval.every_steps=0", "model.n_layers=1"]


def pairs(cfg) -> dict[str, np.ndarray]:
    """8 pairs of random conversations of 6-16 tokens, one of them padding (weight 0)."""
    rng = np.random.default_rng(0)
    B, L = cfg.train.batch_size, cfg.data.seq_len
    f: dict[str, np.ndarray] = {}
    for side in ("chosen", "rejected"):
        n = rng.integers(6, L + 1, B)
        seg = (np.arange(L)[None] < n[:, None]).astype(np.int32)
        f[f"{side}_inputs"] = (rng.integers(1, cfg.model.vocab_size, (B, L)) * seg).astype(np.int32)
        f[f"{side}_targets"] = np.zeros((B, L), np.int32)
        f[f"{side}_segment_ids"] = seg
        f[f"{side}_positions"] = np.where(seg > 0, np.arange(L)[None], 0).astype(np.int32)
        f[f"{side}_weights"] = np.zeros((B, L), np.float32)
    f["weights"] = np.array([[1]] * (B - 1) + [[0]], np.float32)
    f["ref_chosen"] = f["ref_rejected"] = np.zeros((B, 1), np.float32)
    assert set(f) == set(PreferenceBatch.FIELDS)
    return f


def step(layout: tuple[str, ...], devices):
    cfg = tiny_config(*REWARD, *layout)
    setup = build_setup(cfg, devices)
    state = setup.init_state()
    grads, metrics = setup.jit_gradients()(state.params, setup.put_batch(pairs(cfg)))
    return jax.device_get(grads), {k: float(v) for k, v in metrics.items()}


@pytest.fixture(scope="module")
def reference():
    return step(("mesh.data=1",), jax.devices()[:1])


@pytest.mark.parametrize("layout,n", [
    pytest.param(("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"), 8, marks=pytest.mark.slow),
    pytest.param(("mesh.data=1", "mesh.fsdp=4"), 4, marks=pytest.mark.slow)])
def test_reward_step_matches_single_device(layout, n, reference):
    grads, metrics = step(layout, jax.devices()[:n])
    ref_grads, ref_metrics = reference
    assert np.abs(ref_grads["score"]).max() > 0  # the head is trained
    for k in ("loss", "accuracy", "reward_chosen", "reward_rejected_std"):
        assert metrics[k] == pytest.approx(ref_metrics[k], rel=1e-5, abs=1e-6), k
    assert_trees_close(grads, ref_grads)


@pytest.mark.slow
def test_lora_trains_the_score_head_and_not_the_base():
    cfg = tiny_config(*REWARD, "lora.rank=4", "lora.targets=[q,v]")
    setup = build_setup(cfg, jax.devices()[:1])
    state = setup.init_state()
    base, start = jax.device_get(state.frozen), jax.device_get(state.params)
    assert set(start) == {"layers", "score"}  # the adapters and the head
    np.testing.assert_array_equal(start["score"], base["score"])  # the head starts as the base's
    step, batch = setup.jit_train_step(), setup.put_batch(pairs(cfg))
    for _ in range(2):
        state, _ = step(state, batch)
    after = jax.device_get(state)
    assert np.abs(after.params["score"] - start["score"]).max() > 1e-4  # the head trained
    assert np.abs(after.params["layers"]["attn"]["q"]["kernel"]["b"]).max() > 0  # so were the adapters
    jax.tree.map(np.testing.assert_array_equal, after.frozen, base)  # the base did not move
