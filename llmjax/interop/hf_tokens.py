"""The tokenizer side of an exported Hugging Face directory: files, special-token ids, generation_config.json.

`convert to-hf` copies the run's tokenizer files (tokenizer.json or tokenizer.model, and with a
Hugging Face tokenizer its tokenizer_config.json, special_tokens_map.json, chat_template.jinja and
the generation_config.json it was imported with), puts the special-token ids into config.json
(`bos_token_id`, `eos_token_id`, `pad_token_id`) and writes a generation_config.json when none
came with the tokenizer: its `eos_token_id` lists every id that ends a turn (`stop_ids`), so
`transformers.generate` on the export stops where `llmjax generate --chat` does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

GENERATION_CONFIG = "generation_config.json"


def special_ids(tok: Any) -> dict[str, Any]:
    """{"bos_token_id", "eos_token_id", "pad_token_id"} of a tokenizer (None where it has none)."""
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def generation_config(tok: Any) -> dict[str, Any]:
    """A generation_config.json for `tok`: its special ids, `eos_token_id` a list when several ids end a turn."""
    stops = list(getattr(tok, "stop_ids", ()) or ([tok.eos_id] if tok.eos_id is not None else []))
    out = special_ids(tok)
    out["eos_token_id"] = stops[0] if len(stops) == 1 else (stops or None)
    return {k: v for k, v in out.items() if v is not None}


def export_tokenizer(tok: Any, hf_dir: Path) -> list[str]:
    """Copy `tok`'s files into `hf_dir` and write generation_config.json if none was among them.
    Returns the names written."""
    written = []
    for name, path in tok.files.items():
        shutil.copyfile(path, hf_dir / name)
        written.append(name)
    if GENERATION_CONFIG not in tok.files:
        (hf_dir / GENERATION_CONFIG).write_text(json.dumps(generation_config(tok), indent=2) + "\n")
        written.append(GENERATION_CONFIG)
    return written
