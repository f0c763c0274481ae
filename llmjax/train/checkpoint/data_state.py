"""The data iterator's state in an orbax checkpoint: one JSON file per data share.

Layout of `checkpoints/<step>/data/`: `meta.json` ({"format", "step", "shares", "fingerprint"},
written by process 0) and `share_<r>.json` (grain's iterator state and token counts of share r,
written by the process that reads share r). A restoring process reads the files of the shares it
reads now, so a checkpoint restores under any process count that divides the share count.
Modelled on grain's own orbax handler (`grain.checkpoint`), which keys files by process instead.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

META = "meta.json"
LEGACY = "metadata"  # what ocp.args.JsonSave wrote (llmjax before data shares)


def _is_primary() -> bool:
    import jax

    return jax.process_index() == 0


class DataStateHandler(ocp.CheckpointHandler):
    """Saves `BatchIterator.get_state()` (or {"step": k} without an iterator) as per-share JSON files."""

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        state = dict(args.state)
        shares = state.pop("share_states", {})
        for r, share in shares.items():
            (directory / f"share_{int(r)}.json").write_text(json.dumps(share))
        if _is_primary():
            (directory / META).write_text(json.dumps(state))

    def restore(self, directory: epath.Path, args: DataStateRestore) -> dict[str, Any] | None:
        """{"step", ..., "share_states": {r: ...}} for `args.shares`; {"legacy": ...} for an old checkpoint;
        None when there is no data state. A missing share file raises FileNotFoundError."""
        directory = epath.Path(directory)
        if not (directory / META).exists():
            legacy = directory / LEGACY
            return {"legacy": json.loads(legacy.read_text())} if legacy.exists() else None
        state = json.loads((directory / META).read_text())
        if state.get("shares") and args.shares is not None:
            state["share_states"] = {str(r): json.loads((directory / f"share_{r}.json").read_text())
                                     for r in args.shares}
        return state

    def structure(self, directory: epath.Path) -> Any:
        return None

    def metadata(self, directory: epath.Path) -> Any:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: dict[str, Any]


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    shares: list[int] | None = None


def latest_saved_shares(checkpoints: epath.Path | str) -> int | None:
    """The data share count recorded in the newest checkpoint under `checkpoints` (None: none recorded)."""
    root = epath.Path(checkpoints)
    steps = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
    if not steps:
        return None
    try:
        return int(json.loads((root / str(steps[-1]) / "data" / META).read_text()).get("shares") or 0) or None
    except (OSError, ValueError):
        return None
