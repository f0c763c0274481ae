"""`llmjax data prepare`: local workers and Beam's DirectRunner write the same shards; training reads them
without re-tokenizing; truncated or corrupt shards are reported naming the file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from data_helpers import make_cfg, make_corpus

from llmjax.config import ConfigError, SourceConfig
from llmjax.data.prepare.shards import prepare
from llmjax.data.stream.data_module import DataModule
from llmjax.data.stream.sources import PREPARED_META
from llmjax.data.tokenizers import sp_tokenizer
from llmjax.errors import DataError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    cfg = make_cfg(tmp, make_corpus(tmp / "corpus", 50), validation_fraction=0.2)
    meta = prepare(cfg, tmp / "local", workers=2, shards=3)
    return tmp, cfg, meta


def _records(path):
    from array_record.python.array_record_module import ArrayRecordReader

    r = ArrayRecordReader(str(path), "readahead_buffer_size:0")
    return r.read_all()


def test_local_preparation_shards_and_metadata(prepared):
    tmp, cfg, meta = prepared
    out = tmp / "local"
    train = meta["splits"]["train"]
    assert [s["file"] for s in train] == [f"train-{i:05d}-of-00003.array_record" for i in range(3)]
    assert sum(s["documents"] for s in train) + sum(s["documents"] for s in meta["splits"]["validation"]) == 50
    assert not list(out.glob("*.json.tmp*")) and not list(out.glob("*.array_record.json"))
    tok = DataModule(cfg).tokenizer
    (src,) = DataModule(cfg).sources
    docs = [np.frombuffer(b, np.uint16).tolist() for s in train for b in _records(out / s["file"])]
    assert docs == [tok.encode(src.train[i])[0] for i in range(len(src.train))]  # same documents, same order


def test_beam_direct_runner_equals_local_preparation(prepared):
    pytest.importorskip("apache_beam")
    tmp, cfg, meta = prepared
    beam_meta = prepare(cfg, tmp / "beam", shards=3, runner="beam")
    assert {**beam_meta, "runner": "local"} == meta
    for split in ("train", "validation"):
        for s in meta["splits"][split]:
            assert _records(tmp / "beam" / s["file"]) == _records(tmp / "local" / s["file"])


def test_training_reads_prepared_shards_without_tokenizing(prepared, monkeypatch):
    tmp, cfg, _ = prepared
    raw = make_cfg(tmp, None, cache_dir=cfg.data.cache_dir, validation_fraction=0.2)
    raw.data.sources = [SourceConfig(name="c", path=cfg.data.path)]
    ref_dm = DataModule(raw)
    it = ref_dm.train_iterator()
    ref = [next(it) for _ in range(10)]
    it.close()
    monkeypatch.setattr(sp_tokenizer.SentencePieceTokenizer, "encode", lambda *a: pytest.fail("tokenized again"))
    pre = make_cfg(tmp, None, cache_dir=cfg.data.cache_dir)
    pre.data.sources = [SourceConfig(name="c", path=str(tmp / "local"))]
    dm = DataModule(pre)
    assert dm.tokenizer.file_hash() == ref_dm.tokenizer.file_hash()
    it = dm.train_iterator()
    got = [next(it) for _ in range(10)]
    it.close()
    for a, b in zip(ref, got, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_prepared_shard_problems_are_named(prepared, tmp_path):
    tmp, cfg, meta = prepared
    out = tmp_path / "copy"
    shutil.copytree(tmp / "local", out)
    shard = out / meta["splits"]["train"][1]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    bad = make_cfg(tmp_path, out, cache_dir=cfg.data.cache_dir)
    with pytest.raises(ConfigError, match=rf"shard {shard} holds \d+ records where {PREPARED_META} records \d+"):
        DataModule(bad)
    shard.write_bytes(data)
    (out / meta["splits"]["train"][0]["file"]).unlink()
    with pytest.raises(ConfigError, match=r"shard .*train-00000-of-00003\.array_record is missing"):
        DataModule(bad)
    shutil.copyfile(tmp / "local" / meta["splits"]["train"][0]["file"], out / meta["splits"]["train"][0]["file"])
    other = make_cfg(tmp_path, out, cache_dir=cfg.data.cache_dir, tokenizer=str(_other_tokenizer(tmp_path)))
    with pytest.raises(ConfigError, match=r"tokenized with another tokenizer"):
        DataModule(other)
    corrupt = bytearray(data)
    corrupt[1000:1064] = b"\xee" * 64  # inside the records chunk (the index is at the end): a hash mismatch
    shard.write_bytes(bytes(corrupt))
    dm = DataModule(bad)
    with pytest.raises(DataError, match=rf"shard {shard} is corrupt"):
        for i in range(len(dm.sources[0].train)):
            dm.sources[0].train[i]


def _other_tokenizer(tmp_path):
    path = tmp_path / "other.model"
    blob = sp_tokenizer.train_sentencepiece(["some other text to learn from " * 20] * 50, 300, "bpe")
    path.write_bytes(blob)
    return path


def test_prepare_refuses_a_non_empty_output(prepared):
    tmp, cfg, _ = prepared
    with pytest.raises(ConfigError, match=r"OUT: .*local exists and is not an empty directory"):
        prepare(cfg, tmp / "local")
    before = json.loads((tmp / "local" / PREPARED_META).read_text())
    assert before["format"] == 1
