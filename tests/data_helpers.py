"""Small corpora, configs and synthetic token sources for the data tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from llmjax.config import Config
from llmjax.data.stream.grain_pipeline import StreamSpec
from llmjax.data.stream.sources import Source

VOCAB = 384
EOS = 7


def doc_text(i: int) -> str:
    lines = [f"def func_{i}_{j}(value_{j}):\n\treturn value_{j} * {i + j}  # note {j}\n" for j in range(i % 5 + 1)]
    return f"# module {i}: café 漢字\n" + "".join(lines) + ("\n" * (i % 3))


def make_corpus(root: Path, n: int = 40, prefix: str = "mod") -> Path:
    """A directory of n small .py documents (plus a file with an ignored extension)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"{prefix}_{i:03d}.py").write_text(doc_text(i), encoding="utf-8")
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


def token_docs(n: int, seed: int = 0, max_len: int = 40) -> list[list[np.ndarray]]:
    """n records, each one document: doc d = d*1000 + [1000, 1001, ...] (its id and offset readable)."""
    rng = np.random.default_rng(seed)
    return [[np.arange(1000, 1000 + int(rng.integers(1, max_len)), dtype=np.int32) + 1000 * d] for d in range(n)]


def token_source(n: int, name: str = "syn", seed: int = 0, max_len: int = 40) -> Source:
    docs = token_docs(n, seed, max_len)
    return Source(name, "data.sources[0]", 1.0, "tokens", docs, docs[: max(1, n // 10)], f"synthetic {name}",
                  f"syn_{name}_{n}_{seed}")


FAKE_TOKENIZER = SimpleNamespace(eos_id=EOS, bos_id=None)


def spec(**kw: object) -> StreamSpec:
    base = dict(seed=0, raw_length=17, packing="concat", packing_bins=4, shuffle=True, shuffle_window=8, workers=0,
                prefetch=0, add_bos=False, shares=1, global_batch=4)
    base.update(kw)
    return StreamSpec(**base)  # type: ignore[arg-type]
