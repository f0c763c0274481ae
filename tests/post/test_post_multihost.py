"""Post-training across processes: SFT with LoRA and DPO (its cached reference log-probabilities) give the
same losses in 2 processes x 4 devices (launch/local.sh, gloo) as in 1 process x 8 devices, on the same
{data=2, fsdp=2, tensor=2} mesh, and the checkpoints hold the same values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmjax.train.telemetry.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
LOCAL = str(ROOT / "launch" / "local.sh")
pytestmark = pytest.mark.multiprocess
DATA = ROOT / "experiments" / "data"
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "data.shares=2"]
TINY = [
    "model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.d_ff=128", "model.max_seq_len=128", "model.compute_dtype=float32",
    f"data.tokenizer={DATA / 'chat_tokenizer'}",
    "data.validation_fraction=0.1", "train.batch_size=8", "train.steps=4", "train.progress=false",
    "train.tensorboard=false", "optim.warmup_steps=1", "eval.every_steps=2", "eval.batches=2",
    "sample.max_new_tokens=0", "checkpoint.every_steps=2", *MESH,
]
SFT = [f"data.path={DATA / 'sft_chat.jsonl'}", "data.seq_len=128", "train.objective=sft"]
DPO = [f"data.path={DATA / 'dpo_pairs.jsonl'}", "data.seq_len=64", "train.objective=dpo", "dpo.beta=0.1"]
LORA = ["lora.rank=4", "lora.alpha=8", "lora.targets=[q,v,o,mlp]", "optim.lr=1e-2"]


def command(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "llmjax.cli", "train", "--workdir", str(workdir), *TINY, *args]


def run(cmd: list[str], processes: int) -> subprocess.CompletedProcess:
    if processes == 2:
        cmd = [LOCAL, "2", "4", "--", *cmd]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-5000:]
    return r


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A short SFT run that LoRA and DPO start from (train.init_from)."""
    workdir = tmp_path_factory.mktemp("post_mp") / "base"
    run(command(workdir, *SFT), 1)
    return workdir


def _records(workdir: Path, kind: str, key: str) -> dict[int, float]:
    return {k: r[key] for k, r in read_metrics(workdir / "metrics.jsonl", kind).items()}


def _same_runs(one: Path, two: Path, keys: tuple[str, ...]) -> None:
    for key in keys:
        a, b = _records(one, "train", key), _records(two, "train", key)
        assert sorted(a) == sorted(b) == [0, 1, 2, 3], key
        # Rewards are beta x differences of summed log-probabilities (|sum| ~ 1e2), so float32 rounding in
        # another reduction order is ~ 0.1 x 1e2 x 6e-8 ~ 1e-6 absolute; the margin is a difference of two.
        atol = 2e-6 if key.startswith("reward") else 0.0
        np.testing.assert_allclose([b[s] for s in range(4)], [a[s] for s in range(4)], rtol=1e-6, atol=atol,
                                   err_msg=key)
    a, b = _records(one, "eval", "eval_loss"), _records(two, "eval", "eval_loss")
    assert sorted(a) == sorted(b) == [0, 2, 4]
    np.testing.assert_allclose([b[s] for s in (0, 2, 4)], [a[s] for s in (0, 2, 4)], rtol=1e-6)
    for w in (one, two):
        assert sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


def test_lora_sft_in_two_processes_matches_one(base, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run(command(one, *SFT, *LORA, f"train.init_from={base}"), 1)
    r = run(command(two, *SFT, *LORA, f"train.init_from={base}"), 2)
    assert "distributed: 2 processes, 8 devices (4 per process)" in r.stderr
    _same_runs(one, two, ("loss", "tokens"))
    state = two / "checkpoints" / "4" / "state"
    assert (state / "ocdbt.process_0").exists() and (state / "ocdbt.process_1").exists()
    # The 2-process LoRA checkpoint restores in one process and continues like the one-process run.
    more = ["train.steps=6", f"train.init_from={base}"]
    run(command(one, *SFT, *LORA, *more), 1)
    run(command(two, *SFT, *LORA, *more), 1)
    a, b = _records(one, "train", "loss"), _records(two, "train", "loss")
    np.testing.assert_allclose([b[s] for s in (4, 5)], [a[s] for s in (4, 5)], rtol=1e-6)


def test_dpo_in_two_processes_matches_one(base, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run(command(one, *DPO, f"train.init_from={base}"), 1)
    run(command(two, *DPO, f"train.init_from={base}"), 2)
    assert (two / "dpo_reference.npz").is_file()
    _same_runs(one, two, ("loss", "reward_accuracy", "reward_margin"))



RL_REWARD = "def length(prompt, response, record):\n    return float(len(response) % 5)\n"
GRPO = [f"rl.prompts={DATA / 'rl_tasks.jsonl'}", "rl.reward_fn=mp_rl_rewards:length", "rl.samples_per_prompt=4",
        "rl.max_new_tokens=4", "data.seq_len=48", "train.objective=grpo", "eval.every_steps=0", "train.steps=2",
        "checkpoint.every_steps=0", "optim.lr=1e-3"]


# PPO: one epoch of 2 minibatches per rollout batch (the minibatch permutation and slices, across processes too)
PPO = [a for a in GRPO if a != "train.objective=grpo"] + ["train.objective=ppo", "rl.ppo_epochs=1", "rl.minibatches=2"]
RL_KEYS = {"grpo": ("reward", "reward_std", "response_length", "loss", "kl", "entropy", "grad_norm"),
           "ppo": ("reward", "reward_std", "response_length", "loss", "policy_loss", "value_loss", "kl", "entropy",
                   "grad_norm", "explained_variance")}


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["grpo", "ppo"])
def test_rl_in_two_processes_matches_one(objective, tmp_path, monkeypatch):
    """GRPO and PPO from a random policy: the same rollouts (rewards, response lengths) and losses per step in 2
    processes as in 1 (every process decodes on the global arrays and scores every row, so GRPO's group advantages
    and PPO's values and whitened GAE advantages are the whole batch's: `llmjax.post.rl.rollout.Rollouts`)."""
    (tmp_path / "mp_rl_rewards.py").write_text(RL_REWARD)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{ROOT}")
    one, two = tmp_path / "one", tmp_path / "two"
    args = GRPO if objective == "grpo" else PPO
    run(command(one, *args), 1)
    r = run(command(two, *args), 2)
    assert "distributed: 2 processes, 8 devices (4 per process)" in r.stderr
    for key in RL_KEYS[objective]:
        a, b = _records(one, "train", key), _records(two, "train", key)
        assert sorted(a) == sorted(b) == [0, 1], key
        # the rollouts are identical; log-probabilities and losses differ by float32 rounding of the cross-process
        # reductions (loss: a sum of terms ~0.1 that can cancel to ~1e-5, so the bound is absolute as well)
        # explained_variance = 1 - a ratio near 1: float32 rounding of the ratio (~1e-7) is absolute there.
        # PPO's policy_loss is a mean of clipped ratio x whitened advantage, terms of unit size (the advantages have
        # std 1 over the batch) that cancel to ~1e-4: its rounding is absolute at a few ulps of 1.0 (float32 eps
        # 1.19e-7; seen 4.5e-8 on one CPU, 1.04e-7 on another), so 1e-7 was under one ulp of its terms: 8 ulps
        exact = key in ("reward", "reward_std", "response_length")
        unit_terms = objective == "ppo" and key == "policy_loss"
        atol = (0 if exact else 1e-6 if key == "explained_variance" else
                8 * float(np.finfo(np.float32).eps) if unit_terms else 1e-7)
        np.testing.assert_allclose([b[s] for s in (0, 1)], [a[s] for s in (0, 1)], rtol=0 if exact else 1e-6,
                                   atol=atol, err_msg=key)
