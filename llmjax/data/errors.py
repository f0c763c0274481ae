"""The data layer's error: a problem with a source, a shard or a tokenizer, naming the file or key.

`DataError` is a `ConfigError`, so the CLI reports it in one line with exit status 2, whether it
is found before the first step (a missing file, an empty source) or during training (a shard
that is corrupt, a file that disappeared). It is raised in grain worker processes too and
crosses the process boundary as itself (it is a plain picklable exception).
"""

from __future__ import annotations

from llmjax.config import ConfigError


class DataError(ConfigError):
    """A data source, shard or tokenizer problem; the message names the file or config key."""


def find_data_error(exc: BaseException) -> DataError | None:
    """The DataError in `exc`'s cause/context chain (grain wraps worker exceptions), or None."""
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        if isinstance(node, DataError):
            return node
        seen.add(id(node))
        node = node.__cause__ or node.__context__
    return None
