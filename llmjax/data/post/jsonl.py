"""JSON-lines datasets for post-training: read them with errors named by file and line, check their records.

Formats (one JSON object per line; blank lines are skipped):
  chat:        {"messages": [{"role": "system" | "user" | "assistant" | ..., "content": str}, ...]}
  completion:  {"prompt": str, "completion": str}   (a user turn and an assistant turn)
  preference:  {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
"""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

from llmjax.config import ConfigError

Record = tuple[str, dict[str, Any]]  # ("file:line", the parsed object)


def jsonl_files(path: str, key: str = "data.path") -> list[Path]:
    """The .jsonl files `path` names: a file, a directory (its *.jsonl, sorted) or a glob. ConfigError if none."""
    p = Path(path).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(p.glob("*.jsonl"))
    else:
        files = sorted(Path(f) for f in glob.glob(str(p)) if Path(f).is_file())
    if not files:
        raise ConfigError(f"{key}: {path}: no JSON-lines file (a .jsonl file, a directory of them, or a glob)")
    return files


def read_jsonl(path: str, key: str = "data.path") -> list[Record]:
    """Every non-blank line of the files of `path` as ("file:line", object). ConfigError naming the file and
    line of the first line that is not a JSON object."""
    out: list[Record] = []
    for f in jsonl_files(path, key):
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{key}: cannot read {f}: {e}") from None
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{key}: {f} line {i}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise ConfigError(f"{key}: {f} line {i}: nested too deeply to read as JSON") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"{key}: {f} line {i}: expected a JSON object, got {type(obj).__name__}")
            out.append((f"{f}:{i}", obj))
    if not out:
        raise ConfigError(f"{key}: {path}: no records (every line is blank)")
    return out


def where(name: str) -> str:
    """'file:line' -> 'file line N' for messages."""
    file, _, line = name.rpartition(":")
    return f"{file} line {line}"


def check_messages(messages: Any, name: str, field: str = "messages") -> list[dict[str, Any]]:
    """A list of {"role": str, "content": str} (other keys kept). ValueError naming the line and message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where(name)}: {field!r} must be a non-empty list of messages")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where(name)}: {field}[{j}] must be an object with string 'role' and 'content'")
    return messages


def conversation(record: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The messages of a chat or prompt/completion record. ValueError naming the line when it is neither."""
    if "messages" in record:
        messages = check_messages(record["messages"], name)
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where(name)}: the conversation has no assistant message (nothing to train on)")
        return messages
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    raise ValueError(f"{where(name)}: expected {{\"messages\": [...]}} or {{\"prompt\": str, \"completion\": str}}, "
                     f"got keys {sorted(record)}")


def as_messages(value: Any, role: str, name: str, field: str) -> list[dict[str, Any]]:
    """A preference field: a string (one `role` message) or a list of messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return check_messages(value, name, field)
