"""Hugging Face interop: tiny random Llama / Mixtral models built with `transformers` (no download)
give the same float32 logits after import, under one device and under a {data=4, tensor=2} mesh;
bf16/fp16 and sharded checkpoints load; export round-trips bit-exactly and `transformers` reads
it back; `llmjax convert` makes a workdir that eval and train use; unsupported input exits 2."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import yaml
from helpers import tiny_train_overrides

from llmjax.config import ConfigError, MeshConfig
from llmjax.interop import hf
from llmjax.interop.hf_config import model_config_from_hf
from llmjax.parallel.mesh import build_mesh

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf  # (the tests that need neither are in test_hf_weights.py)

ROOT = Path(__file__).resolve().parents[2]
TOKENS = np.random.default_rng(0).integers(0, 512, (2, 12)).astype(np.int32)
COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-5, max_position_embeddings=64)
# Llama: head_dim 32 (not hidden / heads = 16) and an untied head; Mixtral: tied embeddings.
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, head_dim=32),
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2,
                                                  tie_word_embeddings=True),
}
MAX_DIFF: dict[str, float] = {}


def make_model(kind: str):
    torch.manual_seed(0)
    cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.MixtralForCausalLM
    model = cls(CONFIGS[kind]()).eval()
    with torch.no_grad():  # larger than init, so that logits and routing are far from uniform
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 if p.ndim > 1 else torch.rand_like(p) + 0.5)
    return model


def torch_logits(model, tokens: np.ndarray = TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def save_reference(kind: str, tmp_path_factory) -> tuple:
    """(kind, torch model, HF dir written by save_pretrained, reference logits)."""
    model = make_model(kind)
    path = tmp_path_factory.mktemp(kind)
    model.save_pretrained(path)
    return kind, model, path, torch_logits(model)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save_reference("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return save_reference("mixtral", tmp_path_factory)


@pytest.fixture(scope="module", params=["llama", "mixtral"])
def saved(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def loaded(saved):
    kind, _, path, ref = saved
    model, params = hf.load(path)
    return model, params


def assert_logits_close(out: np.ndarray, ref: np.ndarray, kind: str) -> None:
    assert out.shape == ref.shape == (*TOKENS.shape, 512)
    MAX_DIFF[kind] = max(MAX_DIFF.get(kind, 0.0), float(np.abs(out - ref).max()))
    print(f"{kind}: max |logit diff| {np.abs(out - ref).max():.2e} (max |logit| {np.abs(ref).max():.2f})")
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def flat(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


# ----------------------------------------------------------------------------- import


def test_logits_equal_transformers(saved, loaded):
    kind, _, _, ref = saved
    model, params = loaded
    cfg = model.cfg
    if kind == "mixtral":
        assert cfg.tie_embeddings and "lm_head" not in params
        assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.score, cfg.moe.renormalize) == (4, 2, "softmax", True)
        assert cfg.moe.capacity_factor <= 0 and cfg.moe.every == 1
    else:
        assert cfg.resolved_head_dim == 32 and params["layers"]["attn"]["q"]["kernel"].shape == (2, 64, 4, 32)
    assert cfg.rope_theta == 5000.0 and cfg.n_kv_heads == 2
    assert_logits_close(np.asarray(jax.jit(model.apply)({"params": params}, TOKENS)), ref, kind)


def test_import_under_a_mesh_is_sharded_and_equal(saved):
    kind, _, path, ref = saved
    mesh = build_mesh(MeshConfig(data=4, tensor=2))
    model, params = hf.load(path, mesh=mesh)
    q = params["layers"]["attn"]["q"]["kernel"]
    assert q.sharding.spec[2] == "tensor" and len(q.sharding.device_set) == 8
    assert {s.data.shape for s in q.addressable_shards} == {(2, 64, 2, q.shape[3])}  # half the heads each
    out = jax.jit(model.apply)({"params": params}, TOKENS)
    assert_logits_close(np.asarray(out), ref, kind)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_and_sharded_index(saved, loaded, tmp_path, dtype):
    """A checkpoint saved in bf16/fp16, in several files with an index, loads the rounded weights exactly."""
    kind, model, _, _ = saved
    half = make_model(kind).to(getattr(torch, dtype))
    half.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    _, params = hf.load(tmp_path)
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    ref = flat(loaded[1])
    got = flat(params)
    assert ref.keys() == got.keys()
    for k in ref:
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], ref[k].astype(np_dtype).astype(np.float32), err_msg=k)


def test_fused_mixtral_expert_names(mixtral, tmp_path):
    """Newer transformers keep Mixtral experts fused in memory (gate_up_proj, down_proj); such files load too."""
    _, model, path, _ = mixtral
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if "model.layers.0.mlp.experts.gate_up_proj" not in state:
        pytest.skip("this transformers version keeps experts unfused in memory")
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(path / "config.json", tmp_path / "config.json")
    _, params = hf.load(tmp_path)
    ref, got = flat(hf.load(path)[1]), flat(params)
    assert ref.keys() == got.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


# ----------------------------------------------------------------------------- export


def test_export_round_trips_and_transformers_reads_it(saved, loaded, tmp_path):
    kind, _, _, ref = saved
    model, params = loaded
    files = hf.save(model.cfg, params, tmp_path / "out", max_shard_bytes=200_000)
    assert len(files) > 1 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    _, again = hf.load(tmp_path / "out")
    a, b = flat(params), flat(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == ("LlamaForCausalLM" if kind == "llama" else "MixtralForCausalLM")
    np.testing.assert_allclose(torch_logits(back), ref, atol=1e-5, rtol=1e-5)


def test_export_refuses_models_without_an_hf_equivalent(loaded, tmp_path):
    model, params = loaded
    for change, key in ((dict(norm="layernorm"), "model.norm"), (dict(mlp="gelu"), "model.mlp")):
        with pytest.raises(ConfigError, match=key):
            hf.save(dataclasses.replace(model.cfg, **change), params, tmp_path)


# ----------------------------------------------------------------------------- config errors


def llama_json(**changes) -> dict:
    data = transformers.LlamaConfig(**COMMON).to_dict()
    data.update(changes)
    return data


@pytest.mark.parametrize("changes, field", [
    (dict(model_type="gpt2"), "model_type"),
    (dict(rope_scaling={"rope_type": "longrope", "factor": 8.0}), "rope_scaling.rope_type"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}),
     "rope_parameters.low_freq_factor: missing"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "mscale": 0.7}),
     "rope_parameters.mscale"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 0.5}), "rope_parameters.factor"),
    (dict(model_type="mistral", sliding_window=4, layer_types=["full_attention", "sliding_attention"]),
     "layer_types: this pattern"),
    (dict(model_type="gemma", hidden_act="gelu"), "hidden_act"),
    (dict(model_type="qwen3", attention_bias=True), "attention_bias"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_size=None), "hidden_size"),
])
def test_unsupported_config_names_the_field(changes, field):
    with pytest.raises(ConfigError, match=field) as e:
        model_config_from_hf(llama_json(**changes), "x/config.json")
    assert "x/config.json" in str(e.value)


def test_config_variants():
    old_style = llama_json(rope_theta=123.0, rope_scaling=None)
    del old_style["rope_parameters"]
    assert model_config_from_hf(old_style)[0].rope_theta == 123.0
    mistral = dict(llama_json(model_type="mistral"), sliding_window=16, max_position_embeddings=64)
    cfg, _ = model_config_from_hf(mistral)
    assert cfg.max_seq_len == 64 and cfg.sliding_window == 16 and cfg.global_every == 0
    assert model_config_from_hf(dict(mistral, sliding_window=None))[0].sliding_window == 0
    assert "never applies" in model_config_from_hf(dict(mistral, sliding_window=64))[1][0]
    every_third = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    cfg, _ = model_config_from_hf(dict(mistral, num_hidden_layers=6, layer_types=every_third))
    assert (cfg.sliding_window, cfg.global_every) == (16, 3)
    legacy = dict(llama_json(rope_scaling={"type": "linear", "factor": 2.0}), rope_parameters=None)
    assert model_config_from_hf(legacy)[0].rope_scaling.type == "linear"


def test_weights_that_do_not_match_the_config(llama, tmp_path):
    _, _, path, _ = llama
    shutil.copytree(path, tmp_path / "m")
    data = json.loads((path / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(data, intermediate_size=128)))
    with pytest.raises(ConfigError, match=r"mlp.gate_proj.weight has shape \[96, 64\].*\[128, 64\]"):
        hf.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(data, num_hidden_layers=3)))
    with pytest.raises(ConfigError, match="model.layers.2.* is missing"):
        hf.load(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(data, num_hidden_layers=1)))
    with pytest.raises(ConfigError, match="does not account for: model.layers.1"):
        hf.load(tmp_path / "m")
    for f in (tmp_path / "m").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ConfigError, match=r"no \*.safetensors file .*PyTorch \*.bin weights are not read"):
        hf.load(tmp_path / "m")


# ----------------------------------------------------------------------------- CLI


def llmjax(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmjax.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_cli_convert_then_eval_train_and_export(llama, tmp_path, corpus):
    _, _, path, _ = llama
    from llmjax.data.tokenizers.sp_tokenizer import train_sentencepiece, training_sentences

    text = [p.read_text() for p in sorted(Path(corpus).iterdir())]
    hf_dir = tmp_path / "hf"
    shutil.copytree(path, hf_dir)
    (hf_dir / "tokenizer.model").write_bytes(train_sentencepiece(training_sentences(text, 200_000), 512, "bpe"))
    overrides = [o for o in tiny_train_overrides(corpus) if not o.startswith("model.")]
    overrides += ["model.compute_dtype=float32", "train.steps=2", "eval.every_steps=0", "sample.max_new_tokens=0"]
    work = tmp_path / "work"
    r = llmjax("convert", "from-hf", hf_dir, work, *overrides)
    assert r.returncode == 0, r.stderr
    saved_cfg = yaml.safe_load((work / "config.yaml").read_text())
    assert saved_cfg["model"]["head_dim"] == 32 and saved_cfg["model"]["rope_theta"] == 5000.0
    assert saved_cfg["data"]["tokenizer"] == str((work / "tokenizer").absolute())  # the workdir's tokenizer copy
    assert (work / "tokenizer" / "tokenizer.model").read_bytes() == (hf_dir / "tokenizer.model").read_bytes()

    r = llmjax("eval", "--workdir", work, "--batches", 1)
    assert r.returncode == 0, r.stderr
    assert "restored step 0" in r.stderr and "perplexity" in r.stdout

    r = llmjax("train", "--config", work / "config.yaml", "--workdir", work)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stderr and (work / "checkpoints" / "2").is_dir()
    losses = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in losses if "loss" in m] == [0, 1]

    out = tmp_path / "exported"
    r = llmjax("convert", "to-hf", work, out, "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    assert (out / "tokenizer.model").is_file()
    generation = json.loads((out / "generation_config.json").read_text())  # the SentencePiece model's ids
    assert generation["eos_token_id"] == json.loads((out / "config.json").read_text())["eos_token_id"] is not None
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert back.config.head_dim == 32 and back.config.num_key_value_heads == 2


def test_cli_convert_stores_the_models_tokenizer_json(llama, tmp_path):
    """A model shipping a tokenizer.json (+ tokenizer_config.json): generate uses it with no data setting."""
    from tokenizers import Tokenizer as T
    from tokenizers import decoders, models, pre_tokenizers, trainers

    _, _, path, _ = llama
    hf_dir = tmp_path / "hf"
    shutil.copytree(path, hf_dir)
    tok = T(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(["def f(x):\n    return x\n"] * 50, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    work = tmp_path / "work"
    r = llmjax("convert", "from-hf", hf_dir, work, "model.compute_dtype=float32", "data.seq_len=32")
    assert r.returncode == 0, r.stderr
    assert (work / "tokenizer" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    assert (work / "tokenizer" / "tokenizer_config.json").is_file()
    r = llmjax("generate", "--workdir", work, "--prompt", "def f(", "--max-new-tokens", 4)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def f(")
    out = tmp_path / "exported"
    r = llmjax("convert", "to-hf", work, out)
    assert r.returncode == 0, r.stderr
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()


@pytest.mark.parametrize("case, needles", [
    ("missing", ["HF_DIR", "not a directory"]),
    ("model_type", ["model_type", "'gpt2' is not supported"]),
    ("rope", ["rope_scaling.rope_type", "longrope"]),
    ("override", ["model.d_model", "cannot be overridden"]),
])
def test_cli_convert_errors_exit_2(llama, tmp_path, case, needles):
    _, _, path, _ = llama
    hf_dir = tmp_path / "hf"
    extra = []
    if case != "missing":
        shutil.copytree(path, hf_dir)
        data = json.loads((hf_dir / "config.json").read_text())
        if case == "model_type":
            data["model_type"] = "gpt2"
        elif case == "rope":
            data["rope_scaling"] = {"rope_type": "longrope", "factor": 8.0}
        else:
            extra = ["model.d_model=128"]
        (hf_dir / "config.json").write_text(json.dumps(data))
    r = llmjax("convert", "from-hf", hf_dir, tmp_path / "work", *extra)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "llmjax: error:" in r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr
    assert not (tmp_path / "work").exists()
