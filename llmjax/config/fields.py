"""Declaring config keys: a default, a one-line description and a range, next to the field.

`option(default, "what it means", gt=0)` is a `dataclasses.field` whose metadata holds the
description (`llmjax config show` prints it) and the allowed range (`validate` checks it
for every key generically). Integer keys are also bounded to 32 bits unless they declare a
wider range, so values such as `train.steps=1e30` are refused with the key named instead of
overflowing later. String keys must not be empty unless declared `allow_empty=True` (an empty
`data.path=` would otherwise mean "unset" silently); an optional key is unset with `null`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a numeric key; None: unbounded on that side. `*_open`: the bound itself is excluded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def contains(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def describe(self, show_int32: bool = True) -> str:
        """'> 0', '>= 1', 'in [0, 1)', '<= 5', or '' when unbounded. `show_int32=False` leaves out the implicit
        32-bit bounds of integer keys (for listings)."""
        if not show_int32:
            lo = None if self.lo == -INT32_MAX - 1 else self.lo
            hi = None if self.hi == INT32_MAX else self.hi
            return Range(lo, hi, self.lo_open, self.hi_open).describe()
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return ""


def _num(x: float) -> str:
    if isinstance(x, int) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e16):
        n = int(x)
        return "2^31 - 1" if n == INT32_MAX else f"{n}"
    return f"{x:g}"


def option(
    default: Any = dataclasses.MISSING,
    doc: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    allow_empty: bool = False,
) -> Any:
    """A config key: `default` (or `factory` for mutable defaults), its description and range.

    `ge`/`gt`/`le`/`lt`: inclusive/exclusive lower/upper bounds. `allow_empty`: an empty
    string is a meaningful value of this string key.
    """
    if ge is not None and gt is not None or le is not None and lt is not None:
        raise ValueError("give at most one lower bound (ge/gt) and one upper bound (le/lt)")
    lo, hi = (gt if gt is not None else ge), (lt if lt is not None else le)
    metadata = {"doc": doc, "range": Range(lo, hi, gt is not None, lt is not None), "allow_empty": allow_empty}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type, doc: str) -> Any:
    """A nested config section (a dataclass), with a description."""
    return dataclasses.field(default_factory=cls, metadata={"doc": doc})


def doc_of(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("doc", ""))


def range_of(f: dataclasses.Field[Any], tp: Any) -> Range:
    """The declared range of field `f` of type `tp`. Integer ranges are closed (`gt=0` reads `>= 1`) and
    bounded to 32 bits unless they declare a wider range."""
    r = f.metadata.get("range") or Range()
    if tp is not int:
        return r
    lo = -INT32_MAX - 1 if r.lo is None else int(r.lo) + 1 if r.lo_open else int(r.lo)
    hi = INT32_MAX if r.hi is None else int(r.hi) - 1 if r.hi_open else int(r.hi)
    return Range(lo, hi)


def allows_empty(f: dataclasses.Field[Any]) -> bool:
    return bool(f.metadata.get("allow_empty", False))


def check_range(key: str, value: Any, r: Range) -> str | None:
    """None if `value` is in `r`, else the error message naming `key`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key}={value} must be a finite number"
    if r.contains(value):
        return None
    return f"{key}={value} must be {r.describe()}"
