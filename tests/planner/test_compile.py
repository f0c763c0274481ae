"""`llmjax compile`: the real train step compiled for TPU topologies on this CPU machine (libtpu),
memory figures that move the right way with FSDP, remat and the chunked loss, the accelerator
presets in CI-sized form, and usage errors (exit 2) before any compile."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
from helpers import tiny_config

from llmjax.cli import main
from llmjax.config import ConfigError, load_config, validate
from llmjax.planner import analysis, topology
from llmjax.planner.command import compile_train_step, with_slices
from llmjax.planner.gpu import cuda_plugin_installed, parse_gpu_name

ROOT = Path(__file__).resolve().parents[2]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install 'llmjax[tpu]')")

SMALL = ("model.compute_dtype=bfloat16", "model.d_model=128", "model.n_layers=2", "model.n_heads=4",
         "model.n_kv_heads=2", "model.d_ff=256", "model.vocab_size=2048", "data.seq_len=128", "model.max_seq_len=128")


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("name,mesh", [("v5e-8", ("mesh.data=2", "mesh.fsdp=4")),
                                       ("v5p-32", ("mesh.data=2", "mesh.fsdp=4", "mesh.tensor=2"))])
def test_compile_succeeds(name, mesh, capsys):
    """v5e-8 (2 hosts) and v5p-32 (16 chips on 4 hosts)."""
    assert main(["compile", "--topology", name, *SMALL, "train.batch_size=16", *mesh]) == 0
    out = capsys.readouterr().out
    assert f"target: {name} =" in out and "fits" in out and "roofline per step" in out
    assert "over " + ("8" if name == "v5e-8" else "16") + " tpu devices" in out


@pytest.mark.slow
@pytest.mark.skipif(not cuda_plugin_installed(), reason="jax's CUDA plugin is not installed (llmjax[gpu-compile])")
def test_compile_for_gpus_without_a_gpu(capsys):
    """8 x H100 from a written target description; cuDNN attention is refused (no cuDNN library here)."""
    assert main(["compile", "--topology", "h100-8", *SMALL, "train.batch_size=16", "mesh.data=2", "mesh.fsdp=4",
                 "model.attention=chunked", "model.loss_chunk=64"]) == 0
    out = capsys.readouterr().out
    assert "(NVIDIA H100 80GB HBM3)" in out and "of 74.51 GiB HBM" in out and "fits" in out  # 80 GB
    assert main(["compile", "--topology", "h100-8", *SMALL, "model.attention=cudnn"]) == 2
    assert "model.attention=cudnn: jax cannot use cuDNN here" in capsys.readouterr().err


def memory_of(*overrides: str) -> analysis.Memory:
    """2 layers of width 256, vocab 32768, 8 x 256 tokens per device of v5e-8."""
    cfg = tiny_config(*SMALL, "model.d_model=256", "model.d_ff=1024", "model.n_layers=2", "model.vocab_size=32768",
                      "data.seq_len=256", "model.max_seq_len=256", "train.batch_size=64", *overrides)
    target = topology.load_target("v5e-8")
    validate(cfg, len(target.devices))
    _, compiled = compile_train_step(cfg, target)
    return analysis.memory(compiled)


@pytest.mark.slow
@needs_libtpu
def test_memory_moves_the_expected_way():
    """Measured: temporaries 447 -> 65 MiB with the chunked loss, -> 42 MiB adding remat; arguments
    215 -> 27 MiB with fsdp=8."""
    dense = memory_of("mesh.data=8")  # the float32 logits alone are 256 MiB a device
    chunked = memory_of("mesh.data=8", "model.loss_chunk=64")
    remat = memory_of("mesh.data=8", "model.loss_chunk=64", "model.remat=full")
    fsdp = memory_of("mesh.data=1", "mesh.fsdp=8", "model.loss_chunk=64")
    assert chunked.temporaries < dense.temporaries / 3
    assert remat.temporaries < 0.8 * chunked.temporaries  # the saved activations go
    assert fsdp.arguments < chunked.arguments / 4  # parameters and optimizer state split 8 ways


PRESETS_CI = {
    "dense_1b_v5p64.yaml": ("mesh.fsdp=2", "mesh.tensor=2"),
    "moe_1b_v5p64.yaml": ("mesh.fsdp=2", "mesh.expert=2", "model.moe.num_experts=4"),
    "llama_1b_128k_v5p64.yaml": ("mesh.fsdp=1", "mesh.context=4"),
}


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("preset", list(PRESETS_CI))
def test_presets_compile_in_ci_size(preset, capsys):
    """Each accelerator preset, two small layers and short rows, on v5p-8 (4 chips)."""
    small = ("model.d_model=256", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=512",
             "model.vocab_size=4096", "data.seq_len=256", "train.batch_size=8", "mesh.data=1")
    code = main(["compile", "--topology", "v5p-8", "--config", f"llmjax/configs/{preset}", *small,
                 *PRESETS_CI[preset]])
    out = capsys.readouterr().out
    assert code == 0, out
    assert ("attention chunked" if "128k" in preset else "attention splash") in out and "fits" in out
    if "mesh.context=4" in PRESETS_CI[preset]:
        assert "the sequence split over context=4 (64 tokens of a row per device" in out


@pytest.mark.parametrize("name,message", [
    ("v5e-7", "no v5e slice of that size"),
    ("v9-8", "unknown TPU generation 'v9'"),
    ("v5p:2x2", "v5p layouts have 3 dimensions"),
    ("tpu8", "expected an accelerator type"),
])
def test_bad_topology_names(name, message):
    with pytest.raises(ConfigError, match=message):
        topology.parse_tpu_name(name)


def test_gpu_names():
    assert parse_gpu_name("h100-8") == ("h100", 8) and parse_gpu_name("H200-16") == ("h200", 16)
    assert parse_gpu_name("v5e-8") is None
    with pytest.raises(ConfigError, match="multiple of 8"):
        parse_gpu_name("h100-12")


def test_names_resolve_to_layouts():
    assert topology.parse_tpu_name("v5p-64") == ("v5p:2x4x4", "v5p")
    assert topology.parse_tpu_name("v4-128") == ("v4:4x4x4", "v4")
    assert topology.parse_tpu_name("v6e-256") == ("v6e:16x16", "v6e")
    assert topology.parse_tpu_name("v5e-8") == ("v5e:2x4", "v5e")
    assert topology.parse_tpu_name("v5e:4x8") == ("v5e:4x8", "v5e")


def test_usage_errors_exit_2(capsys, monkeypatch):
    assert main(["compile", "--topology", "v9-8"]) == 2
    assert "unknown TPU generation" in capsys.readouterr().err
    monkeypatch.setattr(topology, "libtpu_path", lambda: None)
    assert main(["compile", "--topology", "v5e-8"]) == 2
    assert "needs libtpu, which is not installed: pip install 'llmjax[tpu]'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="multiply to 4, but --slices is 2"):
        with_slices(load_config(None, ["mesh.dcn_data=4"]), 2)
    assert with_slices(load_config(None, []), 2).mesh.dcn_data == 2


@needs_libtpu
def test_mesh_that_does_not_cover_the_topology_exits_2(capsys):
    assert main(["compile", "--topology", "v5e-8", "mesh.data=3"]) == 2
    assert "--topology v5e-8 has 8 devices" in capsys.readouterr().err


def test_gpu_xla_flags_are_known_to_this_xla():
    """launch/xla_flags_gpu.sh sets only flags the installed XLA parses (it aborts on unknown ones)."""
    code = "import jax.numpy as j; j.ones(1).block_until_ready()"
    script = f"source launch/xla_flags_gpu.sh && echo $XLA_FLAGS && python3 -c '{code}'"
    r = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in r.stdout
