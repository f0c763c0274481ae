"""Model size and cost: parameter counts, matmul parameters, training FLOPs per token.

`flops_per_token` is the one documented formula every figure (MFU, sweeps) uses; the model's
family computes it.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from llmjax.config import ModelConfig
from llmjax.models.layers import mlp_matrices  # noqa: F401  (re-exported)


def param_counts(params: Any, logical: Any, model: ModelConfig | None = None) -> dict[str, int]:
    """`total` parameters, `non_embedding` (total minus the `embedding` role) and `active`.

    `logical`: the params' logical PartitionSpecs (same tree); roles come from them
    (`llmjax.models.roles`). Embeddings are the token table and, with learned positions, the
    position table; an untied output head counts as non-embedding. `active` is what one token uses:
    the total for a dense model; for a Mixture-of-Experts `model` every leaf with an `expert`
    dimension (routed expert matrices and their biases) counts top_k / num_experts of its size,
    while routers and shared experts count whole. Works on arrays and on abstract shapes
    (`jax.ShapeDtypeStruct`, e.g. from `jax.eval_shape`).
    """
    from jax.sharding import PartitionSpec

    from llmjax.models.roles import role_of

    specs = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
    total = embedding = experts = 0
    for leaf, spec in zip(jax.tree.leaves(params), specs, strict=True):
        n = math.prod(getattr(leaf, "shape", np.shape(leaf)))
        total += n
        axes = tuple(spec)
        if role_of(axes) == "embedding":
            embedding += n
        if "expert" in axes:
            experts += n
    active = total
    if model is not None and model.moe.enabled:
        active = total - experts + experts * model.moe.top_k // model.moe.num_experts
    return {"total": int(total), "non_embedding": int(total - embedding), "active": int(active)}


def matmul_params(model: ModelConfig) -> int:
    """Parameters that take part in a matmul for every token (biases excluded), from the model's family
    (`ModelFamily.matmul_params`): per layer q (d·H·h) + k, v (2·d·K·h) + o (H·h·d) + its feed-forward
    kind (m·d·F for a dense MLP with m = `mlp_matrices`; for MoE the top_k and shared experts plus the
    router d·X), plus the LM head V·d (the embedding table when tied)."""
    from llmjax.models.families import build_family

    return build_family(model).matmul_params()


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 12·L·H·h·T (the PaLM formula, Chowdhery et al. 2022, app. B).

    Derivation. A matmul with a [d_in, d_out] weight costs 2·d_in·d_out FLOPs per token forward
    (one multiply and one add per MAC) and twice that backward (gradients w.r.t. the input and
    the weight): 6 FLOPs per matmul parameter per token, hence 6·N with N = `matmul_params(model)`
    (all dense kernels of the layers + the LM head V·d, tied or not; the embedding lookup is
    not a matmul; biases, norms, softmax and RoPE are ignored).

    For Mixture-of-Experts models N counts only the active experts and the router (see
    `matmul_params`), so MFU is measured against the active FLOPs.

    Attention adds two activation-activation matmuls per layer and head: Q·K^T and A·V, each
    T·h MACs per query token, so 2·2·T·h FLOPs forward and ×3 for forward+backward:
    12·h·T per head, i.e. 12·L·H·h·T per token with L = n_layers, H = n_heads (query heads;
    grouped KV heads do not reduce this), h = head_dim, T = seq_len.

    The causal mask is NOT taken into account: the full T keys are counted for every query,
    as in PaLM's 6N + 12·L·H·Q·T, so this is the FLOPs a dense (non-skipping) implementation
    performs, not the minimum needed (which would halve the attention term).
    Remat (recomputation) is not counted either, as usual for MFU.
    """
    from llmjax.models.families import build_family

    return build_family(model).flops_per_token(seq_len)


def estimate_params(model: ModelConfig) -> dict[str, int]:
    """Parameters by part, from the config alone (no model is built): `embedding` (V·d), `lm_head` (V·d,
    0 when tied), `positions` (learned table), `layers` (every layer's attention, MLP or all experts and
    router, and norms). Biases are left out, so this is an estimate (within a fraction of a percent for
    the presets); it is exact arithmetic on Python ints, so absurd sizes do not overflow."""
    d, h, V = model.d_model, model.resolved_head_dim, model.vocab_size
    attention = d * model.n_heads * h * 2 + d * model.n_kv_heads * h * 2
    mlp = mlp_matrices(model.mlp) * d * model.d_ff
    n_moe = model.n_layers // model.moe.every if model.moe.enabled else 0
    moe = mlp * (model.moe.num_experts + model.moe.shared_experts) + d * model.moe.num_experts
    layers = model.n_layers * (attention + 2 * d) + n_moe * moe + (model.n_layers - n_moe) * mlp
    return {
        "embedding": V * d,
        "lm_head": 0 if model.tie_embeddings else V * d,
        "positions": model.max_seq_len * d if model.position == "learned" else 0,
        "layers": layers,
    }
