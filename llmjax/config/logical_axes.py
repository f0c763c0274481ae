"""Logical axis names and their default mesh axes: the rule table `mesh.rules` overrides, jax-free.

Model code names every parameter dimension and key activation dimension with a logical axis
("embed", "heads", "act_batch", ...); `llmjax.parallel.rules` turns the rules into
`PartitionSpec`s. The table is declared here so that config validation checks `mesh.rules`
(known logical names, known mesh axes, the expert-parallel rules) without importing jax.
"""

from __future__ import annotations

from typing import Any

Rules = dict[str, tuple[str, ...]]

# logical axis -> mesh axes it is split over (empty tuple: replicated).
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "layers": (),
    "stage": ("pipeline",),  # pipeline stages (the stage dimension of the pipelined layer stack)
    "norm": (),
    "position": (),  # rows of a learned position table
    "router": (),  # the MoE router's output (one score per expert)
    "expert": ("expert",),  # MoE expert dimension
    "lora_rank": (),  # the rank dimension of LoRA adapters (`llmjax.post.lora`)
    "score": (),  # the output of a scalar head (a reward model's, `llmjax.post.rl`)
    # activations
    "act_batch": ("data", "fsdp", "expert"),  # outside MoE layers the expert axis splits the batch
    "act_length": ("context",),  # the sequence dimension: context parallelism (`llmjax.parallel.context`)
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    "act_expert": ("expert",),
    "act_stage": ("pipeline",),
}
LOGICAL_AXES = tuple(DEFAULT_RULES)


def merge_rules(overrides: dict[str, Any] | None = None) -> Rules:
    """`DEFAULT_RULES` updated by `overrides` ({logical: None | axis | [axes]}; None: replicated)."""
    rules = dict(DEFAULT_RULES)
    for name, target in (overrides or {}).items():
        rules[name] = () if target is None else (target,) if isinstance(target, str) else tuple(target)
    return rules
