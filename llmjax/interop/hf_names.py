"""The name table: which Hugging Face tensor (per layer, per expert) each llmjax parameter comes from.

A `Source` gives the tensor names, stacked along the parameter's leading dimensions, and how
each on-disk dimension holds the parameter's own. A torch `Linear` weight is [out, in] while our
kernels are [in..., out...] with heads split out, e.g.

  q_proj.weight [H*E, D]  -> layers/attn/q/kernel [N, D, H, E]     (q_proj.bias [H*E] -> q/bias [N, H, E])
  o_proj.weight [D, H*E]  -> layers/attn/o/kernel [N, H, E, D]
  experts.e.w1.weight [F, D] -> layers/moe/experts/wi_0_kernel [N, X, D, F]  (w3: wi_1, w2: wo)

RoPE needs no permutation: ours is HF's rotate-half convention. The names depend only on the
`ModelConfig`: q/k/v biases (`qkv_bias`, Qwen2), `self_attn.q_norm/k_norm` (`qk_norm`, Qwen3), and
with `post_norms` (Gemma 2) the four norms of a layer are input_layernorm, post_attention_layernorm
(on the attention output), pre_feedforward_layernorm and post_feedforward_layernorm, while a Llama
layer's post_attention_layernorm is its pre-MLP norm. Gemma's norms store the deviation from 1,
which is our scale under `norm_scale_offset=1`, so no tensor is transformed.

When layers differ (local/global attention every k layers, MoE every k layers) the stack is made of
groups of k blocks (`llmjax.models.blocks.BlockGroup`): parameters `layers/block_{j}/...` with a
leading [N / k] dimension hold layers j, k + j, 2k + j, ...

Mixtral experts are read from the classic per-expert names (`block_sparse_moe.experts.E.w1/w2/w3.weight`,
what `save_pretrained` writes) or, when those are absent, from fused stacks (`mlp.experts.gate_up_proj`
[X, 2F, D], gate rows first, and `mlp.experts.down_proj` [X, D, F], router `mlp.gate.weight`). Exports
use the classic names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from llmjax.config import ModelConfig
from llmjax.models.blocks import layer_windows
from llmjax.models.feedforward import layer_kinds

Path_ = tuple[str, ...]  # a parameter's path in the tree, e.g. ("layers", "attn", "q", "kernel")


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one llmjax parameter comes from.

    names: HF tensor names, shaped like the parameter's leading (stacked) dimensions: [] for
        an unstacked parameter, [N] per layer, [N, X] per layer and expert.
    groups: for each dimension of one on-disk tensor, the dimensions of the parameter's
        per-tensor block that it holds, major first (merged dimensions, e.g. (H, E) -> H*E).
    offsets: for each on-disk dimension, where our rows start (the up half of a fused gate/up).
    hf_shape: the expected on-disk shape of each tensor.
    """

    names: np.ndarray
    groups: tuple[tuple[int, ...], ...]
    hf_shape: tuple[int, ...]
    offsets: tuple[int, ...] = ()

    def block_shape(self, param_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(param_shape[self.names.ndim:])


def _names(fmt: str, *dims: int) -> np.ndarray:
    """An object array of `fmt.format(i, j, ...)` over the index grid `dims`."""
    out = np.empty(dims, dtype=object)
    for idx in np.ndindex(*dims):
        out[idx] = fmt.format(*idx)
    return out


def _layer_names(fmt: str, layers: list[int], *dims: int) -> np.ndarray:
    """An object array [len(layers), *dims] of `fmt.format(layer, j, ...)`."""
    out = np.empty((len(layers), *dims), dtype=object)
    for idx in np.ndindex(*out.shape):
        out[idx] = fmt.format(layers[idx[0]], *idx[1:])
    return out


def _linear(names: np.ndarray, n_in: int, block: tuple[int, ...]) -> Source:
    """A torch Linear weight [out, in] for a kernel block [*in_dims, *out_dims] (n_in input dims)."""
    ins, outs = tuple(range(n_in)), tuple(range(n_in, len(block)))
    return Source(names, (outs, ins), (math.prod(block[n_in:]), math.prod(block[:n_in])))


def _same(names: np.ndarray, block: tuple[int, ...]) -> Source:
    """A tensor stored exactly as our per-tensor block (embedding table, norm scale)."""
    return Source(names, tuple((d,) for d in range(len(block))), tuple(block))


def _merged(names: np.ndarray, block: tuple[int, ...]) -> Source:
    """A 1-D tensor holding our block's dimensions merged (a bias [H*E] for a block [H, E])."""
    return Source(names, (tuple(range(len(block))),), (math.prod(block),))


def layer_period(m: ModelConfig) -> int:
    """Blocks per scanned unit (`llmjax.models.blocks.stack_unit`): 1 when every layer is alike."""
    n = m.n_layers
    kinds = tuple(zip(layer_kinds(m), layer_windows(m), strict=True))
    return next(p for p in range(1, n + 1) if n % p == 0 and kinds == kinds[:p] * (n // p))


def _layer_sources(m: ModelConfig, layer: Callable[..., np.ndarray], kind: str, fused_experts: bool
                   ) -> dict[Path_, Source]:
    """One block's parameters (paths relative to the block) -> sources; `layer(suffix, *dims)` names them."""
    D, F = m.d_model, m.d_ff
    H, K, E = m.n_heads, m.n_kv_heads, m.resolved_head_dim
    norms: tuple[tuple[str, str], ...] = (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"))
    if m.post_norms:
        norms = (("attn_norm", "input_layernorm"), ("post_attn_norm", "post_attention_layernorm"),
                 ("mlp_norm", "pre_feedforward_layernorm"), ("post_mlp_norm", "post_feedforward_layernorm"))
    out: dict[Path_, Source] = {(ours, "scale"): _same(layer(f"{theirs}.weight"), (D,)) for ours, theirs in norms}
    heads = {"q": H, "k": K, "v": K}
    for proj, n in heads.items():
        out[("attn", proj, "kernel")] = _linear(layer(f"self_attn.{proj}_proj.weight"), 1, (D, n, E))
        if m.qkv_bias:
            out[("attn", proj, "bias")] = _merged(layer(f"self_attn.{proj}_proj.bias"), (n, E))
    out[("attn", "o", "kernel")] = _linear(layer("self_attn.o_proj.weight"), 2, (H, E, D))
    if m.qk_norm:
        for proj in ("q", "k"):
            out[("attn", f"{proj}_norm", "scale")] = _same(layer(f"self_attn.{proj}_norm.weight"), (E,))
    if kind == "mlp":
        for ours, theirs in (("wi_0", "gate_proj"), ("wi_1", "up_proj")):
            out[("mlp", ours, "kernel")] = _linear(layer(f"mlp.{theirs}.weight"), 1, (D, F))
        out[("mlp", "wo", "kernel")] = _linear(layer("mlp.down_proj.weight"), 1, (F, D))
        return out
    X = m.moe.num_experts
    if fused_experts:
        out[("moe", "router", "kernel")] = _linear(layer("mlp.gate.weight"), 1, (D, X))
        gate_up = layer("mlp.experts.gate_up_proj")
        # per-tensor block [X, D, F]; on disk [X, 2F, D]: dims (X), (F) from row offset 0 or F, (D)
        for ours, offset in (("wi_0", 0), ("wi_1", F)):
            out[("moe", "experts", f"{ours}_kernel")] = Source(gate_up, ((0,), (2,), (1,)), (X, 2 * F, D),
                                                               (0, offset, 0))
        out[("moe", "experts", "wo_kernel")] = Source(layer("mlp.experts.down_proj"), ((0,), (2,), (1,)), (X, D, F))
        return out
    out[("moe", "router", "kernel")] = _linear(layer("block_sparse_moe.gate.weight"), 1, (D, X))
    expert = lambda w: layer("block_sparse_moe.experts.{}." + w + ".weight", X)  # noqa: E731
    out[("moe", "experts", "wi_0_kernel")] = _linear(expert("w1"), 1, (D, F))
    out[("moe", "experts", "wi_1_kernel")] = _linear(expert("w3"), 1, (D, F))
    out[("moe", "experts", "wo_kernel")] = _linear(expert("w2"), 1, (F, D))
    return out


def sources(m: ModelConfig, fused_experts: bool = False) -> dict[Path_, Source]:
    """Every parameter of `Transformer(m)` -> its `Source` (Llama / Mistral / Mixtral / Qwen / Gemma naming).

    `fused_experts`: read Mixtral experts from the fused `mlp.experts.*` stacks."""
    V, D, N = m.vocab_size, m.d_model, m.n_layers
    out: dict[Path_, Source] = {
        ("embed", "embedding"): _same(_names("model.embed_tokens.weight"), (V, D)),
        ("final_norm", "scale"): _same(_names("model.norm.weight"), (D,)),
    }
    if not m.tie_embeddings:
        out[("lm_head", "kernel")] = _linear(_names("lm_head.weight"), 1, (D, V))
    period = layer_period(m)
    kinds = layer_kinds(m)
    for j in range(period):
        layers = list(range(j, N, period))

        def layer(suffix: str, *dims: int, layers: list[int] = layers) -> np.ndarray:
            return _layer_names("model.layers.{}." + suffix, layers, *dims)

        prefix = ("layers",) if period == 1 else ("layers", f"block_{j}")
        for path, src in _layer_sources(m, layer, kinds[j], fused_experts).items():
            out[(*prefix, *path)] = src
    return out
