"""`train --check` runs every check of the real run before its first step and writes nothing; the real run
checks it all before writing into a new workdir; `train.init_from` gives the model section and the tokenizer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from llmjax import cli
from llmjax.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "config"))
from test_validation import TINY, run_main  # noqa: E402


@pytest.mark.parametrize("check", [True, False], ids=["check", "run"])
def test_init_from_an_empty_directory_is_refused_before_anything_is_written(capsys, tmp_path, corpus, check):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_main(capsys, "train", *(["--check"] if check else []), "--workdir", str(tmp_path / "run"),
                         *TINY, f"data.path={corpus}", f"train.init_from={empty}")
    assert code == 2 and f"train.init_from: no checkpoint in {empty}" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_check_with_lora_of_any_rank_compiles(capsys, tmp_path, corpus):
    code = cli.main(["train", "--check", "--workdir", str(tmp_path / "run"), *TINY, f"data.path={corpus}",
                     "lora.rank=3"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert not (tmp_path / "run").exists()


def _imported(root: Path) -> Path:
    """A stand-in for a `convert from-hf` workdir: its config.yaml and a tokenizer/ directory."""
    work = root / "imported"
    (work / "tokenizer").mkdir(parents=True)
    model = {"family": "decoder", "vocab_size": 320, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
             "d_ff": 48, "max_seq_len": 128, "tie_embeddings": True}
    (work / "config.yaml").write_text(yaml.safe_dump({"model": model, "data": {"tokenizer": "/gone/tokenizer"}}))
    return work


def test_init_from_gives_the_model_section_and_the_tokenizer(tmp_path):
    work = _imported(tmp_path)
    cfg = load_config(None, [f"train.init_from={work}", "data.seq_len=64", "model.remat=full"])
    m = cfg.model
    assert (m.vocab_size, m.d_model, m.n_layers, m.d_ff, m.max_seq_len, m.tie_embeddings) == (320, 32, 2, 48, 128, True)
    assert m.remat == "full"  # a command-line model key applies on top
    assert cfg.data.tokenizer == str(work / "tokenizer")  # the import's copy, with its chat template
    explicit = load_config(None, [f"train.init_from={work}", "data.seq_len=64", "data.tokenizer=/my/tok.json"])
    assert explicit.data.tokenizer == "/my/tok.json"
    # an explicit --config file's model keys apply on top of the import's (the default config's do not)
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump({"model": {"d_model": 64}, "train": {"init_from": str(work)},
                                   "data": {"seq_len": 64}}))
    assert load_config(own).model.d_model == 64 and load_config(own).model.vocab_size == 320
