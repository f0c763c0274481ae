"""`llmjax bench`: warm-up, rounds with their median and range, the machine's load, `--json`, `--profile`."""

from __future__ import annotations

import json
import math

import pytest
from helpers import tiny_config

from llmjax.bench import measure, report, spread


def test_spread_is_median_and_range():
    assert spread([3.0, 1.0, 2.0, 10.0, 2.5]) == {"median": 2.5, "min": 1.0, "max": 10.0}


@pytest.mark.slow
def test_bench_reports_rounds_load_and_profile():
    cfg = tiny_config("mesh.data=-1")  # the 8 test devices
    setup, r = measure(cfg, steps=2, rounds=3, warmup=1, profile=True)
    r = json.loads(json.dumps(r))  # what --json prints
    step = r["step_s"]
    assert len(step["rounds"]) == 3 and r["rounds"] == 3 and r["warmup"] == 1
    assert step["min"] <= step["median"] <= step["max"] and step["median"] in step["rounds"]
    tokens = cfg.train.batch_size * cfg.data.seq_len
    assert math.isclose(r["tokens_per_s"]["median"], tokens / step["median"], rel_tol=1e-9)
    assert math.isclose(r["tokens_per_s"]["max"], tokens / step["min"], rel_tol=1e-9)
    assert len(r["load_before"]) == 3 and len(r["load_after"]) == 3
    assert r["machine"]["cpu"] and r["machine"]["jax"]
    assert r["machine"]["malloc"] in ("system", "tcmalloc")
    assert math.isfinite(r["final_loss"])
    # the breakdown: shares add up to the whole, and the name scopes the step sets reach the compiled ops
    shares = {row["category"]: row["share"] for row in r["profile"]}
    assert math.isclose(sum(shares.values()), 1.0, rel_tol=1e-6)
    for category in ("matmul", "attention", "loss", "optimizer", "lm_head"):
        assert shares[category] > 0, category
    assert set(r["host"]) == {"batch transfer (put_batch)", "metric read (float(loss))"}
    text = "\n".join(report(cfg, setup, r))
    assert "over 3 rounds of 2 steps (after 1 warm-up steps)" in text
    assert "load average (1/5/15 min)" in text and "where the step time goes" in text and "host: batch" in text
