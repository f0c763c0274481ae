"""Supervised fine-tuning data: the chat template as transformers renders it, the assistant-token mask against
transformers' own (`return_assistant_tokens_mask`), packing and weights, resume, and bad input (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_config
from test_cli import assert_usage_error, run_cli

from llmjax.config import ConfigError
from llmjax.data.post.jsonl import conversation
from llmjax.data.post.sft_data import SFTData, best_fit, encode_conversation
from llmjax.data.tokenizers.chat_template import ChatTemplate
from llmjax.data.tokenizers.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "experiments" / "data"
TOKENIZER = DATA / "chat_tokenizer"
# A Llama-3-style template (BOS from the tokenizer's config, headers, system default) without generation tags:
# the mask comes from prefix differences, checked against the same template with the tags added.
LLAMA_STYLE = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + ':' }}"
               "{% if m['role'] == 'assistant' %}{% generation %}{{ ' ' + m['content'] | trim + '<|im_end|>' }}"
               "{% endgeneration %}{% else %}{{ ' ' + m['content'] | trim + '<|im_end|>' }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant:' }}{% endif %}")


def sft_config(*overrides: str):
    return tiny_config("model.vocab_size=512", "data.seq_len=128", "model.max_seq_len=128",
                       f"data.path={DATA / 'sft_chat.jsonl'}", f"data.tokenizer={TOKENIZER}", "train.objective=sft",
                       "data.validation_fraction=0.1", *overrides)


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))


def records(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


@pytest.mark.hf
@pytest.mark.parametrize("source", ["sft_chat.jsonl", "sft_completion.jsonl"])
def test_mask_is_transformers_assistant_mask(source, hf_tokenizer):
    tok = load_tokenizer(str(TOKENIZER))
    template = ChatTemplate.for_tokenizer(tok)
    for i, rec in enumerate(records(source)):
        messages = conversation(rec, f"{source}:{i + 1}")
        ids, mask = encode_conversation(template, tok, messages)
        ref = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True)
        assert ids.tolist() == list(ref["input_ids"]), i
        assert mask.astype(int).tolist() == list(ref["assistant_masks"]), i
        text = hf_tokenizer.apply_chat_template(messages, tokenize=False)
        assert template.render(messages) == text


@pytest.mark.hf
def test_prefix_mask_without_generation_tags_matches_tagged_template(hf_tokenizer):
    """The mask found by prefix differences on a template without tags = transformers' mask on the same
    template with generation tags (whitespace trimming, BOS variable)."""
    tok = load_tokenizer(str(TOKENIZER))
    untagged = ChatTemplate(LLAMA_STYLE.replace("{% generation %}", "").replace("{% endgeneration %}", ""),
                            {"bos_token": "<|endoftext|>"})
    for rec in records("sft_chat.jsonl")[:60]:
        ids, mask = encode_conversation(untagged, tok, rec["messages"])
        ref = hf_tokenizer.apply_chat_template(rec["messages"], chat_template=LLAMA_STYLE, tokenize=True,
                                               return_dict=True, return_assistant_tokens_mask=True,
                                               bos_token="<|endoftext|>")
        assert ids.tolist() == list(ref["input_ids"])
        assert mask.astype(int).tolist() == list(ref["assistant_masks"])


def test_weights_are_exactly_the_assistant_targets():
    """Every packed row: weight[t] = 1 iff target t (token t + 1) is an assistant token of the same conversation;
    an epoch trains on every assistant token of every training conversation exactly once."""
    cfg = sft_config("data.shuffle=false")
    data = SFTData(cfg)
    it = data.train_iterator()
    rows = data.pack_epoch(0)
    n_batches = len(rows) // cfg.train.batch_size
    seen = 0
    for _ in range(n_batches):
        b = next(it)
        for r in range(cfg.train.batch_size):
            seg, w = b["segment_ids"][r], b["weights"][r]
            assert set(np.unique(w)) <= {0.0, 1.0}
            assert not w[seg == 0].any()
        seen += int(b["weights"].sum())
    covered = [i for row in rows[:n_batches * cfg.train.batch_size] for i in row]
    assert sorted(covered) == sorted(set(covered))  # never split, never twice in an epoch
    assert seen == sum(int(data.train[i][1][1:].sum()) for i in covered)
    # the inputs are the conversations' own tokens, back to back
    b = next(data.train_iterator())
    first = rows[0]
    ids = np.concatenate([data.train[i][0] for i in first])
    np.testing.assert_array_equal(b["inputs"][0][: len(ids) - 1], ids[:-1])
    np.testing.assert_array_equal(b["targets"][0][: len(ids) - 1], ids[1:])
    mask = np.concatenate([data.train[i][1] for i in first])
    same = b["segment_ids"][0][: len(ids) - 1] == np.concatenate([np.full(len(data.train[i][0]), s + 1)
                                                                  for s, i in enumerate(first)])[1:]
    np.testing.assert_array_equal(b["weights"][0][: len(ids) - 1], (mask[1:] & same).astype(np.float32))


def test_best_fit_never_overfills():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 50, 200)
    rows = best_fit(lengths, rng.permutation(200), 64, 4)
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)


def test_batches_depend_on_the_step_only():
    """Resume: the iterator restored at step k yields what an uninterrupted one yields at k; processes split
    the global batch into their blocks."""
    cfg = sft_config()
    data = SFTData(cfg)
    it = data.train_iterator()
    batches = [next(it) for _ in range(12)]  # past one epoch (rows wrap into the next)
    resumed, note = data.restore_iterator(it.get_state(), 12)
    assert note is None
    again = data.train_iterator()
    for _ in range(12):
        next(again)
    for k in ("inputs", "weights"):
        np.testing.assert_array_equal(next(resumed)[k], next(again)[k])
    halves = [next(SFTData(cfg, block, 2).train_iterator()) for block in (0, 1)]
    np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in halves]), batches[0]["inputs"])
    evals = list(data.eval_batches())
    assert sum(int(b["weights"].sum()) for b in evals) == sum(int(m[1:].sum()) for _, m in data.validation)


@pytest.mark.parametrize("line,needle", [
    ('{"messages": [{"role": "user", "content": "hi"}', "line 3: not valid JSON"),
    ('[1, 2]', "line 3: expected a JSON object"),
    ('{"text": "no chat"}', "line 3: expected {\"messages\""),
    ('{"messages": [{"role": "user", "content": "only a question"}]}', "line 3: the conversation has no assistant"),
    ("[" * 100_000 + "]" * 100_000, "line 3: nested too deeply to read as JSON"),  # was a RecursionError
])
def test_bad_records_are_named_by_line(tmp_path, line, needle):
    good = (DATA / "sft_chat.jsonl").read_text().splitlines()[:2]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([*good, line, *good]) + "\n")
    with pytest.raises(ConfigError, match=None) as e:
        SFTData(sft_config(f"data.path={path}", "eval.every_steps=0", "train.batch_size=1"))
    assert needle in str(e.value) and str(path) in str(e.value)


@pytest.mark.slow
def test_bad_input_exits_2_before_compiling(tmp_path):
    base = ["--workdir", str(tmp_path / "run"), "--check", "--config", str(ROOT / "experiments/configs/sft_small.yaml"),
            "train.progress=false"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    assert_usage_error(run_cli("train", *base, f"data.path={bad}"), str(bad), "line 1")
    no_template = tmp_path / "tok"
    no_template.mkdir()
    (no_template / "tokenizer.json").write_bytes((TOKENIZER / "tokenizer.json").read_bytes())
    assert_usage_error(run_cli("train", *base, f"data.tokenizer={no_template}"), "has no chat template",
                       "data.chat_template")
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "word " * 300, "completion": "ok"}) + "\n")
    assert_usage_error(run_cli("train", *base, f"data.path={long}", "eval.every_steps=0"), "line 1",
                       "longer than a row of 257")
