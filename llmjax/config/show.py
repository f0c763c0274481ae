"""`llmjax config show`: the resolved config, every key with its description, range and default.

The output is YAML (the descriptions are comments), so it can be saved and used as a config
file: loading it gives the same config.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from typing import Any, Literal

import yaml

from llmjax.config.fields import doc_of, range_of
from llmjax.config.schema import Config

_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/]*")


def _scalar(value: Any) -> str:
    """A value as one line of YAML flow syntax (strings double-quoted with escapes, so newlines stay on the line)."""
    if isinstance(value, str):
        plain = _PLAIN.fullmatch(value) and yaml.safe_load(value) == value
        return value if plain else json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_scalar(k)}: {_scalar(v)}" for k, v in value.items()) + "}"
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def _annotation(f: dataclasses.Field[Any], tp: Any) -> str:
    """'[rmsnorm | layernorm]' for choices, '[>= 1]' for ranges, '' otherwise."""
    if typing.get_origin(tp) is Literal:
        return "[" + " | ".join(map(str, typing.get_args(tp))) + "]"
    args = typing.get_args(tp) or (tp,)
    number = next((a for a in args if a in (int, float)), None)
    if number is not None:
        text = range_of(f, number).describe(show_int32=False)
        return f"[{text}]" if text else ""
    return ""


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _lines(node: Any, indent: int) -> list[str]:
    hints = typing.get_type_hints(type(node))
    out = []
    pad = "  " * indent
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            out.append(f"{pad}{f.name}:  # {doc_of(f)}")
            out += _lines(value, indent + 1)
            continue
        notes = " ".join(x for x in (_annotation(f, hints[f.name]), f"(default {_scalar(_default(f))})") if x)
        out.append(f"{pad}{f.name}: {_scalar(value)}  # {doc_of(f)} {notes}")
    return out


def render(cfg: Config, source: str) -> str:
    """The config as commented YAML; `source` says where it came from (a file and overrides)."""
    header = [
        f"# llmjax config from {source}",
        "# each key: value  # what it means [choices or range] (default: the value when the key is left out)",
    ]
    return "\n".join(header + _lines(cfg, 0)) + "\n"
