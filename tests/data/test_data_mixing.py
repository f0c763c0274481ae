"""Global mixing: documents cut from long files, every token once per epoch in the global document order, rows
of a batch from many files, the mixing measures."""

from __future__ import annotations

import gzip
from collections import Counter

import numpy as np
import pytest
from data_helpers import EOS, FAKE_TOKENIZER, make_cfg, spec, token_source

from llmjax.data.stream.data_module import DataModule
from llmjax.data.stream.files import cut_documents, natural_cut
from llmjax.data.stream.grain_pipeline import source_rows
from llmjax.data.stream.records import FileDocuments
from llmjax.data.stream.sources import resolve_sources
from llmjax.data.stream.stages import DOCS_PER_RECORD


@pytest.mark.parametrize("packing", ["concat", "best_fit"])
def test_every_token_of_every_document_once_per_epoch(packing):
    src = token_source(60, max_len=60)  # documents up to 3.5 rows, in a permutation split over 2 shares
    s = spec(packing=packing, shares=2, shuffle_window=8)
    got: Counter[int] = Counter()
    rows = []
    for share in range(2):
        for row in source_rows(src, 0, src.train, FAKE_TOKENIZER, s, share, train=True, epochs=1):
            real = row["segment_ids"] > 0
            got.update(int(t) for t in row["tokens"][real])
            body = real & (row["tokens"] != EOS)  # token t of document d is 1000 * (d + 1) + offset
            assert (row["doc"][body] // DOCS_PER_RECORD == row["tokens"][body] // 1000 - 1).all()
            rows.append(row["tokens"])
    assert got == Counter(t for (d,) in src.train for t in [*d.tolist(), EOS])  # each token (and EOS) once
    plain = [r["tokens"] for r in source_rows(src, 0, src.train, FAKE_TOKENIZER, spec(packing=packing, shares=2,
                                                                                         shuffle=False), 0, True, 1)]
    assert not all(np.array_equal(a, b) for a, b in zip(rows, plain, strict=False))


def _long_text(i: int) -> str:
    parts = []
    for j in range(40):
        parts.append(f"def f_{i}_{j}(x):\n    y = x + {j}  # café 漢字\n\n    return y\n\n\n")
        parts.append(f"Paragraph {j} of file {i}: " + "prose " * (j % 7) + "\n\n")
    parts.append("é" * 3000 + "\n")  # a long line without a break: cut at a character boundary
    return "".join(parts)


def test_documents_cut_from_a_long_file_lose_or_duplicate_no_text(tmp_path):
    root = tmp_path / "long"
    root.mkdir()
    texts = {f"f{i}.py": _long_text(i) for i in range(3)}
    for name, text in texts.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "z.txt.gz").write_bytes(gzip.compress(texts["f0.py"].encode()))
    texts["z.txt.gz"] = texts["f0.py"]
    cfg = make_cfg(tmp_path, root, document_bytes=256, block_bytes=4096, validation_fraction=0.3)
    (source,) = resolve_sources(cfg)
    docs: dict[tuple[int, int], list[str]] = {}
    for split in (source.train, source.validation):
        assert isinstance(split, FileDocuments)
        for i in range(len(split)):
            path, text = split.read(i)
            assert text is not None
            f, j = (int(x) for x in split.docs[i])
            assert (f, j) not in docs
            docs[(f, j)] = split.documents(i, path, text)
            if not path.name.endswith(".gz"):
                assert len(text.encode()) <= 2 * 256
    for f, rel in enumerate(source.train.rels):  # type: ignore[attr-defined]
        j = sorted(k for (g, k) in docs if g == f)
        assert j == list(range(len(j)))
        assert "".join(d for k in j for d in docs[(f, k)]) == texts[rel], rel
    val = {(int(f), int(j) * 256 // 4096) for f, j in source.validation.docs}  # type: ignore[attr-defined]
    train = {(int(f), int(j) * 256 // 4096) for f, j in source.train.docs}  # type: ignore[attr-defined]
    assert val and not val & train  # a block of data.block_bytes is all train or all validation


def test_natural_cuts_prefer_top_level_definitions_then_lines():
    text = b"    x = 1\n\n    y = 2\n\ndef g():\n    pass\n"
    assert text[natural_cut(text):].startswith(b"def g")
    assert natural_cut(b"abc\ndef") == 4
    assert natural_cut("ééé".encode()[1:]) == 1  # never inside a character
    data = text * 50
    assert b"".join(cut_documents(data, 64)) == data


def test_a_batch_of_8_rows_from_20_long_files_draws_from_many_files(tmp_path):
    root = tmp_path / "twenty"
    root.mkdir()
    for i in range(20):
        (root / f"book_{i:02d}.txt").write_text(_long_text(i) * 3, encoding="utf-8")
    cfg = make_cfg(tmp_path, root, seq_len=64, validation_fraction=0.0)
    cfg.train.batch_size = 8
    data = DataModule(cfg)
    it = data.train_iterator()
    for _ in range(40):
        next(it)
    mixing = it.mixing()
    it.close()
    assert mixing["batches"] == 40
    assert mixing["distinct_files"] >= 6, mixing  # independent draws from 20 equal files: 6.7
    assert mixing["distinct_documents"] >= 8, mixing
    assert mixing["same_file_as_previous"] < 0.6, mixing
