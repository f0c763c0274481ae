"""Chat templates: a conversation rendered with a tokenizer's Jinja template, as `transformers` renders it.

    template = ChatTemplate.of(tokenizer)                     # ConfigError when the tokenizer has none
    text = template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    text, spans = template.render_with_spans(messages)        # spans: (start, end) of {% generation %} blocks
    ids = tokenizer.encode([text])[0]                         # no BOS added: the template writes its own

The environment is the one `transformers`' `apply_chat_template` builds: a sandboxed (immutable)
Jinja environment with `trim_blocks` and `lstrip_blocks`, the loop-control extension, a `tojson`
filter that does not escape HTML (`ensure_ascii=False`), the `raise_exception` and `strftime_now`
globals, and a `{% generation %}...{% endgeneration %}` block that marks assistant text (what
`return_assistant_tokens_mask` reads). The template sees `messages` (keys whose value is None
dropped), `add_generation_prompt`, and the tokenizer's special tokens as strings (`bos_token`,
`eos_token`, `pad_token`, `unk_token`), then any extra keyword arguments. The tokenized prompt is
the rendered text encoded without adding special tokens, as `transformers` does.

The template comes from the tokenizer directory's `chat_template.jinja` (what transformers >= 4.43
saves), else `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates of
which `default` is used).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmjax.config import ConfigError

TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _environment() -> Any:
    """The sandboxed environment with the `generation` block tag (records the spans it renders)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationSpans(jinja2.ext.Extension):
        """`{% generation %}body{% endgeneration %}` renders body and, while recording, notes its span."""

        tags = {"generation"}

        def __init__(self, environment: Any):
            super().__init__(environment)
            environment.extend(generation_spans=None, rendered_so_far=None)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller: Any) -> str:
            text = caller()
            spans, so_far = self.environment.generation_spans, self.environment.rendered_so_far
            if spans is not None:
                start = len("".join(so_far))
                spans.append((start, start + len(text)))
            return text

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationSpans, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


def _from_config(config: dict[str, Any]) -> str | None:
    value = config.get("chat_template")
    if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value.strip() else None


def check_messages(messages: Any, where: str = "messages") -> list[dict[str, Any]]:
    """A conversation: a list of {"role": str, "content": ...} dicts; ConfigError naming `where` otherwise.
    Keys whose value is None are dropped (as transformers does)."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: expected a non-empty list of messages, got {messages!r}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ConfigError(f"{where}[{i}]: expected {{\"role\": ..., \"content\": ...}}, got {m!r}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with."""

    def __init__(self, source: str, where: str, special_tokens: dict[str, str] | None = None):
        import jinja2

        self.source, self.where = source, where
        self.special_tokens = dict(special_tokens or {})
        self._env = _environment()
        try:
            self._template = self._env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise ConfigError(f"{where}: the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None

    @classmethod
    def of(cls, tokenizer: Any) -> ChatTemplate:
        """The chat template of a Hugging Face tokenizer (`llmjax.data.hf_tokenizer.HFTokenizer`); ConfigError
        naming its directory when it has none."""
        directory = Path(tokenizer.path).parent
        config = getattr(tokenizer, "config", None)
        if config is None:
            raise ConfigError(f"{tokenizer.path}: a {tokenizer.kind} tokenizer has no chat template (chat needs a "
                              "Hugging Face tokenizer.json with a chat template)")
        file = Path(tokenizer.files.get(TEMPLATE_FILE, directory / TEMPLATE_FILE))
        source, where = None, str(file)
        if file.is_file():
            source = file.read_text(encoding="utf-8")
        if source is None:
            source, where = _from_config(config), str(directory / "tokenizer_config.json")
        if source is None:
            raise ConfigError(f"{directory}: no chat template (neither {TEMPLATE_FILE} nor a chat_template in "
                              "tokenizer_config.json): this model was not trained for chat; generate without --chat")
        return cls(source, where, tokenizer.special_token_strings())

    def _context(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool, **kwargs: Any
                 ) -> dict[str, Any]:
        return {"messages": check_messages(list(messages)), "add_generation_prompt": add_generation_prompt,
                **self.special_tokens, **kwargs}

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """The conversation as text; ConfigError (naming the template) when the template raises."""
        import jinja2

        try:
            return self._template.render(**self._context(messages, add_generation_prompt, **kwargs))
        except jinja2.exceptions.TemplateError as e:
            raise ConfigError(f"{self.where}: the chat template refused the conversation: {e}") from None

    def render_with_spans(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False,
                          **kwargs: Any) -> tuple[str, list[tuple[int, int]]]:
        """(text, character spans of its `{% generation %}` blocks): the assistant text a loss covers."""
        import jinja2

        rendered: list[str] = []
        spans: list[tuple[int, int]] = []
        self._env.generation_spans, self._env.rendered_so_far = spans, rendered
        try:
            for piece in self._template.generate(**self._context(messages, add_generation_prompt, **kwargs)):
                rendered.append(piece)
        except jinja2.exceptions.TemplateError as e:
            raise ConfigError(f"{self.where}: the chat template refused the conversation: {e}") from None
        finally:
            self._env.generation_spans = self._env.rendered_so_far = None
        return "".join(rendered), spans
