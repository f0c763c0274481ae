"""`llmjax.guards`: names from files stay inside the directory (links and `..` resolved, hub cache snapshots
allowed), and the memory bound ($LLMJAX_MEMORY_LIMIT, else the RAM)."""

from __future__ import annotations

import os

import pytest

from llmjax.config import ConfigError
from llmjax.guards import containment_root, inside, memory_bound, parse_bytes


def test_inside_accepts_plain_names_and_refuses_escapes(tmp_path):
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "a.safetensors").write_text("x")
    (tmp_path / "secret").write_text("x")
    assert inside(d, "a.safetensors", "src") == d / "a.safetensors"
    assert inside(d, "sub/../a.safetensors", "src") == d / "sub/../a.safetensors"
    assert inside(d, "not-yet-there.bin", "src") == d / "not-yet-there.bin"  # existence is the caller's check
    (d / "inner_link").symlink_to("a.safetensors")
    assert inside(d, "inner_link", "src") == d / "inner_link"
    (d / "outer_link").symlink_to(tmp_path / "secret")
    (d / "loop").symlink_to(d / "loop")
    cases = {"../secret": "outside", str(tmp_path / "secret"): "absolute", "/etc/passwd": "absolute",
             "~/.ssh/id_rsa": "absolute", "outer_link": "outside", "sub/../../secret": "outside", "": "not a file",
             "a\0b": "not a file", 3: "not a file", "loop": "cannot resolve|outside"}
    for name, needle in cases.items():
        with pytest.raises(ConfigError, match=needle) as e:
            inside(d, name, "index.json: weight_map['w']")
        assert str(e.value).startswith("index.json: weight_map['w']: ") and "\n" not in str(e.value)


def test_hub_cache_snapshot_root_is_the_repository(tmp_path):
    repo = tmp_path / "models--org--name"
    snap = repo / "snapshots" / "abc"
    snap.mkdir(parents=True)
    assert containment_root(snap) == snap.resolve()  # no blobs/: not a cache
    (repo / "blobs").mkdir()
    (repo / "blobs" / "h1").write_text("x")
    assert containment_root(snap) == repo.resolve()
    (snap / "config.json").symlink_to("../../blobs/h1")
    assert inside(snap, "config.json", "HF_DIR") == snap / "config.json"
    (snap / "other").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="outside"):
        inside(snap, "other", "HF_DIR")


def test_memory_bound(monkeypatch):
    monkeypatch.delenv("LLMJAX_MEMORY_LIMIT", raising=False)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert memory_bound()[0] == ram and "RAM" in memory_bound()[1]
    monkeypatch.setenv("LLMJAX_MEMORY_LIMIT", "2GiB")
    assert memory_bound() == (2 * 2**30, "LLMJAX_MEMORY_LIMIT=2GiB")
    assert parse_bytes("500MB", "k") == 500 * 10**6 and parse_bytes("1000", "k") == 1000
    monkeypatch.setenv("LLMJAX_MEMORY_LIMIT", "lots")
    with pytest.raises(ConfigError, match="LLMJAX_MEMORY_LIMIT: cannot read 'lots'"):
        memory_bound()
