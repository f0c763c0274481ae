"""The data stream: packing, the LM objective, record order, shares, mixtures, resume (bitwise), workers."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from data_helpers import EOS, FAKE_TOKENIZER, make_cfg, make_corpus, spec, token_source

from llmjax.config import SourceConfig
from llmjax.data.stream.data_module import DataModule, _from_json
from llmjax.data.stream.grain_pipeline import record_stream, share_batches, source_rows
from llmjax.data.stream.row_objectives import NextToken, example_spec

# ----------------------------------------------------------------------------- packing


def _segments(row):
    """(tokens, positions) of each segment of a packed row (segment id > 0), in order."""
    seg = row["segment_ids"]
    return [(row["tokens"][seg == s], row["positions"][seg == s]) for s in np.unique(seg[seg > 0])]


@pytest.mark.parametrize("packing", ["concat", "best_fit"])
def test_packing_keeps_every_token_once_and_never_mixes_documents(packing):
    src = token_source(60, max_len=45)  # documents up to 2.6 rows long: split across rows
    s = spec(packing=packing, shuffle=False)
    rows = list(source_rows(src, 0, src.train, FAKE_TOKENIZER, s, 0, train=False))
    expected = Counter(t for (d,) in src.train for t in [*d.tolist(), EOS])
    got = Counter(int(t) for r in rows for t in r["tokens"][r["segment_ids"] > 0])
    assert got == expected  # one pass = one epoch: every token (and each EOS) exactly once
    for r in rows:
        assert r["tokens"].shape == r["segment_ids"].shape == r["positions"].shape == (17,)
        assert (r["tokens"][r["segment_ids"] == 0] == 0).all()
        for tokens, positions in _segments(r):
            body = tokens[tokens != EOS]
            assert len({int(t) // 1000 for t in body}) <= 1  # one document per segment
            assert (np.diff(body) == 1).all()  # a contiguous piece of it
            assert list(positions) == list(range(len(tokens)))
            assert EOS not in tokens[:-1]  # EOS only ends a document
    if packing == "concat":
        assert all((r["segment_ids"] > 0).all() for r in rows[:-1])  # no padding but in the last row


def test_language_modeling_objective_known_values():
    row = {"tokens": np.array([5, 6, 3, 7, 3, 8, 9, 0, 0], np.int32),
           "segment_ids": np.array([1, 1, 1, 2, 2, 3, 3, 0, 0], np.int32),
           "positions": np.array([0, 1, 2, 0, 1, 0, 1, 0, 0], np.int32)}
    f = NextToken()(row, np.random.default_rng(0))
    assert f["inputs"].tolist() == [5, 6, 3, 7, 3, 8, 9, 0]
    assert f["targets"].tolist() == [6, 3, 7, 3, 8, 9, 0, 0]
    assert f["segment_ids"].tolist() == [1, 1, 1, 2, 2, 3, 3, 0]
    assert f["positions"].tolist() == [0, 1, 2, 0, 1, 0, 1, 0]
    assert f["weights"].tolist() == [1, 1, 0, 1, 0, 1, 0, 0]  # no target across a document or into padding
    assert example_spec(NextToken(), 8) == {
        "inputs": ((8,), np.int32), "targets": ((8,), np.int32), "segment_ids": ((8,), np.int32),
        "positions": ((8,), np.int32), "weights": ((8,), np.float32)}


# ----------------------------------------------------------------------------- record order and shares


def test_each_epoch_reads_every_record_once_split_over_shares():
    n, shares = 23, 2
    s = spec(shares=shares)
    streams = [record_stream(list(range(n)), "x", s, r, train=True) for r in range(shares)]
    flat = [streams[g % shares][g // shares][1] for g in range(4 * n)]  # global position g = j * shares + r
    assert all(i == rec for i, rec in (streams[0][j] for j in range(n)))  # (record index, record)
    epochs = [flat[e * n:(e + 1) * n] for e in range(4)]
    assert all(sorted(ep) == list(range(n)) for ep in epochs)
    assert len({tuple(ep) for ep in epochs}) == 4  # a new permutation each epoch
    other = [record_stream(list(range(n)), "x", spec(shares=shares, seed=1), 0, True)[j] for j in range(n)]
    assert other != [streams[0][j] for j in range(n)]
    ordered = [record_stream(list(range(n)), "x", spec(shuffle=False), 0, True)[j][1] for j in range(2 * n)]
    assert ordered == [j % n for j in range(2 * n)]


def _batches(dm, k, state=None):
    it = dm.train_iterator(state)
    out = [next(it) for _ in range(k)]
    st = it.get_state()
    it.close()
    return out, st


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    return tmp, make_corpus(tmp / "corpus", 60)


def test_global_batch_does_not_depend_on_the_process_count(corpus):
    """Default settings (data.shares unset): process p of 2, 4 or 8 reads only its own shares, and their rows
    in process order are the global batch of one process."""
    tmp, root = corpus
    cfg = make_cfg(tmp, root)
    cfg.train.batch_size = 8
    ref, _ = _batches(DataModule(cfg), 5)
    for procs in (2, 4, 8):
        assert DataModule(cfg, procs - 1, procs).local_shares == list(range(8 - 8 // procs, 8))
        parts = [_batches(DataModule(cfg, p, procs), 5)[0] for p in range(procs)]
        for k in range(5):
            for key in ref[k]:
                assert np.array_equal(np.concatenate([parts[p][k][key] for p in range(procs)]), ref[k][key])
    again, _ = _batches(DataModule(cfg), 5)
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(ref, again, strict=True))
    cfg.seed = 1
    other, _ = _batches(DataModule(cfg), 5)
    assert not all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(ref, other, strict=True))


@pytest.mark.parametrize("packing", ["concat", "best_fit"])
def test_resume_mid_epoch_is_bitwise(corpus, packing):
    tmp, root = corpus
    dm = DataModule(make_cfg(tmp, root, packing=packing, shuffle_window=16))
    ref, _ = _batches(dm, 30)
    for k in (1, 7, 13):  # inside the first row window, later windows, several epochs of small rows
        _, state = _batches(dm, k)
        state = json.loads(json.dumps(state))  # as stored in the checkpoint
        rest, _ = _batches(dm, 30 - k, state)
        for a, b in zip(ref[k:], rest, strict=True):
            assert all(np.array_equal(a[key], b[key]) for key in a), (packing, k)


@pytest.mark.slow  # 8 s cold on 2 cores: grain worker processes
def test_workers_give_the_same_batches_and_resume_bitwise(corpus):
    """2 shares x 2 workers: 4 worker processes per iterator (each imports jax and grain), not the 8 of the
    default 4 shares at batch 4."""
    tmp, root = corpus
    ref, _ = _batches(DataModule(make_cfg(tmp, root, shares=2)), 12)
    dm = DataModule(make_cfg(tmp, root, workers=2, shares=2))
    got, state = _batches(dm, 5)
    rest, _ = _batches(dm, 7, json.loads(json.dumps(state)))
    for a, b in zip(ref, got + rest, strict=True):
        assert all(np.array_equal(a[key], b[key]) for key in a)


def test_eval_batches_are_fixed_and_split_by_process(corpus):
    tmp, root = corpus
    cfg = make_cfg(tmp, root, shares=2, validation_fraction=0.3)
    cfg.eval.batches = 3
    dm = DataModule(cfg)
    evals = list(dm.eval_batches())
    assert len(evals) == 3 and all(b["inputs"].shape == (4, 8) for b in evals)
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(evals, dm.eval_batches(), strict=True))
    half = next(DataModule(cfg, 1, 2).eval_batches())
    assert np.array_equal(half["targets"], evals[0]["targets"][2:])


# ----------------------------------------------------------------------------- mixtures


def test_mixture_proportions_follow_the_weights(tmp_path):
    a = make_corpus(tmp_path / "a", 30, "web")
    b = make_corpus(tmp_path / "b", 30, "code")
    cfg = make_cfg(tmp_path, shuffle_window=64)
    cfg.data.sources = [SourceConfig(name="web", path=str(a), weight=7.0), SourceConfig(name="code", path=str(b),
                                                                                        weight=3.0)]
    cfg.data.seq_len = 32
    cfg.train.batch_size = 8
    dm = DataModule(cfg)
    assert [s.weight for s in dm.sources] == pytest.approx([0.7, 0.3])
    it = dm.train_iterator()
    for _ in range(150):
        next(it)
    fractions = it.source_fractions()
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    assert fractions["web"] == pytest.approx(0.7, abs=0.02) and fractions["code"] == pytest.approx(0.3, abs=0.02)
    resumed = dm.train_iterator(state)
    assert resumed.source_fractions() == fractions
    resumed.close()


def test_from_json_restores_grain_tuples():
    state = {"a": [{"remainder_slices": {"tokens": [-1, -1]}}], "b": 1}
    assert _from_json(state) == {"a": [{"remainder_slices": {"tokens": (-1, -1)}}], "b": 1}


def test_share_batches_shapes():
    src = token_source(40)
    ds = share_batches([src], FAKE_TOKENIZER, NextToken(), spec(global_batch=4, shares=2), 1, True)
    b = next(iter(ds))
    assert b["inputs"].shape == (2, 16) and b["weights"].dtype == np.float32 and b["_source"].tolist() == [0, 0]
