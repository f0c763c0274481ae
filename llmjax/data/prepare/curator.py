"""One document through the configured curation stages (`curate.stages`, in order).

Each removal is one *reason*: a dedup stage, or the quality stage with the filter that failed.
Documents are curated in two passes when a dedup stage is configured (dedup is global):

1. `Curator.scan` (in the workers, per shard task): the text each stage sees (after the `pii`
   stage if it comes first), the first filter it fails, its exact hash and MinHash signature;
2. `Curator.decide` (once, in corpus order, `llmjax.data.prepare.curate_pass`): the reason each
   document is removed for, or 0; then `Curator.apply` (in the workers, writing the shards)
   replays the stages with those decisions, scrubs what is kept and fills the report.

Without a dedup stage, `apply` alone decides (decision None: the filters run there). The codes are
`reasons` indices + 1 (uint8).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from llmjax.config.curation import CurateConfig
from llmjax.data.prepare.dedup import ExactIndex, NearIndex, Signer, exact_key
from llmjax.data.prepare.pii import PLACEHOLDERS, PiiScrubber
from llmjax.data.prepare.quality import QualityFilters
from llmjax.data.prepare.report import add_example

DEDUP_STAGES = ("exact_dedup", "near_dedup")
Scan = tuple[int, bytes | None, npt.NDArray[np.uint32] | None]  # (filter code or 0, exact hash, signature)


class Curator:
    """The stages of `cfg` and what they need (scrubber, filters, signer), built once per worker."""

    def __init__(self, cfg: CurateConfig):
        self.cfg = cfg
        self.stages = list(cfg.stages)
        self.pii = PiiScrubber(cfg.pii.kinds)
        self.quality = QualityFilters(cfg.quality)
        self.signer = Signer(cfg.near_dedup) if "near_dedup" in self.stages else None
        self.reasons: list[tuple[str, str | None]] = []
        for stage in self.stages:
            if stage == "quality":
                self.reasons += [("quality", f) for f in self.quality.names]
            elif stage in DEDUP_STAGES:
                self.reasons.append((stage, None))

    @property
    def global_pass(self) -> bool:
        """True if a dedup stage needs the scan and the decision before the shards are written."""
        return any(s in DEDUP_STAGES for s in self.stages)

    def code(self, stage: str, name: str | None = None) -> int:
        return self.reasons.index((stage, name)) + 1

    def scan(self, text: str) -> Scan:
        """What the decision needs of one document (pass 1)."""
        key = sig = None
        for stage in self.stages:
            if stage == "pii":
                text, _ = self.pii.scrub(text)
            elif stage == "quality":
                failed = self.quality.check(text)
                if failed is not None:
                    return self.code("quality", failed), key, sig
            elif stage == "exact_dedup":
                key = exact_key(text)
            elif stage == "near_dedup" and self.signer is not None:
                sig = self.signer.signature(text)
        return 0, key, sig

    def decide(self, scans: Iterable[Scan]) -> npt.NDArray[np.uint8]:
        """The code of every document of the corpus, given in corpus order, as uint8 [documents]; the first of
        each group of duplicates (among the documents that reach the stage) is kept. Call once per corpus."""
        exact = ExactIndex()
        near = NearIndex(self.cfg.near_dedup) if "near_dedup" in self.stages else None
        codes = []
        for filtered, key, sig in scans:
            code = 0
            for stage in self.stages:
                if stage == "quality" and filtered:
                    code = filtered
                elif stage == "exact_dedup" and key is not None and exact.is_duplicate(key):
                    code = self.code(stage)
                elif stage == "near_dedup" and near is not None and near.is_duplicate(sig):
                    code = self.code(stage)
                if code:
                    break
            codes.append(code)
        return np.asarray(codes, dtype=np.uint8)

    def apply(self, text: str, decision: int | None, report: dict[str, Any], **where: Any) -> str | None:
        """The document as written (scrubbed), or None if a stage removes it; counts it in `report` (pass 2).
        `decision`: its code from `decide`, or None to run the filters here (no dedup stage)."""
        report["documents_in"] += 1
        size = len(text.encode("utf-8"))
        report["bytes_in"] += size
        for stage in self.stages:
            entry = report["stages"][stage]
            if stage == "pii":
                scrubbed, counts = self.pii.scrub(text)
                if counts:
                    new_size = len(scrubbed.encode("utf-8"))
                    entry["documents"] += 1
                    entry["bytes"] += size - new_size
                    for kind, n in counts.items():
                        entry["by"][kind] = entry["by"].get(kind, 0) + n
                    first = min(i for i in (scrubbed.find(p) for p in PLACEHOLDERS.values()) if i >= 0)
                    add_example(entry, self.cfg.examples, scrubbed, first, **where)
                    text, size = scrubbed, new_size
                continue
            if stage == "quality":
                failed = self.quality.check(text) if decision is None else self._filter(decision)
                removed = failed is not None
            else:
                failed, removed = None, decision is not None and decision == self.code(stage)
            if removed:
                entry["documents"] += 1
                entry["bytes"] += size
                if failed is not None:
                    entry["by"][failed] = entry["by"].get(failed, 0) + 1
                info = {**where, "filter": failed} if failed else where
                add_example(entry, self.cfg.examples, text, 0, **info)
                return None
        report["documents_out"] += 1
        report["bytes_out"] += size
        return text

    def _filter(self, decision: int) -> str | None:
        if not decision:
            return None
        stage, name = self.reasons[decision - 1]
        return name if stage == "quality" else None
