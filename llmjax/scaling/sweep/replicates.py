"""Seeds as replicates: a spec's `replicates: R` trains every point R times, with R seeds.

Replicate r of a point is the point's config with every seed key raised by r: each config field
named `seed` or ending in `_seed`, at any depth (today only the top-level `seed`, which seeds both
the initialisation and the data order; a separate data-order seed added later is found the same
way). Nothing else differs between the replicates of a point.

Replicate 0 is the point itself: same name, same overrides, same seeds as with `replicates: 1`
(the default). Replicate r > 0 is named `<point>_r<r>` and carries explicit `KEY=VALUE` overrides
for every seed key, so `sweep run --dry-run` shows each run's seed and no two replicates share a
directory. A spec that adds `replicates: R` to a sweep already trained into the same directory
therefore reuses its runs as replicate 0 and trains only the R - 1 new seeds per point.

`sweep collect` writes a `replicate` and a `seed` column and, in `point`, the name shared by the
replicates of one point; `llmjax fit` averages the loss over them (`scaling/laws/runs.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llmjax.scaling import ScalingError

SEED_SUFFIX = "_seed"


def parse_replicates(value: Any, where: str) -> int:
    """The spec's `replicates` (default 1): a positive integer."""
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ScalingError(f"sweep spec {where}: 'replicates' must be a positive integer, got {value!r}")
    return value


def seed_keys(cfg: Any, prefix: str = "") -> dict[str, int]:
    """Every integer seed field of a config dataclass (`seed`, `*_seed`, at any depth) -> its value."""
    out: dict[str, int] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(seed_keys(value, key + "."))
        elif (f.name == "seed" or f.name.endswith(SEED_SUFFIX)) and isinstance(value, int) \
                and not isinstance(value, bool):
            out[key] = value
    return out


def replicate_overrides(cfg: Any, replicate: int) -> list[str]:
    """`KEY=VALUE` overrides that give replicate `replicate` of the point whose config is `cfg` (none for 0)."""
    return [f"{k}={v + replicate}" for k, v in seed_keys(cfg).items()] if replicate else []


def replicate_name(name: str, replicate: int) -> str:
    """The run directory name of a replicate: the point's own name for replicate 0."""
    return f"{name}_r{replicate}" if replicate else name


__all__ = ["parse_replicates", "replicate_name", "replicate_overrides", "seed_keys"]
