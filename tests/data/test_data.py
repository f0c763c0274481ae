"""Data sources: listing, line-aligned blocks, the split, TFDS by name, bad input (ConfigError naming the key)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from data_helpers import doc_text, make_cfg, make_corpus

from llmjax.config import ConfigError, SourceConfig, validate_data
from llmjax.data.stream.data_module import DataModule
from llmjax.data.stream.files import list_local_files, list_stdlib_files, num_blocks, read_block, split_records
from llmjax.data.stream.sources import probe, resolve_sources


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One DataModule over a small corpus, shared by the read-only tests."""
    tmp = tmp_path_factory.mktemp("shared")
    cfg = make_cfg(tmp, make_corpus(tmp / "corpus"))
    cfg.eval.every_steps = 10
    return cfg, DataModule(cfg)


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


def test_small_files_are_whole_documents_and_split_by_name(shared):
    cfg, dm = shared
    (src,) = dm.sources
    texts = sorted(d for i in range(len(src.train)) for d in src.train[i]) + \
        sorted(d for i in range(len(src.validation)) for d in src.validation[i])
    assert sorted(texts) == sorted(doc_text(i) for i in range(40))
    assert len(src.validation) >= 1 and len(src.train) + len(src.validation) == 40
    assert resolve_sources(cfg)[0].validation.name(0) == src.validation.name(0)  # the split is a pure function


def test_large_files_are_read_in_line_aligned_blocks(tmp_path):
    lines = [f"line {i} " + "x" * (i % 37) + "\n" for i in range(3000)]
    path = tmp_path / "big.txt"
    path.write_text("".join(lines))
    size = path.stat().st_size
    n = num_blocks(path.name, size, 4096)
    assert n == -(-size // 4096) > 10
    blocks = [read_block(path, b, n, 4096) for b in range(n)]
    assert b"".join(blocks) == path.read_bytes()
    assert all(b.endswith(b"\n") for b in blocks if b)
    cfg = make_cfg(tmp_path, path, block_bytes=4096, validation_fraction=0.2)
    (src,) = resolve_sources(cfg)
    assert len(src.train) + len(src.validation) == n and len(src.validation) > 0
    by_block = {}
    for records in (src.train, src.validation):
        for i in range(len(records)):
            by_block[int(records.name(i).split("#")[1])] = "".join(records[i])
    assert "".join(by_block[b] for b in range(n)) == path.read_text()  # each block one document, nothing lost


def test_json_lines_documents(tmp_path):
    import json

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}", "id": i}) + "\n" for i in range(50)) + "\n")
    cfg = make_cfg(tmp_path, path, validation_fraction=0.0)
    (src,) = resolve_sources(cfg)
    assert src.train[0] == [f"doc {i}" for i in range(50)]
    path.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ConfigError, match=r"docs\.jsonl: line 2 .*not valid JSON"):
        resolve_sources(cfg)[0].train[0]
    path.write_text('{"body": "no text field"}\n')
    with pytest.raises(ConfigError, match=r"docs\.jsonl: line 1 .*'text' \(data\.text_key\)"):
        resolve_sources(cfg)[0].train[0]


def test_split_records_edge_cases():
    train, val = split_records(["a", "b"], 0.0)
    assert list(train) == [0, 1] and len(val) == 0
    train, val = split_records(["a", "b"], 0.99)
    assert len(train) == 1 and len(val) == 1
    train, val = split_records([f"f{i}" for i in range(1000)], 0.1)
    assert 60 < len(val) < 140 and len(np.intersect1d(train, val)) == 0


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


def test_undecodable_file_is_skipped_with_a_warning(tmp_path, caplog):
    root = make_corpus(tmp_path / "c", 12)
    (root / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    cfg = make_cfg(tmp_path, root, validation_fraction=0.0)
    (src,) = resolve_sources(cfg)
    probe(src)
    with caplog.at_level(logging.WARNING):
        docs = [d for i in range(len(src.train)) for d in src.train[i]]
    assert len(docs) == 12
    assert any("latin1.py" in r.getMessage() and "UTF-8" in r.getMessage() for r in caplog.records)


def test_too_small_splits_error(shared, tmp_path):
    cfg, _ = shared
    big = make_cfg(tmp_path, Path(cfg.data.path), cache_dir=cfg.data.cache_dir, seq_len=4096)
    with pytest.raises(ConfigError, match=r"train split has at most \d+ tokens.*train\.batch_size=4.*data\.seq_len"):
        DataModule(big)
    val = make_cfg(tmp_path, Path(cfg.data.path), cache_dir=cfg.data.cache_dir, seq_len=128)
    val.eval.every_steps = 5
    with pytest.raises(ConfigError, match=r"validation split.*data\.validation_fraction"):
        DataModule(val)
    val.eval.every_steps = 0  # evaluation disabled: fine
    assert DataModule(val).shares == 4  # gcd(train.batch_size=4, 8)
    with pytest.raises(ConfigError, match=r"train\.batch_size=4.*process count 3"):
        DataModule(make_cfg(tmp_path, Path(cfg.data.path), cache_dir=cfg.data.cache_dir), 0, 3)


def test_mixture_config_errors(tmp_path):
    root = make_corpus(tmp_path / "c", 6)
    cfg = make_cfg(tmp_path)
    cfg.data.sources = [SourceConfig(path=str(root), weight=-1.0)]
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.weight must be a number >= 0"):
        validate_data(cfg)
    cfg.data.sources = [SourceConfig(path=str(root), weight=0.0), SourceConfig(path=str(root), weight=0.0)]
    with pytest.raises(ConfigError, match=r"data\.sources: the weights sum to 0\.0"):
        DataModule(cfg)
    cfg.data.sources = [SourceConfig(weight=1.0)]
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]: set exactly one of path and tfds_name"):
        validate_data(cfg)
    cfg.data.sources = [SourceConfig(path=str(tmp_path / "gone"))]
    with pytest.raises(ConfigError, match=r"data\.sources\[0\]\.path: .*gone does not exist"):
        DataModule(cfg)
    cfg.data.sources, cfg.data.path = [SourceConfig(path=str(root))], str(root)
    with pytest.raises(ConfigError, match=r"data\.sources is set.*data\.path"):
        validate_data(cfg)


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
                yield i, {"content": doc_text(i), "n": i}

    tfds.disable_progress_bar()
    builder = LlmjaxTestCorpus(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def test_tfds_by_name(tmp_path):
    data_dir = tmp_path / "tfds"
    _prepare_tfds(data_dir)
    cfg = make_cfg(tmp_path, tfds_name="llmjax_test_corpus", tfds_data_dir=str(data_dir), text_key="content")
    cfg.data.tfds_eval_split = "test"
    (src,) = resolve_sources(cfg)
    assert len(src.train) == 30 and len(src.validation) == 6
    assert src.train[3] == [doc_text(3)] and src.validation[0] == [doc_text(30)]
    cfg.data.tfds_eval_split = "validation"  # missing: carve the last 10% off train
    (src,) = resolve_sources(cfg)
    assert len(src.train) == 27 and len(src.validation) == 3 and src.validation[2] == [doc_text(29)]
    dm = DataModule(cfg)
    it = dm.train_iterator()
    assert next(it)["inputs"].shape == (4, 8)
    it.close()
    for key, value, pattern in [
        ("tfds_name", "no_such_dataset_xyz", r"data\.tfds_name.*no_such_dataset_xyz"),
        ("tfds_data_dir", None, r"data\.tfds_data_dir"),
        ("tfds_data_dir", str(tmp_path / "nowhere"), r"data\.tfds_data_dir.*nowhere"),
        ("text_key", "text", r"data\.text_key.*'text'"),
    ]:
        bad = make_cfg(tmp_path, tfds_name="llmjax_test_corpus", tfds_data_dir=str(data_dir), text_key="content")
        setattr(bad.data, key, value)
        with pytest.raises(ConfigError, match=pattern):
            resolve_sources(bad)
