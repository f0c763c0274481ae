"""Hugging Face families beyond Llama: tiny random `transformers` models (built offline from configs) of
Llama 3 with each RoPE scaling, Qwen2 (q/k/v biases, tied and untied), Qwen3 (QK-norm), Gemma, Gemma 2
(soft-capping, sandwich norms, local/global layers) and Mistral (sliding window). For each: float32 logits
within 1e-4 of `transformers` on one device and on {data=2, tensor=2}, over a sequence longer than the
sliding window and past the original context of a scaled RoPE; greedy continuations (prefill + cached
decode) identical to `transformers.generate`; export -> `transformers` gives the same logits; export ->
re-import is bit-identical."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from llmjax.config import MeshConfig
from llmjax.infer.engine import Engine
from llmjax.infer.sampling import SamplingParams
from llmjax.interop import hf
from llmjax.parallel.mesh import build_mesh
from llmjax.parallel.rules import make_rules

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

VOCAB, LENGTH, WINDOW, ORIGINAL = 256, 24, 6, 8  # 24 tokens: 4x the window, 3x the original context
TOKENS = np.random.default_rng(1).integers(0, VOCAB, (2, LENGTH)).astype(np.int32)
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=64)


def rope(kind: str, **extra) -> dict:
    return {"rope_parameters": {"rope_type": kind, "rope_theta": 10000.0, "factor": 4.0, **extra}}


SCALED = dict(max_position_embeddings=ORIGINAL)  # linear / dynamic scale from max_position_embeddings
CASES = {
    "llama3": ("LlamaConfig", dict(BASE, **rope("llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                                                  original_max_position_embeddings=ORIGINAL))),
    "llama_linear": ("LlamaConfig", dict(BASE, **SCALED, **rope("linear"))),
    "llama_dynamic": ("LlamaConfig", dict(BASE, **SCALED, **rope("dynamic"))),
    "qwen2_yarn": ("Qwen2Config", dict(BASE, **rope("yarn", original_max_position_embeddings=ORIGINAL),
                                       tie_word_embeddings=False)),
    "qwen2_tied": ("Qwen2Config", dict(BASE, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(BASE, tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", dict(BASE, hidden_act="gelu_pytorch_tanh")),
    "gemma2": ("Gemma2Config", dict(BASE, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "mistral": ("MistralConfig", dict(BASE, sliding_window=WINDOW)),
}
EXPECTED = {  # llmjax keys each import must set
    "llama3": dict(rope_scaling=("llama3", 4.0, ORIGINAL)), "llama_linear": dict(rope_scaling=("linear", 4.0, 8)),
    "llama_dynamic": dict(rope_scaling=("dynamic", 4.0, 8)), "qwen2_yarn": dict(qkv_bias=True),
    "qwen2_tied": dict(qkv_bias=True, tie_embeddings=True), "qwen3": dict(qk_norm=True),
    "gemma": dict(norm_scale_offset=1.0, scale_embeddings=True, mlp="geglu", tie_embeddings=True),
    "gemma2": dict(post_norms=True, sliding_window=WINDOW, global_every=2, attn_softcap=5.0, logit_softcap=3.0,
                   attention_scale_dim=24.0),
    "mistral": dict(sliding_window=WINDOW, global_every=0),
}


def build(kind: str):
    config_cls, fields = CASES[kind]
    config = getattr(transformers, config_cls)(**fields)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger than init, so that logits are far from uniform; norms and biases away from 0/1
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 if p.ndim > 1 else torch.rand_like(p) * 0.5 + 0.5)
    return model


def torch_logits(model, tokens: np.ndarray = TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def flat(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture(scope="module", params=list(CASES))
def reference(request, tmp_path_factory):
    """(kind, torch model, its save_pretrained directory, reference logits, llmjax model, params)."""
    kind = request.param
    model = build(kind)
    path = tmp_path_factory.mktemp(kind)
    model.save_pretrained(path)
    ours, params = hf.load(path)
    return kind, model, path, torch_logits(build(kind)), ours, params  # a fresh model: dynamic RoPE is stateful


def close(out: np.ndarray, ref: np.ndarray, kind: str) -> None:
    err = float(np.abs(out - ref).max())
    print(f"{kind}: max |logit diff| {err:.2e} (max |logit| {np.abs(ref).max():.2f})")
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_import_sets_the_family_keys(reference):
    kind, _, _, _, ours, _ = reference
    cfg = ours.cfg
    for key, value in EXPECTED[kind].items():
        got = getattr(cfg, key)
        if key == "rope_scaling":
            got = (got.type, got.factor, got.original_max_seq_len)
        assert got == value, (kind, key)
    if cfg.rope_scaling.enabled:
        assert cfg.max_seq_len >= 4 * ORIGINAL  # the extended context


def test_logits_equal_transformers_one_device(reference):
    kind, _, _, ref, ours, params = reference
    close(np.asarray(jax.jit(ours.apply)({"params": params}, TOKENS)), ref, kind)


def test_logits_equal_transformers_on_data2_tensor2(reference):
    kind, _, path, ref, _, _ = reference
    mesh = build_mesh(MeshConfig(data=2, tensor=2), devices=jax.devices()[:4])
    ours, params = hf.load(path, mesh=mesh)
    q = params["layers"]["attn"]["q"]["kernel"] if "attn" in params["layers"] else \
        params["layers"]["block_0"]["attn"]["q"]["kernel"]
    assert "tensor" in q.sharding.spec and len(q.sharding.device_set) == 4
    close(np.asarray(jax.jit(ours.apply)({"params": params}, TOKENS)), ref, kind)


def test_greedy_continuation_equals_transformers_generate(reference):
    """Prefill 10 tokens, then 14 cached decode steps: past the window and the original RoPE context."""
    kind, _, _, _, ours, params = reference
    prompt, new = TOKENS[:1, :10], 14
    with torch.no_grad():
        out = build(kind).generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=new, do_sample=False,
                                   min_new_tokens=new, eos_token_id=None, pad_token_id=0)
    want = out[0, prompt.shape[1]:].tolist()
    mesh = build_mesh(MeshConfig(data=1, tensor=2), devices=jax.devices()[:2])
    engine = Engine(ours.cfg, hf.load(reference[2], mesh=mesh)[1], mesh, make_rules(None, dict(mesh.shape), 2))
    got = engine.generate([prompt[0].tolist()], SamplingParams(max_new_tokens=new))[0].tokens
    single = Engine(ours.cfg, params).generate([prompt[0].tolist()], SamplingParams(max_new_tokens=new))[0].tokens
    assert got == want and single == want, kind


def test_export_then_transformers_and_reimport(reference, tmp_path):
    kind, model, _, ref, ours, params = reference
    hf.save(ours.cfg, params, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(back).__name__ == type(model).__name__
    np.testing.assert_allclose(torch_logits(back), ref, atol=1e-5, rtol=1e-5)
    again_model, again = hf.load(tmp_path / "out")
    assert again_model.cfg == ours.cfg
    a, b = flat(params), flat(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
