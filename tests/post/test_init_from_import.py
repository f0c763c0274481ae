"""`train.init_from=IMPORTED` (a `convert from-hf` workdir) gives the model section and the tokenizer with its chat
template, for SFT with LoRA, without `--config IMPORTED/config.yaml` or `data.tokenizer`; `--check` and the real run
refuse an incompatible model before anything is written into the new workdir."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "interop"))
from test_hf_chat import CHATML, write_tokenizer  # noqa: E402


def llmjax(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmjax.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(a tiny Qwen2 with a ChatML tokenizer of 320 ids imported by `convert from-hf`, a chat.jsonl)."""
    root = tmp_path_factory.mktemp("init_from_import")
    hf_dir = root / "hf"
    write_tokenizer(hf_dir, CHATML)
    config = transformers.Qwen2Config(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(hf_dir)
    work = root / "imported"
    r = llmjax("convert", "from-hf", hf_dir, work, "data.seq_len=64")
    assert r.returncode == 0, r.stderr
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"def f{i}(x):"},
                                                     {"role": "assistant", "content": "return x and y"}]}) + "\n"
                            for i in range(40)))
    return work, chat


RUN = ["train.steps=2", "train.batch_size=8", "data.seq_len=64", "eval.every_steps=2", "eval.batches=1",
       "sample.max_new_tokens=0", "train.progress=false", "train.tensorboard=false", "optim.warmup_steps=1"]


def test_sft_lora_trains_from_an_import_alone(imported, tmp_path):
    work, chat = imported
    run = tmp_path / "sft"
    r = llmjax("train", "--workdir", run, "train.objective=sft", f"train.init_from={work}", "lora.rank=8",
               f"data.path={chat}", *RUN)
    assert r.returncode == 0, r.stderr
    assert f"initialised from {work}" in r.stdout + r.stderr
    saved = (run / "config.yaml").read_text()
    assert "vocab_size: 320" in saved and "d_model: 32" in saved  # the import's model section, not the default's
    assert (run / "tokenizer" / "chat_template.jinja").read_text() == (work / "tokenizer" /
                                                                       "chat_template.jinja").read_text()


def test_an_incompatible_model_is_refused_before_anything_is_written(imported, tmp_path):
    """(--check; the real run goes through the same check_base before writing: tests/train/test_check_strict.py)"""
    work, chat = imported
    run = tmp_path / "new"
    r = llmjax("train", "--check", "--workdir", run, "train.objective=sft",
               f"train.init_from={work}", "model.d_ff=64", f"data.path={chat}", *RUN)
    assert r.returncode == 2, r.stderr
    assert "model.d_ff" in r.stderr and f"train.init_from={work}" in r.stderr and "Traceback" not in r.stderr
    assert not run.exists()
