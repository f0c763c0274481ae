"""A GRPO step and a PPO step under {data=2, fsdp=2, tensor=2} and {fsdp=4} equal one device: the same rollouts
from the same seed (sampled on the decode engine under each mesh), the same rewards and log-probabilities (and
PPO's values, advantages and returns), the same loss and gradients (rtol 1e-5); for PPO also the parameters' movement
over the step's epochs x minibatches of updates, the minibatches gathered from the sharded batch (to 1e-3 of the
largest possible movement)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from helpers import assert_trees_close, tiny_config

from llmjax.post.rl.ppo import PPORollouts
from llmjax.post.rl.rollout import PromptData, Rollouts
from llmjax.train.setup import build_setup

DATA = Path(__file__).resolve().parents[2] / "experiments" / "data"
GRPO = ["model.vocab_size=512", "model.max_seq_len=64", f"data.tokenizer={DATA / 'chat_tokenizer'}",
        "train.objective=grpo", f"rl.prompts={DATA / 'rl_tasks.jsonl'}", "rl.reward_fn=grpo_test_rewards:length",
        "rl.samples_per_prompt=4", "rl.max_new_tokens=6", "data.seq_len=48", "train.batch_size=8",
        "eval.every_steps=0", "data.validation_fraction=0.2"]
PPO = [*GRPO, "train.objective=ppo", "rl.samples_per_prompt=2", "rl.minibatches=2", "rl.ppo_epochs=2",
       "rl.kl_target=0.05", "optim.lr=1e-3"]
SOURCES = {"grpo": (GRPO, Rollouts), "ppo": (PPO, PPORollouts)}


@pytest.fixture(scope="module", autouse=True)
def reward_module(tmp_path_factory):
    """A reward that varies with the sampled text (a random model never answers exactly)."""
    d = tmp_path_factory.mktemp("rewards")
    (d / "grpo_test_rewards.py").write_text("def length(prompt, response, record):\n"
                                            "    return float(len(response) % 5)\n")
    sys.path.insert(0, str(d))
    yield
    sys.path.remove(str(d))


def step(objective: str, layout: tuple[str, ...], devices):
    args, source = SOURCES[objective]
    cfg = tiny_config(*args, *layout)
    setup = build_setup(cfg, devices)
    data = PromptData(cfg)
    run = SimpleNamespace(state=setup.init_state())
    batch = source(setup, data, data.train_iterator(), run, lambda m: None).next_batch()
    grads, metrics = setup.jit_gradients()(run.state.params, batch)
    out = {k: float(v) for k, v in metrics.items()}
    params = init = None
    if objective == "ppo":  # the whole step: epochs x minibatches of updates
        init = jax.device_get(run.state.params)
        state, step_metrics = setup.jit_train_step()(run.state, batch)
        params = jax.device_get(state.params)
        out.update({f"step_{k}": float(v) for k, v in step_metrics.items()})
    return jax.device_get(batch), jax.device_get(grads), out, (params, init)


@pytest.fixture(scope="module")
def reference():
    return {}  # one device, computed once per objective


@pytest.mark.parametrize("objective", ["grpo", "ppo"])
@pytest.mark.parametrize("layout,n", [
    pytest.param(("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"), 8, marks=pytest.mark.slow),
    pytest.param(("mesh.data=1", "mesh.fsdp=4"), 4, marks=pytest.mark.slow)])
def test_rl_step_matches_single_device(objective, layout, n, reference):
    if objective not in reference:
        reference[objective] = step(objective, ("mesh.data=1",), jax.devices()[:1])
    batch, grads, metrics, (params, init_params) = step(objective, layout, jax.devices()[:n])
    ref_batch, ref_grads, ref_metrics, (ref_params, ref_init) = reference[objective]
    for k in ("inputs", "targets", "weights", "rewards"):
        np.testing.assert_array_equal(getattr(batch, k), getattr(ref_batch, k), err_msg=k)  # same rollouts
    assert np.std(ref_batch.rewards) > 0  # the advantages are not all zero
    floats = ("old_logp", "ref_logp", "entropy", "advantages")
    for k in floats + (("old_values", "returns") if objective == "ppo" else ()):
        np.testing.assert_allclose(getattr(batch, k), getattr(ref_batch, k), rtol=1e-5, atol=1e-5, err_msg=k)
    keys = ["loss", "clip_fraction"] + (["reward", "kl"] if objective == "grpo" else [
        "value_loss", "step_loss", "step_reward", "step_kl", "step_approx_kl", "step_explained_variance"])
    for k in keys:
        assert metrics[k] == pytest.approx(ref_metrics[k], rel=1e-5, abs=1e-6), k
    assert_trees_close(grads, ref_grads)
    if objective == "ppo":
        assert ref_metrics["step_approx_kl"] > 0  # the later updates saw a moved policy
        # After 4 Adam updates an element whose gradient is ~0 moves by up to lr x sign(noise): compare the
        # parameters' movement from the start, to 1e-3 of the 4 updates' largest step (4 x lr = 4e-3).
        deltas = jax.tree.map(np.subtract, params, init_params)
        ref_deltas = jax.tree.map(np.subtract, ref_params, ref_init)
        for x, y in zip(jax.tree.leaves(deltas), jax.tree.leaves(ref_deltas), strict=True):
            np.testing.assert_allclose(x, y, rtol=0, atol=4e-6)
