"""Hugging Face interop without torch or transformers: reading blocks of merged safetensors layouts, and
`llmjax convert to-hf`'s usage errors (moved from test_hf.py, whose tests need transformers)."""

from __future__ import annotations

import numpy as np
from helpers import run_llmjax


def test_read_block_reads_any_block_of_a_merged_layout(tmp_path):
    """Blocks that split the merged (H, E) dimension anywhere, inner dimension included, equal the
    same block of the fully transformed tensors (what a sharding over any logical axis asks for)."""
    from safetensors.numpy import save_file

    from llmjax.interop.hf_names import _linear, _names
    from llmjax.interop.hf_weights import SafetensorsReader, read_block

    N, H, E, D = 3, 4, 6, 5
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(D, H * E)).astype(np.float32) for _ in range(N)]  # o_proj [D, H*E]
    save_file({f"l.{n}.o": w for n, w in enumerate(weights)}, str(tmp_path / "model.safetensors"))
    src = _linear(_names("l.{}.o", N), 2, (H, E, D))
    full = np.stack([w.T.reshape(H, E, D) for w in weights])  # [N, H, E, D]
    reader = SafetensorsReader(tmp_path)
    cases = [
        ((0, 3), (0, 4), (0, 6), (0, 5)),  # everything
        ((1, 2), (1, 3), (2, 5), (0, 5)),  # some layers, heads and head dims
        ((2, 3), (3, 4), (0, 1), (4, 5)),
    ]
    for bounds in cases:
        block = read_block(reader, src, full.shape, bounds, np.float32)
        np.testing.assert_array_equal(block, full[tuple(slice(*b) for b in bounds)])


def test_cli_to_hf_errors_exit_2(tmp_path):
    r = run_llmjax("convert", "to-hf", tmp_path / "nowhere", tmp_path / "out")
    assert r.returncode == 2 and "not a directory" in r.stderr, r.stderr
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    r = run_llmjax("convert", "to-hf", tmp_path, tmp_path / "out", "--max-shard-size", "lots")
    assert r.returncode == 2 and "--max-shard-size" in r.stderr, r.stderr
    r = run_llmjax("convert", "to-hf", tmp_path, tmp_path / "out")
    assert r.returncode == 2 and "not an empty directory" in r.stderr, r.stderr
