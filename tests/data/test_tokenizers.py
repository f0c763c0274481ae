"""Tokenizers: SentencePiece and Hugging Face tokenizer.json behind one interface; the workdir copy."""

from __future__ import annotations

import dataclasses
import json
import pickle

import numpy as np
import pytest
from data_helpers import VOCAB, doc_text, make_cfg, make_corpus

from llmjax.config import ConfigError
from llmjax.data.stream.data_module import DataModule
from llmjax.data.tokenizers.run_tokenizer import load_copy, save_copy
from llmjax.data.tokenizers.sp_tokenizer import _chunks, training_sentences
from llmjax.data.tokenizers.tokenizer import Tokenizer, check_vocab, load_tokenizer, trained_vocab_size

ROUND_TRIP = "def f(x):\n\tif x:\t  # tab\n        return 'é 漢字 🎉'   \n\n\n  \t\n"
TEXTS = [ROUND_TRIP, "", " ", "x\r\ny", "  leading", "trailing  \n\n", doc_text(3)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    return DataModule(make_cfg(tmp, make_corpus(tmp / "corpus"))).tokenizer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json built offline with `tokenizers`, with a tokenizer_config.json."""
    from tokenizers import Tokenizer as T
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    d = tmp_path_factory.mktemp("hf")
    tok = T(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=350, special_tokens=["<|pad|>", "<|begin|>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([doc_text(i) for i in range(60)], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin|> $A", special_tokens=[("<|begin|>", 1)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin|>", "eos_token": {"content": "<|end|>"}, "pad_token": "<|pad|>",
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}))
    return d


def test_sentencepiece_round_trip_and_specials(trained):
    tok = trained
    assert isinstance(tok, Tokenizer) and tok.kind == "sentencepiece"
    for text in TEXTS:
        assert tok.decode(tok.encode([text])[0]) == text
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3) and not tok.add_bos
    assert tok.vocab_size <= VOCAB and tok.encode(["a", "b"]) == [tok.encode(["a"])[0], tok.encode(["b"])[0]]


def test_tokenizer_json_matches_the_tokenizers_library(hf_dir):
    from tokenizers import Tokenizer as T

    ref = T.from_file(str(hf_dir / "tokenizer.json"))
    for path in (hf_dir, hf_dir / "tokenizer.json"):
        tok = load_tokenizer(path)
        assert tok.kind == "huggingface" and set(tok.files) == {"tokenizer.json", "tokenizer_config.json"}
        assert tok.encode(TEXTS) == [ref.encode(t, add_special_tokens=False).ids for t in TEXTS]
        for text in TEXTS:
            assert tok.decode(tok.encode([text])[0]) == text
        assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
        assert tok.add_bos  # the post-processor adds <|begin|>
        assert tok.vocab_size == ref.get_vocab_size() and tok.chat_template.startswith("{% for")
        assert tok.config["pad_token"] == "<|pad|>"


@pytest.mark.parametrize("kind", ["sentencepiece", "huggingface"])
def test_token_bytes_count_the_utf8_bytes_of_the_text(trained, hf_dir, kind):
    """Bits per byte divides by these counts: equal to the text's bytes whatever the tokenizer kind."""
    tok = trained if kind == "sentencepiece" else load_tokenizer(hf_dir)
    table = tok.token_bytes()
    assert table.shape == (tok.vocab_size,) and table[tok.eos_id] == 0
    for text in TEXTS:
        assert int(table[tok.encode([text])[0]].sum()) == len(text.encode("utf-8")), text


def test_tokenizers_pickle_for_worker_processes(trained, hf_dir):
    for tok in (trained, load_tokenizer(hf_dir)):
        back = pickle.loads(pickle.dumps(tok))
        assert back.encode(TEXTS) == tok.encode(TEXTS) and back.file_hash() == tok.file_hash()


def test_wrong_or_missing_tokenizer_files(tmp_path, trained):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match=r"data\.tokenizer: .*config\.json is JSON but not a Hugging Face tokenizer"):
        load_tokenizer(tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00junk")
    with pytest.raises(ConfigError, match=r"model\.safetensors is not a SentencePiece model nor a Hugging Face"):
        load_tokenizer(tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match=r"holds neither a tokenizer\.json nor a tokenizer\.model"):
        load_tokenizer(tmp_path)
    with pytest.raises(ConfigError, match=r"data\.tokenizer: file not found: .*missing\.model"):
        load_tokenizer(tmp_path / "missing.model")
    cfg = make_cfg(tmp_path)
    cfg.model = dataclasses.replace(cfg.model, vocab_size=300)
    with pytest.raises(ConfigError, match=r"data\.tokenizer: .*vocab size \d+, larger than model\.vocab_size=300"):
        check_vocab(trained, cfg)
    assert trained_vocab_size(cfg) == 300
    bad = make_cfg(tmp_path, make_corpus(tmp_path / "c", 8), tokenizer=str(tmp_path / "config.json"))
    with pytest.raises(ConfigError, match=r"config\.json is JSON but not"):
        DataModule(bad)


def test_training_with_a_tokenizer_json_and_bos(tmp_path, hf_dir):
    cfg = make_cfg(tmp_path, make_corpus(tmp_path / "c", 30), tokenizer=str(hf_dir), shuffle=False, seq_len=16)
    dm = DataModule(cfg)
    assert dm.tokenizer.kind == "huggingface" and dm.spec.add_bos  # the tokenizer's own convention
    it = dm.train_iterator()
    rows = np.concatenate([next(it)["inputs"] for _ in range(20)])
    it.close()
    assert rows[0, 0] == 1  # every document starts with <|begin|>
    eos = [(r, i) for r, i in zip(*np.nonzero(rows[:, :-1] == 2), strict=True)]
    assert eos and all(rows[r, i + 1] == 1 for r, i in eos)
    cfg.data.add_bos = False
    assert not DataModule(cfg).spec.add_bos


def test_workdir_copy_round_trip_and_tamper_check(tmp_path, hf_dir, trained):
    for tok in (trained, load_tokenizer(hf_dir)):
        d = save_copy(tok, tmp_path / tok.kind)
        back = load_copy(d)
        assert type(back) is type(tok) and back.file_hash() == tok.file_hash()
        assert back.encode(TEXTS) == tok.encode(TEXTS)
        main = d / next(iter(tok.files))
        main.write_bytes(main.read_bytes() + b" ")
        with pytest.raises(ConfigError, match=r"changed since the run copied it"):
            load_copy(d)


def test_tokenizer_sample_is_deterministic_and_bounded():
    docs = [doc_text(i) * 3 for i in range(30)]
    a = training_sentences(docs, 2000)
    assert a == training_sentences(docs, 2000)
    assert 0 < sum(len(s.encode()) for s in a) <= 2000
    assert "".join(_chunks(docs[4] * 200)) == docs[4] * 200


def test_files_a_tokenizer_directory_names_stay_inside_it(tmp_path, hf_dir):
    """A workdir manifest naming ../../etc/passwd, and companions or a chat template linked out of the directory,
    are refused before anything is read (they are not the user's own choice of file)."""
    d = save_copy(load_tokenizer(hf_dir), tmp_path / "copy")
    manifest = json.loads((d / "llmjax_tokenizer.json").read_text())
    manifest["files"]["../../../../../../etc/passwd"] = "0" * 64
    (d / "llmjax_tokenizer.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"llmjax_tokenizer.json: files: '../../../../../../etc/passwd' resolves to "):
        load_copy(d)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (tmp_path / "elsewhere.json").write_text("{}")
    (linked / "tokenizer_config.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ConfigError, match=r"data.tokenizer: 'tokenizer_config.json' resolves to .*elsewhere.json"):
        load_tokenizer(linked)
    (linked / "tokenizer_config.json").unlink()
    (linked / "tokenizer.json").rename(tmp_path / "real.json")
    (linked / "tokenizer.json").symlink_to(tmp_path / "real.json")
    with pytest.raises(ConfigError, match=r"'tokenizer.json' resolves to .*real.json, outside"):
        load_tokenizer(linked)
    assert load_tokenizer(tmp_path / "real.json").vocab_size > 0  # a file the user names is theirs to name
