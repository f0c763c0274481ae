"""Verifiable reward functions for `rl.reward_fn=module:function` (GRPO/PPO with exact answers).

A reward function is called as `fn(prompt: str, response: str, record: dict) -> float` with the
prompt's text, the sampled response's text (up to its stop token) and the prompt set's record (every
field, e.g. an "answer").
"""

from __future__ import annotations

import re
from typing import Any


def exact_answer(prompt: str, response: str, record: dict[str, Any]) -> float:
    """1.0 when the record's "answer" appears in the response as a whole word (case-sensitive), else 0.0."""
    answer = str(record["answer"])
    return 1.0 if re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", response) else 0.0
