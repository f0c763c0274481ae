"""Post-training through the command line: an SFT run, a LoRA run on top of it (train.init_from) that resumes
bit-identically, `llmjax eval` on it, and the exports: `convert to-hf --merge-lora` and the PEFT adapters give
the adapted model's logits in transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_cli import assert_usage_error, run_cli

from llmjax.train.telemetry.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "experiments" / "data"
TINY_SFT = [
    "model.vocab_size=512", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
    "model.d_ff=128", "model.max_seq_len=128", "model.compute_dtype=float32", "data.seq_len=128",
    f"data.path={DATA / 'sft_chat.jsonl'}", f"data.tokenizer={DATA / 'chat_tokenizer'}", "train.objective=sft",
    "data.validation_fraction=0.1", "train.batch_size=8", "train.steps=4", "train.progress=false",
    "train.tensorboard=false", "optim.warmup_steps=1", "eval.every_steps=2", "sample.max_new_tokens=0",
    "checkpoint.every_steps=2",
]
LORA = ["lora.rank=4", "lora.alpha=8", "lora.targets=[q,v,o,mlp]", "optim.lr=1e-2"]


def train(workdir: Path, *args: str):
    result = run_cli("train", "--workdir", str(workdir), *TINY_SFT, *args)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("post")
    base, lora, resumed = root / "base", root / "lora", root / "lora_resumed"
    train(base)
    train(lora, f"train.init_from={base}", *LORA)
    train(resumed, f"train.init_from={base}", *LORA, "train.stop_after=2")
    train(resumed, f"train.init_from={base}", *LORA)
    return base, lora, resumed


@pytest.mark.slow
def test_sft_run_trains_and_evaluates(runs):
    base, _, _ = runs
    train_m, eval_m = read_metrics(base / "metrics.jsonl"), read_metrics(base / "metrics.jsonl", "eval")
    assert sorted(train_m) == [0, 1, 2, 3] and sorted(eval_m) == [0, 2, 4]
    assert eval_m[4]["eval_loss"] < eval_m[0]["eval_loss"]
    assert all(0 < m["tokens"] < 8 * 128 for m in train_m.values())  # assistant tokens only


@pytest.mark.slow
def test_lora_starts_at_its_base_and_resumes_exactly(runs):
    base, lora, resumed = runs
    base_eval = read_metrics(base / "metrics.jsonl", "eval")
    lora_eval = read_metrics(lora / "metrics.jsonl", "eval")
    assert lora_eval[0]["eval_loss"] == base_eval[4]["eval_loss"]  # B = 0: step 0 is the base model
    assert lora_eval[4]["eval_loss"] < lora_eval[0]["eval_loss"]
    a, b = read_metrics(lora / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    assert [a[k]["loss"] for k in range(4)] == [b[k]["loss"] for k in range(4)]
    assert (lora / "base.json").is_file()
    out = run_cli("eval", "--workdir", str(lora))
    assert out.returncode == 0, out.stderr
    assert f"loss {lora_eval[4]['eval_loss']:.4f}" in out.stdout


@pytest.mark.slow
@pytest.mark.hf
def test_exports_give_the_adapted_models_logits(runs, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import jax

    from llmjax.infer.workdir_model import Loaded

    base, lora, _ = runs
    for args in ((base, tmp_path / "base"), (lora, tmp_path / "merged", "--merge-lora"), (lora, tmp_path / "peft")):
        out = run_cli("convert", "to-hf", *map(str, args))
        assert out.returncode == 0, out.stderr
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    loaded = Loaded(lora)
    tokens = np.random.default_rng(0).integers(3, 512, (2, 24)).astype(np.int32)
    ones = np.ones_like(tokens)
    ours = np.asarray(jax.device_get(loaded.family.module().apply(
        {"params": loaded.params}, tokens, ones, np.broadcast_to(np.arange(24, dtype=np.int32), tokens.shape))))
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    adapted = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32), tmp_path / "peft")
    with torch.no_grad():
        ids = torch.from_numpy(tokens.astype(np.int64))
        for model in (merged, adapted):
            np.testing.assert_allclose(model(ids).logits.numpy(), ours, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_usage_errors_exit_2(runs, tmp_path):
    base, _, _ = runs
    assert_usage_error(run_cli("convert", "to-hf", str(base), str(tmp_path / "x"), "--merge-lora"),
                       "--merge-lora", "not a LoRA run")
    result = run_cli("train", "--workdir", str(tmp_path / "run"), *TINY_SFT, f"train.init_from={base}",
                     "lora.rank=4", "lora.targets=[experts]")
    assert_usage_error(result, "lora.targets", "no parameter of this model matches")
    result = run_cli("train", "--workdir", str(tmp_path / "run2"), *TINY_SFT, f"train.init_from={tmp_path}")
    assert_usage_error(result, "train.init_from", "no checkpoint")
