"""Chat templates come with a downloaded model: rendering is bounded (steps, sizes, output) and reads no other
file. Each hostile template fails as a template error naming its file within about a second, in little memory."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from llmjax.config import ConfigError
from llmjax.data.tokenizers.chat_template import ChatTemplate

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
HOSTILE = {
    "{{ 'a' * 4000000000 }}": "'*' repetition would hold 4,000,000,000 characters",
    "{{ [0] * 10**9 }}": "'*' repetition",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}": "more than 200,000 loop",
    "{% for i in range(10**9) %}{% endfor %}": r"range\(1000000000\): more than 100,000 items",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}": "more than 200,000",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}": "recurses too deeply",
    "{{ 2 ** (10 ** 10) }}": "'\\*\\*' power would be an integer of about",
    "{{ 10 ** 5000 }}": "Exceeds the limit .4300 digits.",
    "{{ 'a' | center(10**9) }}": "filter center: the argument 1000000000",
    "{{ 'a'.ljust(10**9) }}": "method ljust: the argument 1000000000",
    "{{ '%0999999999d' % 1 }}": "width 0999999999",
    "{{ '{:0999999999}'.format(1) }}": "width 0999999999",
    "{{ messages | tojson(indent=10**9) }}": "filter tojson",
    "{% set ns = namespace(s='a' * 1000) %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}":
        "~ concatenation would hold",
    "{% set ns = namespace(s='a' * 1000) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}":
        "'\\+' concatenation would hold",
    "{{ 1 + 'a' }}": "TypeError: unsupported operand",
}


@pytest.mark.parametrize("source", list(HOSTILE))
def test_hostile_templates_fail_fast_naming_the_template(source):
    template = ChatTemplate(source, {}, "/models/x/chat_template.jinja")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"the chat template \(/models/x/chat_template.jinja\) failed: ") as e:
        template.render(MESSAGES)
    assert time.perf_counter() - t0 < 20  # about a second on a loaded 2-core machine; minutes before the limits
    assert pytest.importorskip("re").search(HOSTILE[source], str(e.value)), str(e.value)


@pytest.mark.parametrize("statement", ["{% include 'secret.jinja' %}", "{% import 'macros.jinja' as m %}",
                                       "{% from 'macros.jinja' import m %}", "{% extends 'base.jinja' %}"])
def test_templates_that_read_other_files_do_not_compile(statement):
    with pytest.raises(ConfigError, match=r"^/models/x/t.jinja: the chat template does not compile: '\w+' is not "
                                          "allowed in a chat template"):
        ChatTemplate("hello " + statement, {}, "/models/x/t.jinja")


def test_real_templates_stay_within_the_limits():
    """A long conversation (500 turns) through a committed model's template renders as before."""
    from llmjax.data.tokenizers.tokenizer import load_tokenizer

    tok = load_tokenizer(ROOT / "experiments" / "data" / "chat_tokenizer")
    template = ChatTemplate.for_tokenizer(tok)
    long = [{"role": ("user", "assistant")[i % 2], "content": f"message {i}"} for i in range(500)]
    text, spans = template.assistant_spans(long[:20])
    assert len(spans) == 10
    assert "message 499" in template.render(long)


def test_chat_generation_and_sft_data_report_it_as_a_usage_error(tmp_path):
    """`generate --chat` (chat_prompts) and SFT data rendering (train and --check) refuse a hostile
    data.chat_template with one ConfigError naming the file (before: 8.9 and 12.6 GB)."""
    from helpers import tiny_config

    from llmjax.data.post.sft_data import SFTData
    from llmjax.data.tokenizers.tokenizer import load_tokenizer
    from llmjax.infer.workdir_model import chat_prompts

    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m['content'] * 4000000000 }}{% endfor %}")
    tok_dir = ROOT / "experiments" / "data" / "chat_tokenizer"
    cfg = tiny_config("model.vocab_size=512", "data.seq_len=128", "model.max_seq_len=128", "train.objective=sft",
                      f"data.path={ROOT / 'experiments' / 'data' / 'sft_chat.jsonl'}", f"data.tokenizer={tok_dir}",
                      f"data.chat_template={bad}")
    with pytest.raises(ConfigError, match=rf"^--chat: the chat template \({bad}\) failed: a '\*' repetition"):
        chat_prompts(cfg, load_tokenizer(tok_dir), ["hi"], None)
    with pytest.raises(ConfigError, match=rf"sft_chat.jsonl line 1: the chat template \({bad}\) failed"):
        SFTData(cfg)
