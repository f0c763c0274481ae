"""Chat templates: render a conversation as the model's own Jinja template does, and find its assistant text.

One renderer for training (`train.objective=sft`, `llmjax.data.post.sft_data`) and for chat generation.
A template comes from `data.chat_template` (a Jinja file), else from the tokenizer's directory
(`chat_template` in tokenizer_config.json, else a `chat_template.jinja` file, as transformers
saves it). It is rendered the way `transformers`' `apply_chat_template` renders it: a sandboxed
Jinja environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, the
`tojson` filter without HTML escaping, `raise_exception` and `strftime_now`, the tokenizer's
special-token strings (`bos_token`, `eos_token`, ...) as variables, and the `{% generation %}`
tag accepted (it renders its body).

A template comes with the model, so it is rendered with limits (`llmjax.data.tokenizers.template_limits`):
at most `MAX_STEPS` loop iterations and calls and `MAX_CHARS` characters of output or of any string or
list it builds, and no `include`/`import`/`extends` (a chat template is one file). Going over a limit is
a template error naming the template, like any other.

Assistant text is found by prefix differences, independently of generation tags: the text of
assistant message i is what rendering messages[: i + 1] adds to rendering messages[: i] with the
generation prompt (so the role header is not assistant text; the message and its end-of-turn
marker are). A template for which the shorter render is not a prefix of the longer (it rewrites
earlier turns) is refused for training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from llmjax.config import ConfigError

Message = dict[str, Any]
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_VARIABLES = ("bos_token", "eos_token", "pad_token", "unk_token")


def _environment() -> Any:
    import jinja2
    import jinja2.ext

    from llmjax.data.tokenizers.template_limits import LimitedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %} ... {% endgeneration %}` (transformers' assistant-mask markers): renders the body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.limit_filters()  # tojson too
    return env


def find_template(tokenizer: Any, path: str | None = None) -> tuple[str, str]:
    """(template source, where it came from): `path` (data.chat_template) if given, else the tokenizer's
    `chat_template` (tokenizer_config.json) or its directory's chat_template.jinja. ConfigError when none."""
    if path:
        p = Path(path).expanduser()
        try:
            return p.read_text(encoding="utf-8"), str(p)
        except OSError as e:
            raise ConfigError(f"data.chat_template: cannot read {p}: {e}") from None
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, str) and own.strip():
        return own, f"{tokenizer.path} (tokenizer_config.json)"
    directory = Path(tokenizer.path).parent
    if (directory / TEMPLATE_FILE).is_file():
        from llmjax.guards import inside

        file = inside(directory, TEMPLATE_FILE, "data.tokenizer")
        return file.read_text(encoding="utf-8"), str(file)
    raise ConfigError(f"data.tokenizer: {tokenizer.path} has no chat template (no chat_template in "
                      f"tokenizer_config.json, no {TEMPLATE_FILE}); set data.chat_template to a Jinja file")


class ChatTemplate:
    """A compiled chat template and the special-token strings it may use."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, origin: str = "chat template"):
        import jinja2

        self.source, self.origin = source, origin
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise ConfigError(f"{origin}: the chat template does not compile: {e}") from None

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, path: str | None = None) -> ChatTemplate:
        """The template of `find_template`, with the tokenizer's special tokens as variables."""
        source, origin = find_template(tokenizer, path)
        return cls(source, special_token_strings(tokenizer), origin)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as text, exactly as the template renders it. ValueError for a template error
        (e.g. `raise_exception` on roles it does not accept)."""
        import jinja2

        from llmjax.data.tokenizers.template_limits import render_limited

        try:
            return render_limited(self._template, messages=list(messages), add_generation_prompt=add_generation_prompt,
                                  tools=None, documents=None, **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"the chat template ({self.origin}) failed: {e}") from None
        except RecursionError:
            raise ValueError(f"the chat template ({self.origin}) failed: it recurses too deeply") from None

    def assistant_spans(self, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
        """(rendered conversation, [(start, end) character spans of each assistant message's text]).
        ValueError when the template is not prefix-consistent (see the module docstring)."""
        full = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ValueError(f"the chat template ({self.origin}) re-renders earlier turns (the text before "
                                 f"assistant message {i} is not a prefix of the conversation's text), so its "
                                 "assistant tokens cannot be found")
            if len(upto) > len(before):
                spans.append((len(before), len(upto)))
        return full, spans


def special_token_strings(tokenizer: Any) -> dict[str, str]:
    """{bos_token: "<s>", ...}: the special-token strings of a Hugging Face tokenizer's config (else none)."""
    out: dict[str, str] = {}
    for source in (getattr(tokenizer, "special_tokens_map", {}) or {}, getattr(tokenizer, "config", {}) or {}):
        for name in SPECIAL_VARIABLES:
            value = source.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                out[name] = value
    return out


def token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """Per token: whether its character range [start, end) overlaps one of `spans` (empty tokens: no)."""
    out = []
    for start, end in offsets:
        out.append(end > start and any(start < e and end > s for s, e in spans))
    return out
