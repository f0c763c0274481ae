"""Throughput of `llmjax data prepare` with curation on and off, and what each curation stage costs.

    python3 benchmarks/curation_throughput.py [OUT_ROOT] [section.key=value ...]

On the config's corpus (default: the default corpus, the standard library's .py files), in this
process with one worker: (1) each stage alone over every document (`Curator` in isolation:
exact hashes, MinHash signatures and the LSH decision, the default quality filters, PII
scrubbing), in MB/s of input; (2) the whole `data prepare` (one worker, one shard) with
curation off and with every stage on, in MB/s per worker (input bytes over wall time; the
tokenizer is trained once beforehand and cached, so neither run trains it). A benchmark, not a
test: report it with the machine's load (`uptime`, printed before and after).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from llmjax.config import load_config
from llmjax.config.curation import CurateConfig
from llmjax.data.prepare.curator import Curator
from llmjax.data.prepare.report import new_report
from llmjax.data.prepare.shards import plan, prepare
from llmjax.data.stream.sources import resolve_sources

STAGES = ["exact_dedup", "near_dedup", "quality", "pii"]


def _documents(cfg: Any) -> list[str]:
    (source,) = resolve_sources(cfg)
    return [d for split in (source.train, source.validation) for i in range(len(split)) for d in split[i] if d]


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/curation_bench")
    cfg = load_config(None, sys.argv[2:])
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)
    shutil.rmtree(root, ignore_errors=True)
    plan(cfg, root / "tokenizer_only")  # trains and caches the tokenizer outside the timings
    docs = _documents(cfg)
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    print(f"corpus: {len(docs):,} documents, {mb:.1f} MB", flush=True)
    for stage in STAGES:
        curator = Curator(CurateConfig(stages=[stage]))  # type: ignore[list-item]
        t0 = time.perf_counter()
        if stage in ("exact_dedup", "near_dedup"):
            scans = [curator.scan(d) for d in docs]
            t_scan = time.perf_counter() - t0
            removed = int((curator.decide(scans) > 0).sum())
            t_decide = time.perf_counter() - t0 - t_scan
            print(f"{stage:12s} {mb / (t_scan + t_decide):7.1f} MB/s  (scan {t_scan:.1f} s in the workers, "
                  f"decision {t_decide:.2f} s once; removes {removed:,})", flush=True)
        else:
            report = new_report([stage])
            for d in docs:
                curator.apply(d, None, report)
            t = time.perf_counter() - t0
            print(f"{stage:12s} {mb / t:7.1f} MB/s  ({t:.1f} s; documents {'changed' if stage == 'pii' else 'removed'} "
                  f"{report['stages'][stage]['documents']:,})", flush=True)
    for label, stages in (("off", []), ("all four stages", STAGES)):
        cfg.curate = CurateConfig(stages=stages)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        prepare(cfg, root / label.replace(" ", "_"), workers=1, shards=1)
        t = time.perf_counter() - t0
        print(f"data prepare, curation {label}: {t:.1f} s, {mb / t:.2f} MB/s per worker", flush=True)
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
