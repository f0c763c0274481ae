"""Curation in `llmjax data prepare` (`llmjax.data.prepare`: dedup, quality, pii, the report): each stage on small
hand-made documents, then the whole preparation with every stage, local workers against Beam's DirectRunner, and
bad curation configs (exit 2 naming the key, nothing written)."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
import typing
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from data_helpers import make_cfg

from llmjax.cli import main
from llmjax.config import load_config
from llmjax.config.curation import CurateConfig, NearDedupConfig, QualityConfig, QualityFilter
from llmjax.data.prepare import report as curation_report
from llmjax.data.prepare.curator import Curator
from llmjax.data.prepare.dedup import jaccard
from llmjax.data.prepare.pii import PiiScrubber
from llmjax.data.prepare.quality import FILTERS, QualityFilters
from llmjax.data.prepare.shards import CURATION_REPORT, prepare
from llmjax.data.tokenizers.run_tokenizer import load_copy

ROOT = Path(__file__).resolve().parents[2]
VOCAB = ("the of and to that with have be river stone garden window bright quiet morning letter market road city "
         "winter story people water music light paper table season friend north harbor").split()


NATO = "alpha bravo charlie delta echo foxtrot golf hotel india juliett kilo lima mike november oscar papa".split()


def prose(seed: int, sentences: int = 9) -> str:
    """~90 words of plain sentences that pass every default quality filter."""
    r = random.Random(seed)
    return "\n".join(" ".join(r.choice(VOCAB) for _ in range(10)).capitalize() + "." for _ in range(sentences)) + "\n"


def distinct_words(n: int, tag: str) -> list[str]:
    return [f"{tag}{i}" for i in range(n)]


def codes(stages: list[str], texts: list[str], **near: float) -> list[int]:
    """The global decision over `texts` in this order (0: kept)."""
    cfg = CurateConfig(stages=stages, near_dedup=NearDedupConfig(**near))  # type: ignore[arg-type]
    curator = Curator(cfg)
    return curator.decide(curator.scan(t) for t in texts).tolist()


def test_exact_duplicates_are_removed_after_their_first_occurrence():
    a, b = prose(1), prose(2)
    variant = "  " + a.upper().replace(" ", " \t ") + "\n\n"  # the same text once normalised
    curator = Curator(CurateConfig(stages=["exact_dedup"]))
    got = codes(["exact_dedup"], [a, b, a, variant, b + " more"])
    assert got == [0, 0, curator.code("exact_dedup"), curator.code("exact_dedup"), 0]


def test_a_near_duplicate_at_jaccard_09_is_removed_and_one_at_05_kept():
    words = distinct_words(200, "w")
    base = " ".join(words[:99])  # 95 shingles of 5 words
    near = " ".join(words[:94] + distinct_words(5, "x"))  # 90 shared, 5 + 5 different: J = 90 / 100
    other = " ".join(distinct_words(79, "o"))  # 75 shingles
    half = " ".join(distinct_words(54, "o") + distinct_words(25, "y"))  # 50 shared, 25 + 25 different: 50 / 100
    assert jaccard(base, near) == pytest.approx(0.9) and jaccard(other, half) == pytest.approx(0.5)
    near_code = Curator(CurateConfig(stages=["near_dedup"])).code("near_dedup")
    assert codes(["near_dedup"], [base, near, other, half]) == [0, near_code, 0, 0]
    assert codes(["near_dedup"], [other, half], threshold=0.45) == [0, near_code]  # the threshold is a key
    # a stage sees what the stages before it left: exact_dedup removes the copy before near_dedup compares it
    both = Curator(CurateConfig(stages=["exact_dedup", "near_dedup"]))
    assert codes(["exact_dedup", "near_dedup"], [base, base, near]) == [0, both.code("exact_dedup"),
                                                                      both.code("near_dedup")]


GOOD = [prose(10), prose(11), "A short but honest note.\n" + prose(12)]
BAD = {  # filter -> a document that fails it (and passes the filters before it in FILTERS order)
    "length": "The river and the stone.",
    "mean_word_length": " ".join(["a"] * 40 + ["the", "of", "to", "and"] * 5) + ".",
    "symbol_ratio": prose(20) + " ".join("#tag" for _ in range(15)),
    "bullet_lines": "\n".join(f"- the {w} of the river and the harbor road" for w in VOCAB[8:24]),
    "ellipsis_lines": "\n".join(f"The {w} and the quiet harbor road of the city..." for w in VOCAB[8:16]) + "\n"
                      + "\n".join(f"The {w} of the water with light and paper." for w in VOCAB[16:28]),
    "alpha_words": prose(21) + " ".join(str(1000 + 7 * i) for i in range(60)),
    "stop_words": " ".join(VOCAB[8:] * 3) + ".",
    "duplicate_lines": prose(22) + "Subscribe to the letter of the harbor now.\n" * 8,
    "top_ngrams": prose(23, 4) + " ".join(["harbor winter"] * 30) + ".",
    "duplicate_ngrams": prose(24, 5) + (" ".join(NATO) + ".\n") * 2,
    "terminal_punct": prose(25).replace(".", ""),
}


def test_quality_filters_remove_what_they_should_and_keep_the_rest():
    assert set(BAD) == set(FILTERS) == set(typing.get_args(QualityFilter))  # one implementation per name
    every = QualityFilters(QualityConfig(filters=list(FILTERS)))  # type: ignore[arg-type]
    for text in GOOD:
        assert every.check(text) is None, text
    for name, text in BAD.items():
        assert every.check(text) == name, (name, text)
        assert QualityFilters(QualityConfig(filters=[name])).check(text) == name  # type: ignore[list-item]
    # the thresholds are keys: a looser length bound keeps the short one
    assert QualityFilters(QualityConfig(filters=["length"], min_words=3)).check(BAD["length"]) is None


def _repeated_ngram_share(words: list[str], n: int) -> float:
    """Reference: the share of word characters under an n-gram that occurred before (plain Python)."""
    seen: set[tuple[str, ...]] = set()
    covered = [False] * len(words)
    for i, gram in enumerate(zip(*(words[j:] for j in range(n)), strict=False)):
        if gram in seen:
            covered[i:i + n] = [True] * n
        seen.add(gram)
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c) / max(sum(map(len, words)), 1)


def _top_ngram_share(words: list[str], n: int) -> float:
    """Reference: characters of the most frequent (then longest) repeated n-gram times its count, as a share."""
    counts = Counter(zip(*(words[j:] for j in range(n)), strict=False))
    top = max(counts.values(), default=0)
    if top < 2:
        return 0.0
    return max(sum(map(len, g)) for g, k in counts.items() if k == top) * top / max(sum(map(len, words)), 1)


def test_the_ngram_filters_match_a_plain_python_reference():
    r = random.Random(0)
    for trial in range(300):
        pool = VOCAB[: r.choice([2, 4, 8, 32])] + NATO[: r.randint(0, 16)]
        words = [r.choice(pool) for _ in range(r.randint(0, 150))]
        text = " ".join(words)
        limits = [r.uniform(0, 0.6) for _ in range(6)]
        q = QualityConfig(filters=["top_ngrams", "duplicate_ngrams"], max_top_ngram_chars=limits[:3],
                          max_duplicate_ngram_chars=limits)
        top_ok = all(_top_ngram_share(words, n) <= lim for n, lim in enumerate(limits[:3], 2) if len(words) >= n)
        dup_ok = all(_repeated_ngram_share(words, n) <= lim for n, lim in enumerate(limits, 5) if len(words) >= n)
        expected = None if top_ok and dup_ok else "top_ngrams" if not top_ok else "duplicate_ngrams"
        assert QualityFilters(q).check(text) == expected, (trial, text)


def test_pii_is_replaced_by_placeholders_and_the_rest_left_alone():
    text = ("Mail jane.doe@example.com or ops+alerts@mail.example.co.uk. Hosts 192.168.1.20, 8.8.4.4 and "
            "2001:db8::8a2e:370:7334 or fe80::1ff:fe23:4567:890a. Call +44 20 7946 0958, (202) 555-0143, "
            "202-555-0143 or 202.555.0143.\n")
    keep = "On 2026-12-06 at 12:30:45 pi was 3.14159; x[1::2], a[1:2:3], version 1.2.3, 999.1.1.1, id 1234567890.\n"
    scrubbed, counts = PiiScrubber(["email", "ip", "phone"]).scrub(text + keep)
    assert scrubbed == ("Mail <EMAIL> or <EMAIL>. Hosts <IP>, <IP> and <IP> or <IP>. Call <PHONE>, <PHONE>, "
                        "<PHONE> or <PHONE>.\n" + keep)
    assert counts == {"email": 2, "ip": 4, "phone": 4}
    only_mail, counts = PiiScrubber(["email"]).scrub(text)
    assert "<EMAIL>" in only_mail and "8.8.4.4" in only_mail and counts == {"email": 2}


def _corpus(root: Path) -> dict[str, str]:
    """A corpus with known removals: 2 exact duplicates, 1 near duplicate, 3 low-quality documents, 1 with PII."""
    docs = {f"good{i:02d}": prose(100 + i) for i in range(14)}
    docs["copy_of_03"] = docs["good03"]
    docs["loud_copy_of_05"] = docs["good05"].upper().replace(" ", "  ")
    words = docs["good07"].split()
    docs["near_07"] = " ".join(words[:-1] + ["lantern."])
    docs["half_08"] = " ".join(docs["good08"].split()[:45]) + "\n" + prose(999, 5)
    docs["bad_length"] = BAD["length"]
    docs["bad_bullets"] = BAD["bullet_lines"]
    docs["bad_numbers"] = BAD["alpha_words"]
    docs["contact"] = prose(300) + "Write to jane.doe@example.com or call +1-202-555-0143 from 8.8.4.4.\n"
    root.mkdir(parents=True)
    for name, text in docs.items():
        (root / f"{name}.txt").write_text(text)
    return docs


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curate")
    docs = _corpus(tmp / "corpus")
    cfg = make_cfg(tmp, tmp / "corpus", validation_fraction=0.2)
    cfg.curate = CurateConfig(stages=["pii", "exact_dedup", "near_dedup", "quality"])
    meta = prepare(cfg, tmp / "local", workers=2, shards=3)
    return tmp, cfg, docs, meta


def _shard_texts(out: Path, meta: dict) -> list[str]:
    from array_record.python.array_record_module import ArrayRecordReader

    tok = load_copy(out / "tokenizer")
    texts = []
    for split in ("train", "validation"):
        for s in meta["splits"][split]:
            r = ArrayRecordReader(str(out / s["file"]), "readahead_buffer_size:0")
            texts += [tok.decode(np.frombuffer(b, meta["dtype"]).tolist()) for b in r.read_all()]
    return texts


def test_prepare_curates_and_its_report_adds_up(curated):
    tmp, _, docs, meta = curated
    out = tmp / "local"
    report = json.loads((out / CURATION_REPORT).read_text())
    curation_report.check(report)
    assert jaccard(docs["good07"], docs["near_07"]) > 0.85 and jaccard(docs["good08"], docs["half_08"]) < 0.6
    stages = report["stages"]
    assert report["documents_in"] == len(docs) and report["bytes_in"] == sum(len(t.encode()) for t in docs.values())
    assert [stages[s]["documents"] for s in ("pii", "exact_dedup", "near_dedup", "quality")] == [1, 2, 1, 3]
    assert stages["quality"]["by"] == {"length": 1, "bullet_lines": 1, "alpha_words": 1}
    assert stages["pii"]["by"] == {"email": 1, "ip": 1, "phone": 1}
    assert "<EMAIL>" in stages["pii"]["examples"][0]["text"] and stages["pii"]["examples"][0]["record"]
    assert {e["record"] for e in stages["quality"]["examples"]} == {"bad_length.txt", "bad_bullets.txt",
                                                                   "bad_numbers.txt"}
    shard_docs = sum(s["documents"] for split in meta["splits"].values() for s in split)
    assert report["documents_out"] == shard_docs == len(docs) - 6
    written = _shard_texts(out, meta)
    assert sum(len(t.encode()) for t in written) == report["bytes_out"]
    scrubbed = docs["contact"].replace("jane.doe@example.com", "<EMAIL>").replace("+1-202-555-0143", "<PHONE>")
    expected = {t for k, t in docs.items() if k != "contact"} | {scrubbed.replace("8.8.4.4", "<IP>")}
    assert set(written) <= expected and len(set(written)) == len(written)
    assert docs["half_08"] in written and (docs["good07"] in written) != (docs["near_07"] in written)
    assert meta["curate"]["stages"] == ["pii", "exact_dedup", "near_dedup", "quality"]
    assert not (out / ".curate").exists() and not list(out.glob("*.array_record.json"))


@pytest.mark.slow
def test_beam_direct_runner_curates_like_the_local_workers(curated):
    pytest.importorskip("apache_beam")
    tmp, cfg, _, meta = curated
    beam_meta = prepare(cfg, tmp / "beam", shards=3, runner="beam")
    assert {**beam_meta, "runner": "local"} == meta
    for split in ("train", "validation"):
        for s in meta["splits"][split]:
            assert (tmp / "beam" / s["file"]).read_bytes() == (tmp / "local" / s["file"]).read_bytes()
    assert (tmp / "beam" / CURATION_REPORT).read_text() == (tmp / "local" / CURATION_REPORT).read_text()


def test_filters_alone_need_no_first_pass(tmp_path):
    docs = {"good": prose(1), "short": BAD["length"]}
    (tmp_path / "c").mkdir()
    for k, v in docs.items():
        (tmp_path / "c" / f"{k}.txt").write_text(v)
    cfg = make_cfg(tmp_path, tmp_path / "c", validation_fraction=0.0)
    cfg.curate = dataclasses.replace(cfg.curate, stages=["quality"])
    meta = prepare(cfg, tmp_path / "out")
    report = json.loads((tmp_path / "out" / CURATION_REPORT).read_text())
    assert report["stages"]["quality"]["by"] == {"length": 1} and meta["splits"]["train"][0]["documents"] == 1


BAD_CONFIGS = [
    (["curate.near_dedup.threshold=1.5"], ["curate.near_dedup.threshold=1.5", "(0, 1]"]),
    (["curate.stages=[quality]", "curate.quality.filters=[length,perplexity]"],
     ["curate.quality.filters[1]", "'perplexity' is not one of"]),
    (["curate.stages=[exact_dedup,quality,exact_dedup]"], ["curate.stages", "exact_dedup is named twice"]),
    (["curate.quality.max_top_ngram_chars=[0.2,1.5]"], ["curate.quality.max_top_ngram_chars[1]=1.5"]),
]


def test_bad_curation_configs_exit_2_naming_the_key_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    for overrides, needles in BAD_CONFIGS:
        assert main(["data", "prepare", str(out), "data.path=/nonexistent", *overrides]) == 2
        err = capsys.readouterr().err
        assert "llmjax: error:" in err and "Traceback" not in err and all(n in err for n in needles), err
        assert not out.exists()
    with pytest.raises(Exception, match="curate.stages"):
        load_config(None, ["curate.stages=[pii,pii]"])
    # the process itself: exit status 2, one line, nothing written
    r = subprocess.run([sys.executable, "-m", "llmjax.cli", "data", "prepare", str(out),
                        "curate.near_dedup.threshold=0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "curate.near_dedup.threshold=0" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()
