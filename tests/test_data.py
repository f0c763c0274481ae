"""Tests of the data layer: tokenizer, sources (local / TFDS), packing, order, sharding, resume, caches, errors."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from llmjax.config import Config, ConfigError
from llmjax.data import pipeline, sources, tokenizer
from llmjax.data.pipeline import BatchIterator, DataModule, PackedRows, row_features, train_dataset
from llmjax.data.sources import list_local_files, list_stdlib_files, load_corpus
from llmjax.data.tokenizer import Tokenizer, load_or_train_tokenizer

VOCAB = 384
ROUND_TRIP = "def f(x):\n\tif x:\t  # tab\n        return 'é 漢字 🎉'   \n\n\n  \t\n"


def _doc(i: int) -> str:
    lines = [f"def func_{i}_{j}(value_{j}):\n\treturn value_{j} * {i + j}  # note {j}\n" for j in range(i % 5 + 1)]
    return f"# module {i}: café 漢字\n" + "".join(lines) + ("\n" * (i % 3))


def make_corpus(root: Path, n: int = 40) -> Path:
    """A directory of n small .py documents (plus a file with an ignored extension)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"mod_{i:03d}.py").write_text(_doc(i), encoding="utf-8")
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    return root


def make_cfg(tmp_path: Path, data_path: Path | None = None, **data: object) -> Config:
    cfg = Config()
    cfg.model = dataclasses.replace(cfg.model, vocab_size=VOCAB)  # ModelConfig is frozen
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.path = str(data_path) if data_path else None
    cfg.data.seq_len = 8
    cfg.data.validation_fraction = 0.1
    cfg.train.batch_size = 4
    cfg.eval.every_steps = 0
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> tuple[Config, DataModule]:
    """One DataModule over a small corpus, shared by the read-only tests."""
    tmp = tmp_path_factory.mktemp("shared")
    cfg = make_cfg(tmp, make_corpus(tmp / "corpus"))
    cfg.eval.every_steps = 10
    return cfg, DataModule(cfg)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_specials(shared):
    _, dm = shared
    tok = dm.tokenizer
    assert tok.decode(tok.encode([ROUND_TRIP])[0]) == ROUND_TRIP
    for text in ["", " ", "\n", "x\r\ny", "  leading", "trailing  \n\n"]:
        assert tok.decode(tok.encode([text])[0]) == text
    assert len({tok.eos_id, tok.bos_id, tok.pad_id}) == 3 and min(tok.eos_id, tok.bos_id, tok.pad_id) >= 0
    assert tok.vocab_size <= VOCAB
    assert tok.encode(["a", "b"]) == [tok.encode(["a"])[0], tok.encode(["b"])[0]]


def test_user_tokenizer_errors(shared, tmp_path):
    cfg, dm = shared
    bad = make_cfg(tmp_path, tokenizer=str(tmp_path / "missing.model"))
    with pytest.raises(ConfigError, match=r"data\.tokenizer.*missing\.model"):
        load_or_train_tokenizer(bad, None)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match=r"data\.tokenizer.*junk\.model"):
        load_or_train_tokenizer(make_cfg(tmp_path, tokenizer=str(junk)), None)
    small = make_cfg(tmp_path, tokenizer=dm.tokenizer.path)
    small.model = dataclasses.replace(small.model, vocab_size=300)
    with pytest.raises(ConfigError, match=r"data\.tokenizer.*model\.vocab_size=300"):
        load_or_train_tokenizer(small, None)
    ok = load_or_train_tokenizer(make_cfg(tmp_path, tokenizer=dm.tokenizer.path), None)
    assert ok.vocab_size == dm.tokenizer.vocab_size


def test_tokenizer_sample_is_deterministic_and_bounded():
    docs = [_doc(i) * 3 for i in range(30)]
    a = tokenizer.sample_training_text(docs, 2000)
    assert a == tokenizer.sample_training_text(docs, 2000)
    assert 0 < sum(len(s.encode()) for s in a) <= 2000
    assert "".join(tokenizer._chunks(docs[4] * 200)) == docs[4] * 200


# ----------------------------------------------------------------------------- packing


def test_packing_segments_positions(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    texts = ["alpha beta\n", "x = 1\n\n", "é漢字🎉\tend", "z", "def g():\n    pass\n"] * 3
    for i, t in enumerate(texts):
        (root / f"d{i:02d}.txt").write_text(t, encoding="utf-8")
    cfg = make_cfg(tmp_path, root, validation_fraction=0.0, shuffle=False, seq_len=5)
    cfg.train.batch_size = 2
    dm = DataModule(cfg)
    tok = dm.tokenizer
    stream = [t for text in texts for t in tok.encode([text])[0] + [tok.eos_id]]
    assert dm.num_train_tokens == len(stream)
    assert dm.num_train_rows == (len(stream) - 1) // 5
    it = dm.train_iterator()
    batches = [next(it) for _ in range(dm.num_train_rows // 2)]
    inputs = np.concatenate([b["inputs"] for b in batches]).reshape(-1)
    targets = np.concatenate([b["targets"] for b in batches]).reshape(-1)
    n = len(inputs)
    assert inputs.tolist() == stream[:n]
    assert targets.tolist() == stream[1:n + 1]
    for b in batches:
        assert set(b) == {"inputs", "targets", "segment_ids", "positions", "weights"}
        assert all(v.shape == (2, 5) for v in b.values())
        assert b["weights"].dtype == np.float32 and (b["weights"] == 1).all()
        for key in ("inputs", "targets", "segment_ids", "positions"):
            assert b[key].dtype == np.int32
        for row_in, seg, pos in zip(b["inputs"], b["segment_ids"], b["positions"], strict=True):
            exp_seg, exp_pos, s, p = [], [], 1, 0
            for t in row_in:
                exp_seg.append(s)
                exp_pos.append(p)
                s, p = (s + 1, 0) if t == tok.eos_id else (s, p + 1)
            assert seg.tolist() == exp_seg and pos.tolist() == exp_pos
    # reconstruct document texts from the stream between EOS tokens
    full = np.asarray(stream)
    ends = np.flatnonzero(full == tok.eos_id)
    assert len(ends) == len(texts)
    assert tok.decode(full[ends[0] + 1:ends[1]]) == texts[1]


def test_row_features_known_values():
    row = np.array([5, 6, 3, 7, 3, 3, 8, 9, 4], dtype=np.int32)  # eos = 3, L = 8
    f = row_features(row, 3)
    assert f["inputs"].tolist() == [5, 6, 3, 7, 3, 3, 8, 9]
    assert f["targets"].tolist() == [6, 3, 7, 3, 3, 8, 9, 4]
    assert f["segment_ids"].tolist() == [1, 1, 1, 2, 2, 3, 4, 4]
    assert f["positions"].tolist() == [0, 1, 2, 0, 1, 0, 0, 1]


# ----------------------------------------------------------------------------- order, sharding, resume


class _IdRows:
    """Fake rows: row i is [i] * (L + 1), so inputs[:, 0] recovers the row id."""

    def __init__(self, n: int, seq_len: int = 4):
        self.n, self.seq_len = n, seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> np.ndarray:
        return np.full(self.seq_len + 1, i, dtype=np.int32)


def _ids(seed: int, n_rows: int, batch: int, steps: int, p: int = 0, procs: int = 1, shuffle: bool = True,
         start: int = 0) -> list[list[int]]:
    ds = train_dataset(_IdRows(n_rows), -1, seed, shuffle, batch, p, procs)
    it = BatchIterator(ds, start)
    return [next(it)["inputs"][:, 0].tolist() for _ in range(steps)]


def test_determinism_and_seed():
    a = _ids(0, 37, 4, 30)
    assert a == _ids(0, 37, 4, 30)
    assert a != _ids(1, 37, 4, 30)


def test_process_count_independence():
    ref = _ids(3, 37, 8, 25)
    for procs in (2, 4, 8):
        parts = [_ids(3, 37, 8, 25, p, procs) for p in range(procs)]
        merged = [sum((parts[p][k] for p in range(procs)), []) for k in range(25)]
        assert merged == ref, procs


def test_epochs_are_permutations_and_wrap():
    n, batch = 12, 4  # 3 steps per epoch
    flat = sum(_ids(5, n, batch, 12), [])
    epochs = [flat[e * n:(e + 1) * n] for e in range(4)]
    for ep in epochs:
        assert sorted(ep) == list(range(n))
    assert len({tuple(ep) for ep in epochs}) > 1
    flat = sum(_ids(5, 10, 4, 5, shuffle=False), [])  # epoch boundary falls inside a batch
    assert flat == [i % 10 for i in range(20)]


def test_resume_set_state_and_start_step():
    ds = train_dataset(_IdRows(23), -1, 7, True, 4, 1, 2)
    full = BatchIterator(ds)
    seq = [next(full)["inputs"][:, 0].tolist() for _ in range(12)]
    it = BatchIterator(ds)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["step"] == 5
    resumed = BatchIterator(ds)
    resumed.set_state(state)
    assert [next(resumed)["inputs"][:, 0].tolist() for _ in range(7)] == seq[5:]
    assert _ids(7, 23, 4, 7, 1, 2, start=5) == seq[5:]
    late = BatchIterator(ds, start_step=9)
    late.set_state(state)  # a saved state wins over start_step
    assert next(late)["inputs"][:, 0].tolist() == seq[5]


def test_datamodule_sharding_resume_eval(shared):
    cfg, dm = shared
    it = dm.train_iterator()
    ref = [next(it) for _ in range(6)]
    halves = [DataModule(cfg, p, 2) for p in range(2)]
    for p, half in enumerate(halves):
        it = half.train_iterator(start_step=2)
        for k in range(2, 6):
            b = next(it)
            assert np.array_equal(b["inputs"], ref[k]["inputs"][p * 2:(p + 1) * 2])
            assert np.array_equal(b["segment_ids"], ref[k]["segment_ids"][p * 2:(p + 1) * 2])
    evals = list(dm.eval_batches())
    assert len(evals) == min(cfg.eval.batches, dm.num_eval_rows // cfg.train.batch_size) > 0
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(evals, dm.eval_batches(), strict=True))
    first = next(halves[1].eval_batches())
    assert np.array_equal(first["targets"], evals[0]["targets"][2:4])
    rows = PackedRows(np.arange(20, dtype=np.int32), 9, 8)  # next-token rows: seq_len + 1 tokens every seq_len
    assert len(rows) == 2 and rows[1].tolist() == list(range(8, 17))
    text = dm.describe()
    assert "train" in text and "validation" in text and str(dm.num_train_rows) in text


# ----------------------------------------------------------------------------- caches


def test_cache_reuse(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, make_corpus(tmp_path / "corpus", 20))
    dm = DataModule(cfg)
    cache = Path(cfg.data.cache_dir)
    files = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")}
    assert any(p.suffix == ".npy" for p in files) and any(p.suffix == ".model" for p in files)

    def boom(*args, **kwargs):
        raise AssertionError("cache was rebuilt")

    monkeypatch.setattr(tokenizer, "train_sentencepiece", boom)
    monkeypatch.setattr(pipeline, "encode_documents", boom)
    monkeypatch.setattr(sources, "_prepare_local", boom)
    dm2 = DataModule(cfg)
    assert dm2.tokenizer.path == dm.tokenizer.path and dm2.num_train_rows == dm.num_train_rows
    after = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".lock")}
    assert after == files
    # a changed corpus gets a new fingerprint (and is rebuilt)
    monkeypatch.undo()
    (tmp_path / "corpus" / "new.py").write_text("x = 1\n" * 50)
    assert load_corpus(cfg).fingerprint != dm.corpus.fingerprint


# ----------------------------------------------------------------------------- sources and errors


def test_default_corpus_listing():
    root, files = list_stdlib_files()
    assert len(files) > 500 and files == sorted(files)
    assert all(p.suffix == ".py" and "site-packages" not in p.parts for p in files)
    assert any(p.name == "os.py" for p in files)


def test_local_listing_file_dir_glob(tmp_path):
    root = make_corpus(tmp_path / "c", 6)
    _, files = list_local_files(str(root), [".py"])
    assert len(files) == 6
    _, files = list_local_files(str(root / "pkg0" / "*.py"), [".py"])
    assert len(files) == 2
    _, files = list_local_files(str(root / "ignored.bin"), [".py"])
    assert len(files) == 1


def _bad_path(root: Path, kind: str) -> str:
    """Build a broken `data.path` of the given kind under root; return the spec."""
    files = {"empty": ("a.txt", b""), "undecodable": ("a.txt", b"\xff\xfe\x00bad"), "ext": ("a.bin", b"hi")}
    if kind == "missing":
        return str(root / "nope")
    if kind == "glob":
        return str(root / "*.nothing")
    name, data = files[kind]
    (root / kind).mkdir()
    (root / kind / name).write_bytes(data)
    return str(root / kind)


@pytest.mark.parametrize(
    "kind, pattern",
    [
        ("missing", r"data\.path.*nope.*does not exist"),
        ("glob", r"data\.path.*\*\.nothing.*matches no files"),
        ("empty", r"data\.path.*no documents.*empty"),
        ("undecodable", r"data\.path.*undecodable.*a\.txt"),
        ("ext", r"data\.path.*no files with data\.extensions"),
    ],
)
def test_bad_path_errors(tmp_path, kind, pattern):
    cfg = make_cfg(tmp_path, Path(_bad_path(tmp_path, kind)))
    with pytest.raises(ConfigError, match=pattern):
        DataModule(cfg)


def test_undecodable_file_skipped_and_counted(tmp_path, caplog):
    root = make_corpus(tmp_path / "c", 12)
    (root / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    cfg = make_cfg(tmp_path, root)
    with caplog.at_level(logging.WARNING):
        corpus = load_corpus(cfg)
    assert corpus.skipped == 1 and corpus.skipped_example.endswith("latin1.py")
    assert len(corpus.train) + len(corpus.validation) == 12
    assert any("latin1.py" in r.getMessage() and "1 of" in r.getMessage() for r in caplog.records)
    assert len(corpus.validation) >= 1


def test_too_few_rows_errors(shared, tmp_path):
    cfg, _ = shared
    big = make_cfg(tmp_path, Path(cfg.data.path), cache_dir=cfg.data.cache_dir, seq_len=4096)
    with pytest.raises(ConfigError, match=r"train split.*tokens.*rows.*data\.seq_len.*train\.batch_size"):
        DataModule(big)
    val = make_cfg(tmp_path, Path(cfg.data.path), cache_dir=cfg.data.cache_dir, seq_len=64)
    val.eval.every_steps = 5
    with pytest.raises(ConfigError, match=r"validation split.*data\.validation_fraction"):
        DataModule(val)
    val.eval.every_steps = 0  # eval disabled: fine
    assert DataModule(val).num_train_rows >= 4
    odd = make_cfg(tmp_path, Path(cfg.data.path), cache_dir=cfg.data.cache_dir)
    with pytest.raises(ConfigError, match=r"train\.batch_size=4.*3"):
        DataModule(odd, 0, 3)


# ----------------------------------------------------------------------------- TFDS by name


def _prepare_tfds(data_dir: Path) -> None:
    import tensorflow_datasets as tfds

    class LlmjaxTestCorpus(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {"content": tfds.features.Text(), "n": tfds.features.Scalar(np.int64)}
                ),
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 30), "test": self._generate_examples(30, 36)}

        def _generate_examples(self, a, b):
            for i in range(a, b):
                yield i, {"content": _doc(i), "n": i}

    tfds.disable_progress_bar()
    builder = LlmjaxTestCorpus(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def test_tfds_by_name(tmp_path):
    data_dir = tmp_path / "tfds"
    _prepare_tfds(data_dir)
    cfg = make_cfg(tmp_path, tfds_name="llmjax_test_corpus", tfds_data_dir=str(data_dir), text_key="content")
    cfg.data.tfds_eval_split = "test"
    corpus = load_corpus(cfg)
    assert len(corpus.train) == 30 and len(corpus.validation) == 6
    assert corpus.train[3] == _doc(3) and corpus.validation[0] == _doc(30)
    cfg.data.tfds_eval_split = "validation"  # missing: carve the last 10% off train
    corpus = load_corpus(cfg)
    assert len(corpus.train) == 27 and len(corpus.validation) == 3 and corpus.validation[2] == _doc(29)
    dm = DataModule(cfg)
    assert dm.num_train_rows >= 4 and next(dm.train_iterator())["inputs"].shape == (4, 8)

    for key, value, pattern in [
        ("tfds_name", "no_such_dataset_xyz", r"data\.tfds_name.*no_such_dataset_xyz"),
        ("tfds_data_dir", None, r"data\.tfds_data_dir"),
        ("tfds_data_dir", str(tmp_path / "nowhere"), r"data\.tfds_data_dir.*nowhere"),
        ("text_key", "text", r"data\.text_key.*'text'"),
    ]:
        bad = make_cfg(tmp_path, tfds_name="llmjax_test_corpus", tfds_data_dir=str(data_dir), text_key="content")
        setattr(bad.data, key, value)
        with pytest.raises(ConfigError, match=pattern):
            load_corpus(bad)


def test_tokenizer_loaded_from_path_is_used(shared, tmp_path):
    cfg, dm = shared
    other = make_cfg(tmp_path, Path(cfg.data.path), tokenizer=dm.tokenizer.path)
    dm2 = DataModule(other)
    assert isinstance(dm2.tokenizer, Tokenizer) and dm2.tokenizer.path == dm.tokenizer.path
    assert dm2.num_train_tokens == dm.num_train_tokens
