"""A downloaded Hugging Face directory is untrusted: `convert from-hf` and `hf.load` read no file outside it
(weight_map shard names, links), refuse absurd sizes before building anything, and a hub cache snapshot
(files linked into ../../blobs) still loads. Every refusal: exit 2, one line naming the entry and the file."""

from __future__ import annotations

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_llmjax, tiny_config

from llmjax.cli import main
from llmjax.config import ConfigError
from llmjax.interop import hf

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A tiny Llama written by `hf.save` (config.json + model.safetensors) -> (directory, params)."""
    from llmjax.models.transformer import Transformer

    cfg = tiny_config("model.vocab_size=64", "model.d_model=32", "model.d_ff=64", "model.n_layers=1").model
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"])
    d = tmp_path_factory.mktemp("hf") / "model"
    hf.save(cfg, params, d)
    return d, params


def copy_model(hf_model, tmp_path):
    d = tmp_path / "downloads" / "model"
    shutil.copytree(hf_model[0], d)
    return d


def refused(capsys, args, *needles):
    """`llmjax ARGS` in process: exit 2, one line on stderr holding every needle, no traceback."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmjax: error:") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def no_open(monkeypatch):
    """Fail the test if any safetensors file is opened."""
    import llmjax.interop.hf_weights as weights

    def fail(path, *a, **k):
        raise AssertionError(f"opened {path}")

    monkeypatch.setattr(weights, "safe_open", fail)


@pytest.mark.parametrize("entry", ["../../outside/secret.safetensors", "ABSOLUTE", "/etc/passwd",
                                   "/proc/self/environ", "sub/../../outside/secret.safetensors"])
def test_weight_map_entries_outside_the_directory_are_refused_unopened(hf_model, tmp_path, capsys, monkeypatch,
                                                                      entry):
    d = copy_model(hf_model, tmp_path)
    secret = tmp_path / "outside" / "secret.safetensors"
    secret.parent.mkdir()
    shutil.copy(d / "model.safetensors", secret)  # a valid file: before the fix it was imported (exit 0)
    (d.parent / "outside").symlink_to(secret.parent)
    if entry == "ABSOLUTE":
        entry = str(secret)
    (d / INDEX).write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": entry,
                                                      "model.norm.weight": "model.safetensors"}}))
    no_open(monkeypatch)
    work = tmp_path / "work"
    refused(capsys, ["convert", "from-hf", d, work], INDEX, "weight_map['model.embed_tokens.weight']", repr(entry))
    assert not work.exists()


def test_links_out_of_the_directory_are_refused(hf_model, tmp_path, capsys, monkeypatch):
    """model.safetensors, config.json or tokenizer.json linked to a file elsewhere is never read."""
    d = copy_model(hf_model, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.move(d / name, elsewhere / name)
        (d / name).symlink_to(elsewhere / name)
        with pytest.raises(ConfigError, match=f"'{name}' resolves to {elsewhere / name}, outside {d}"):
            hf.load(d)
        os.unlink(d / name)
        shutil.move(elsewhere / name, d / name)
    (d / "tokenizer.json").symlink_to("/etc/passwd")
    no_open(monkeypatch)
    refused(capsys, ["convert", "from-hf", d, tmp_path / "work"], "'tokenizer.json' resolves to /etc/passwd")


def test_a_hub_cache_snapshot_loads_through_its_blob_links(hf_model, tmp_path):
    """models--org--name/snapshots/<rev>/<file> -> ../../blobs/<hash>: the repository directory is the root."""
    from llmjax.data.tokenizers.tokenizer import load_tokenizer

    src, params = hf_model
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    shutil.copy(os.path.join(os.path.dirname(__file__), "../../experiments/data/chat_tokenizer/tokenizer.json"),
                src.parent / "tokenizer.json")
    for i, name in enumerate(("config.json", "model.safetensors")):
        shutil.copy(src / name, repo / "blobs" / f"hash{i}")
        (snapshot / name).symlink_to(f"../../blobs/hash{i}")
    shutil.copy(src.parent / "tokenizer.json", repo / "blobs" / "hash_tok")
    (snapshot / "tokenizer.json").symlink_to("../../blobs/hash_tok")
    _, loaded = hf.load(snapshot)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert load_tokenizer(snapshot).vocab_size > 0
    # a snapshot link that leaves the repository directory is refused like any other
    outside = tmp_path / "hub" / "models--other--x" / "blobs"
    outside.mkdir(parents=True)
    shutil.copy(src / "model.safetensors", outside / "h")
    os.unlink(snapshot / "model.safetensors")
    (snapshot / "model.safetensors").symlink_to("../../../models--other--x/blobs/h")
    with pytest.raises(ConfigError, match="outside .*models--org--tiny"):
        hf.load(snapshot)


def test_sizes_in_config_json_are_checked_before_anything_is_built(hf_model, tmp_path):
    """num_hidden_layers: 10000000 (and a huge vocabulary) is refused by the trainer's memory estimate in seconds
    (before: a name table growing past 7.5 GB)."""
    d = copy_model(hf_model, tmp_path)
    data = json.loads((d / "config.json").read_text())
    for field, value, needle in (("num_hidden_layers", 10_000_000, "model.n_layers=10000000"),
                                 ("vocab_size", 10**12, "model.vocab_size=1000000000000")):
        (d / "config.json").write_text(json.dumps({**data, field: value}))
        with pytest.raises(ConfigError, match=needle):  # the library: parameters alone against the devices
            hf.load(d)


@pytest.mark.slow  # a subprocess: 5-7 s
def test_convert_refuses_a_config_json_of_ten_million_layers(hf_model, tmp_path):
    d = copy_model(hf_model, tmp_path)
    data = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**data, "num_hidden_layers": 10_000_000}))
    r = run_llmjax("convert", "from-hf", d, tmp_path / "work", "data.seq_len=32", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{d / 'config.json'}: model: about" in r.stderr and "model.n_layers=10000000" in r.stderr, r.stderr
    assert "more than the memory of" in r.stderr and not (tmp_path / "work").exists()
