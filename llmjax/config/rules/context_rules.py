"""Context parallelism's rules (`mesh.context` > 1, `model.context_parallel`), checked against the resolved mesh.

The sequence of every row is cut into 2 x context chunks (causal load balancing: device i holds chunks i
and 2C-1-i), so `data.seq_len` must divide into them; the family must be able to split its sequence
(`FamilySpec.context_parallel`); the pipeline schedule and expert parallelism, which run their own
`shard_map`s over the whole mesh, are not combined with it; the ring merges its key/value blocks by their
log-sum-exp, so it takes the implementations that return one (`xla`, `chunked`, `splash`; `dot_product_attention`
runs as `xla` there), not the fused cudnn kernel (jax.nn.dot_product_attention returns no log-sum-exp). Splash's
block form needs private backward kernels of jax's splash module; on a jax without them it is refused where the
ring is traced (`llmjax.kernels.splash_ring.check_ring`, the same ConfigError). Jax-free.
"""

from __future__ import annotations

from llmjax.config.attention_impls import canonical_attention
from llmjax.config.family_spec import family_spec
from llmjax.config.logical_axes import merge_rules
from llmjax.config.schema import Config
from llmjax.errors import ConfigError

RING_IMPLS = ("xla", "chunked", "splash", "dot_product_attention")  # registered with a BlockImpl (block=)


def context_size(cfg: Config, shape: dict[str, int]) -> int:
    """Devices the sequence is split over: the product of the mesh axes `act_length` maps to."""
    size = 1
    for axis in merge_rules(cfg.mesh.rules)["act_length"]:
        size *= shape.get(axis, 1)
    return size


def check_context(cfg: Config, shape: dict[str, int]) -> None:
    """ConfigError (naming the key) where context parallelism over `shape` cannot run this config."""
    m = cfg.model
    if shape.get("context", 1) > 1 and "context" not in merge_rules(cfg.mesh.rules)["act_length"]:
        raise ConfigError(f"mesh.context={shape['context']}: mesh.rules.act_length must include the context axis "
                          "(the sequence is what it splits)")
    size = context_size(cfg, shape)
    if size == 1:
        return
    what = f"mesh.context={shape.get('context', 1)}" + (
        f" (x {size // shape.get('context', 1)} from mesh.rules.act_length)" if size != shape.get("context", 1) else "")
    if not family_spec(m.family).context_parallel:
        raise ConfigError(f"{what}: model.family={m.family} does not support context parallelism")
    seq = cfg.data.seq_len
    if seq % (2 * size):
        raise ConfigError(f"{what}: data.seq_len={seq} is not divisible by 2 x {size} = {2 * size} (each device "
                          "holds a front and a back chunk of every row, for causal load balancing)")
    if shape.get("pipeline", 1) > 1:
        raise ConfigError(f"{what}: mesh.pipeline={shape['pipeline']} with context parallelism is not supported")
    if shape.get("expert", 1) > 1:
        raise ConfigError(f"{what}: mesh.expert={shape['expert']} with context parallelism is not supported")
    if m.attn_softcap > 0:
        raise ConfigError(f"{what}: model.attn_softcap={m.attn_softcap} with context parallelism is not supported")
    impl = canonical_attention(m.attention)
    if m.context_parallel == "ring" and impl not in RING_IMPLS:
        raise ConfigError(f"model.context_parallel=ring merges key/value blocks by their log-sum-exp, which "
                          f"model.attention={m.attention} does not return (use all_gather, or attention "
                          f"{' | '.join(RING_IMPLS)})")
