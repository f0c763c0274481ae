"""Tokenizer files, chat templates and `generate --chat` on imported models.

Chat templates (`llmjax.data.tokenizers.chat_template`, shared with SFT) render text and token ids exactly as
`transformers`' `apply_chat_template`; `convert from-hf` keeps tokenizer_config.json, chat_template.jinja and
generation_config.json in the run's tokenizer copy; `llmjax generate --chat` replies what
`transformers.generate` replies on the same rendered prompt and stops at the model's end-of-turn
ids; `convert to-hf` writes the tokenizer files, the special ids and generation_config.json so that
`transformers` renders and stops the same; BOS follows the tokenizer's config; bad input exits 2."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llmjax.config import ConfigError, load_config
from llmjax.data.tokenizers.chat_template import ChatTemplate
from llmjax.data.tokenizers.hf_tokenizer import HFTokenizer
from llmjax.infer.workdir_model import bos_prefix

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

ROOT = Path(__file__).resolve().parents[2]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "<start_of_turn>", "<end_of_turn>"]
# Templates written for these tests in the styles of ChatML (Qwen), Llama 3 and Gemma.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n\n' + m['content'] | trim + "
    "'<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}"
)
GEMMA_STYLE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "def f(x): return x"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "return x"},
     {"role": "assistant", "content": "def f(x):\n    return x"}, {"role": "user", "content": "and y?"}],
]


def write_tokenizer(directory: Path, template: str, add_bos: bool | None = None) -> None:
    """A byte-level BPE tokenizer.json with tokenizer_config.json and chat_template.jinja, by transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["def f(x):\n    return x and y, be brief.\n"] * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>")
    fast.chat_template = template
    fast.save_pretrained(directory)
    if add_bos is not None:
        config = json.loads((directory / "tokenizer_config.json").read_text())
        (directory / "tokenizer_config.json").write_text(json.dumps(dict(config, add_bos_token=add_bos)))


@pytest.mark.parametrize("template", [CHATML, LLAMA3_STYLE, GEMMA_STYLE], ids=["chatml", "llama3", "gemma"])
def test_chat_template_renders_as_transformers(template, tmp_path):
    write_tokenizer(tmp_path, template)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = HFTokenizer(tmp_path / "tokenizer.json")
    chat = ChatTemplate.for_tokenizer(ours)
    for messages in CONVERSATIONS:
        for prompt in (True, False):
            if template is GEMMA_STYLE and messages[0]["role"] == "system":
                with pytest.raises(ValueError, match="System role not supported"):
                    chat.render(messages, add_generation_prompt=prompt)
                continue
            want = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
            text = chat.render(messages, add_generation_prompt=prompt)
            assert text == want
            ids = reference.apply_chat_template(messages, add_generation_prompt=prompt, return_dict=True)
            assert ours.encode([text])[0] == list(ids["input_ids"])


def test_missing_and_broken_templates_name_the_file(tmp_path):
    write_tokenizer(tmp_path, "")
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="has no chat template"):
        ChatTemplate.for_tokenizer(HFTokenizer(tmp_path / "tokenizer.json"))
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ConfigError, match="chat_template.jinja: the chat template does not compile"):
        ChatTemplate.for_tokenizer(HFTokenizer(tmp_path / "tokenizer.json"))


def test_bos_follows_the_tokenizer_config(tmp_path):
    for add_bos in (True, False):
        d = tmp_path / str(add_bos)
        write_tokenizer(d, CHATML, add_bos)
        tok = HFTokenizer(d / "tokenizer.json")
        assert tok.add_bos is add_bos
        assert bos_prefix(load_config(None, []), tok) == ([tok.bos_id] if add_bos else [])
        assert bos_prefix(load_config(None, ["data.add_bos=true"]), tok) == [tok.bos_id]


# ----------------------------------------------------------------------------- an imported chat model


def llmjax(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmjax.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """(HF dir of a tiny Qwen2 with a ChatML tokenizer, end-of-turn ids, transformers model, workdir)."""
    hf_dir = tmp_path_factory.mktemp("qwen_chat")
    write_tokenizer(hf_dir, CHATML)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    stops = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    config = transformers.Qwen2Config(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=True, eos_token_id=stops, bos_token_id=None)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 if p.ndim > 1 else torch.rand_like(p) * 0.5 + 0.5)
    model.save_pretrained(hf_dir)  # also writes generation_config.json with both end-of-turn ids
    work = hf_dir.parent / "qwen_chat_work"
    r = llmjax("convert", "from-hf", hf_dir, work, "model.compute_dtype=float32", "data.seq_len=32")
    assert r.returncode == 0, r.stderr
    return hf_dir, stops, model, work


def test_import_keeps_the_chat_files(chat_model):
    hf_dir, stops, _, work = chat_model
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (work / "tokenizer" / name).read_bytes() == (hf_dir / name).read_bytes(), name
    from llmjax.data.tokenizers.run_tokenizer import load_copy

    assert load_copy(work / "tokenizer").stop_ids == tuple(stops)


def test_generate_chat_replies_as_transformers(chat_model):
    hf_dir, stops, model, work = chat_model
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f(x):"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    want = tok.decode(out, skip_special_tokens=True)
    r = llmjax("generate", "--workdir", work, "--chat", "--system", "Be brief.", "--prompt", "def f(x):",
               "--max-new-tokens", 12)
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"
    assert f"stopping at ids {stops}" in r.stderr


def test_engine_stops_at_any_end_of_turn_id(chat_model):
    from llmjax.infer.engine import Engine
    from llmjax.infer.sampling import SamplingParams
    from llmjax.interop import hf

    hf_dir = chat_model[0]
    model, params = hf.load(hf_dir)
    engine = Engine(model.cfg, params)
    prompt = [[5, 9, 17, 33]]
    free = engine.generate(prompt, SamplingParams(max_new_tokens=10))[0].tokens
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    for device_loop in (True, False):
        g = engine.generate(prompt, SamplingParams(max_new_tokens=10), (319, free[k]), device_loop=device_loop)[0]
        assert g.tokens == free[:k] and g.finish == "eos"


def test_export_writes_tokenizer_ids_and_generation_config(chat_model, tmp_path):
    hf_dir, stops, model, work = chat_model
    out = tmp_path / "out"
    r = llmjax("convert", "to-hf", work, out)
    assert r.returncode == 0, r.stderr
    assert "Qwen2ForCausalLM" in r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == stops[0] and config["pad_token_id"] == stops[1]
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == stops
    back = transformers.AutoTokenizer.from_pretrained(out)
    assert back.apply_chat_template(CONVERSATIONS[1], tokenize=False) == \
        transformers.AutoTokenizer.from_pretrained(hf_dir).apply_chat_template(CONVERSATIONS[1], tokenize=False)
    tokens = np.array([[5, 9, 17, 33, 2, 8]])
    with torch.no_grad():
        exported = transformers.AutoModelForCausalLM.from_pretrained(out)(torch.tensor(tokens)).logits.numpy()
        original = model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(exported, original, atol=1e-5, rtol=1e-5)


def test_chat_errors_exit_2(chat_model, tmp_path):
    work = chat_model[3]
    r = llmjax("generate", "--workdir", work, "--system", "x", "--prompt", "hi")
    assert r.returncode == 2 and "--system needs --chat" in r.stderr and "Traceback" not in r.stderr
    r = llmjax("generate", "--workdir", work, "--chat", "--beams", "2", "--prompt", "hi")
    assert r.returncode == 2 and "beam search" in r.stderr
    plain = tmp_path / "plain"
    shutil.copytree(work, plain)
    copy = plain / "tokenizer"  # the run's tokenizer copy without its chat template (manifest updated)
    (copy / "chat_template.jinja").unlink()
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    manifest = json.loads((copy / "llmjax_tokenizer.json").read_text())
    del manifest["files"]["chat_template.jinja"]
    digest = hashlib.sha256((copy / "tokenizer_config.json").read_bytes()).hexdigest()
    manifest["files"]["tokenizer_config.json"] = digest
    (copy / "llmjax_tokenizer.json").write_text(json.dumps(manifest))
    (plain / "config.yaml").write_text((plain / "config.yaml").read_text().replace(str(work), str(plain)))
    r = llmjax("generate", "--workdir", plain, "--chat", "--prompt", "hi")
    assert r.returncode == 2 and "no chat template" in r.stderr and "Traceback" not in r.stderr, r.stderr
