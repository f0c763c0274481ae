"""The curation report of `llmjax data prepare`: counts per stage, examples, merged over shards, as JSON and a table.

A report is a plain dict (it travels as JSON in the shards' sidecars): `documents_in`, `bytes_in`
(UTF-8), one entry per stage in `stages` (in order: `documents` removed, or changed for `pii`;
`bytes` removed, for `pii` the bytes its placeholders saved, negative if they are longer; `by`:
counts per filter or per PII kind; `examples`: the first removed or changed documents in corpus
order, cut to `SNIPPET` characters), then `documents_out` and `bytes_out` (what was tokenized). By
construction `documents_in = sum of documents removed + documents_out` and
`bytes_in = sum of bytes + bytes_out`; `check` verifies it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SNIPPET = 300  # characters of an example kept in the report


def new_report(stages: Sequence[str]) -> dict[str, Any]:
    """An empty report for `stages`."""
    return {"documents_in": 0, "bytes_in": 0,
            "stages": {s: {"documents": 0, "bytes": 0, "by": {}, "examples": []} for s in stages},
            "documents_out": 0, "bytes_out": 0}


def add_example(entry: dict[str, Any], limit: int, text: str, at: int = 0, **where: Any) -> None:
    """Quote `text` (SNIPPET characters, from a little before character `at`) in a stage's examples while it holds
    fewer than `limit`."""
    if len(entry["examples"]) < limit:
        start = max(0, at - SNIPPET // 3)
        entry["examples"].append({**where, "text": ("..." if start else "") + text[start:start + SNIPPET]})


def merge(reports: Sequence[dict[str, Any]], limit: int) -> dict[str, Any]:
    """The sum of the shards' reports, given in corpus order; the first `limit` examples of each stage."""
    out = new_report(list(reports[0]["stages"]) if reports else [])
    for r in reports:
        for k in ("documents_in", "bytes_in", "documents_out", "bytes_out"):
            out[k] += r[k]
        for stage, entry in r["stages"].items():
            total = out["stages"][stage]
            total["documents"] += entry["documents"]
            total["bytes"] += entry["bytes"]
            for name, n in entry["by"].items():
                total["by"][name] = total["by"].get(name, 0) + n
            total["examples"] = (total["examples"] + entry["examples"])[:limit]
    return out


def check(report: dict[str, Any]) -> None:
    """Raise RuntimeError if the report's counts do not add up (a bug, never a user error)."""
    stages = report["stages"].items()
    removed = sum(e["documents"] for s, e in stages if s != "pii")
    if (report["documents_in"] != removed + report["documents_out"]
            or report["bytes_in"] != sum(e["bytes"] for _, e in stages) + report["bytes_out"]):
        raise RuntimeError(f"curation report: the counts do not add up: {report}")


def table(report: dict[str, Any]) -> str:
    """The report as one aligned text table: a row per stage, then what went in and came out."""
    rows = [("stage", "documents", "bytes", "details"),
            ("in", f"{report['documents_in']:,}", f"{report['bytes_in']:,}", "")]
    for stage, e in report["stages"].items():
        docs = f"{e['documents']:,} changed" if stage == "pii" else _minus(e["documents"])
        by = ", ".join(f"{k} {v:,}" for k, v in sorted(e["by"].items(), key=lambda kv: (-kv[1], kv[0])))
        rows.append((stage, docs, _minus(e["bytes"]), by))
    rows.append(("out", f"{report['documents_out']:,}", f"{report['bytes_out']:,}", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip() for r in rows)


def _minus(n: int) -> str:
    """A count removed: '-1,234', '0', or '+12' when the stage added (placeholders longer than what they replace)."""
    return f"-{n:,}" if n > 0 else f"+{-n:,}" if n < 0 else "0"
