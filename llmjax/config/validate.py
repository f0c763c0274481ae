"""Cross-field rules of a `Config`, checked before anything is compiled.

`validate(cfg, n_devices)` checks divisibility, lengths, mesh sizes against the device
count, pipeline and MoE settings, and the logical-rule overrides; every problem raises
`ConfigError` naming the key. Per-key types and `Literal` choices are checked when the
config is built (`config.loading`); `validate` checks the choices again for configs
assembled in code (`dataclasses.replace`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

from llmjax.config.families import FAMILY_CLASSES
from llmjax.config.schema import Config, ConfigError, ModelConfig, mesh_axis_names
from llmjax.kernels import attention_names, canonical_attention
from llmjax.parallel.mesh import mesh_shape


def _check_choices(node: Any, prefix: str) -> None:
    """Every `Literal` field of the dataclass tree `node` holds one of its declared values."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value, tp = getattr(node, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
            raise ConfigError(f"{prefix}{f.name}: {value!r} is not one of {', '.join(typing.get_args(tp))}")


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(choices)}")


def _positive(cfg: Any, section: str, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if v <= 0:
            raise ConfigError(f"{section}.{n} must be positive, got {v}")


def validate(cfg: Config, n_devices: int) -> dict[str, int]:
    """Check every cross-field rule; return the resolved mesh shape. Raises ConfigError."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    _check_choices(cfg, "")
    _positive(m, "model", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len")
    _choice("model.attention", m.attention, attention_names())
    _choice("model.family", m.family, tuple(FAMILY_CLASSES))
    _validate_kernels(m)
    if m.head_dim < 0:
        raise ConfigError(f"model.head_dim must be >= 0 (0 = d_model // n_heads), got {m.head_dim}")
    if m.head_dim == 0 and m.d_model % m.n_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads} (or set model.head_dim)"
        )
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}")
    if m.position == "rope" and m.resolved_head_dim % 2:
        raise ConfigError(
            f"model.position=rope needs an even head dimension (model.head_dim, or model.d_model // model.n_heads), "
            f"got {m.resolved_head_dim}"
        )

    _validate_moe(m)

    _positive(d, "data", "seq_len")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if d.path and d.tfds_name:
        raise ConfigError("set only one of data.path and data.tfds_name")
    if not 0.0 <= d.validation_fraction < 1.0:
        raise ConfigError(f"data.validation_fraction must be in [0, 1), got {d.validation_fraction}")

    _positive(o, "optim", "lr", "grad_accum_steps")
    if o.warmup_steps < 0 or o.warmup_steps > t.steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be in [0, train.steps={t.steps}]")
    if not 0.0 <= o.decay_fraction <= 1.0:
        raise ConfigError(f"optim.decay_fraction must be in [0, 1], got {o.decay_fraction}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")

    _positive(t, "train", "steps", "batch_size", "log_every")
    if not 0 <= t.stop_after <= t.steps:
        raise ConfigError(f"train.stop_after={t.stop_after} must be in [0, train.steps={t.steps}] (0: no early stop)")
    _validate_profile_steps(t.profile_steps, t.steps)
    if cfg.eval.every_steps < 0 or cfg.eval.batches < 0:
        raise ConfigError("eval.every_steps and eval.batches must be >= 0")
    if cfg.checkpoint.every_steps < 0:
        raise ConfigError(f"checkpoint.every_steps must be >= 0, got {cfg.checkpoint.every_steps}")
    if cfg.checkpoint.keep < 1:
        raise ConfigError(f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}")
    if cfg.sample.max_new_tokens < 0 or cfg.sample.temperature < 0:
        raise ConfigError("sample.max_new_tokens and sample.temperature must be >= 0")

    shape = mesh_shape(cfg.mesh, n_devices)
    tensor = shape["tensor"]
    if m.n_heads % tensor:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by mesh.tensor={tensor}")
    if m.d_ff % tensor:
        raise ConfigError(f"model.d_ff={m.d_ff} is not divisible by mesh.tensor={tensor}")
    if m.moe.enabled and m.moe.num_experts % shape["expert"]:
        raise ConfigError(
            f"model.moe.num_experts={m.moe.num_experts} is not divisible by mesh.expert={shape['expert']}")
    if not m.moe.enabled and shape["expert"] > 1:
        raise ConfigError(f"mesh.expert={shape['expert']} needs an MoE model (model.moe.num_experts > 0)")
    batch_shards = shape["data"] * shape["fsdp"] * shape["expert"]
    if t.batch_size % o.grad_accum_steps:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by optim.grad_accum_steps={o.grad_accum_steps}"
        )
    micro = t.batch_size // o.grad_accum_steps
    if micro % batch_shards:
        raise ConfigError(
            f"train.batch_size={t.batch_size} (per accumulation step {micro}) is not divisible by "
            f"mesh.data x mesh.fsdp x mesh.expert = {shape['data']} x {shape['fsdp']} x {shape['expert']} = "
            f"{batch_shards}"
        )
    _validate_pipeline(cfg, shape, micro)
    _check_rules(cfg.mesh.rules)
    if shape["expert"] > 1:
        _check_expert_rules(cfg.mesh.rules)
    dist = cfg.distributed
    if dist.num_processes < 0 or dist.process_id < -1 or dist.initialization_timeout <= 0:
        raise ConfigError("distributed.num_processes must be >= 0, distributed.process_id >= -1 and "
                          "distributed.initialization_timeout positive")
    return shape


def _validate_pipeline(cfg: Config, shape: dict[str, int], micro: int) -> None:
    """Stages x repeats must divide the scanned layer units; microbatches the per-replica batch (and,
    for a circular schedule, be at least the stages)."""
    p, m = cfg.pipeline, cfg.model
    _positive(p, "pipeline", "microbatches", "repeats")
    stages = shape["pipeline"]
    units = m.n_layers // m.moe.every if m.moe.enabled and m.moe.every > 1 else m.n_layers
    what = f"model.n_layers={m.n_layers}" + (f" / model.moe.every={m.moe.every} = {units} layer groups"
                                             if units != m.n_layers else "")
    if units % (stages * p.repeats):
        raise ConfigError(f"{what} is not divisible by mesh.pipeline x pipeline.repeats = {stages} x {p.repeats}")
    if stages == 1 and (p.microbatches > 1 or p.repeats > 1):
        raise ConfigError("pipeline.microbatches and pipeline.repeats need mesh.pipeline > 1")
    if p.repeats > 1 and p.microbatches < stages:
        raise ConfigError(f"pipeline.repeats={p.repeats} (circular schedule) needs pipeline.microbatches >= "
                          f"mesh.pipeline, got {p.microbatches} < {stages}")
    per_replica = micro // (shape["data"] * shape["fsdp"] * shape["expert"])
    if per_replica % p.microbatches:
        raise ConfigError(f"pipeline.microbatches={p.microbatches} does not divide the per-replica batch "
                          f"{per_replica} (train.batch_size / optim.grad_accum_steps / (data x fsdp x expert))")


def _validate_kernels(m: ModelConfig) -> None:
    """Tile sizes of the blockwise attention kernels and the cross-entropy chunk."""
    _positive(m, "model", "attention_block_q", "attention_block_kv")
    if canonical_attention(m.attention) == "splash" and m.attention_block_kv % 128:
        raise ConfigError(f"model.attention_block_kv={m.attention_block_kv}: splash attention needs a multiple of "
                          "128 (the TPU lane width)")
    if canonical_attention(m.attention) == "splash" and m.attention_block_q % 128:
        raise ConfigError(f"model.attention_block_q={m.attention_block_q}: splash attention needs a multiple of "
                          "128 (its backward kernels' query tile)")
    if canonical_attention(m.attention) == "cudnn" and m.compute_dtype == "float32":
        raise ConfigError("model.attention=cudnn needs model.compute_dtype=bfloat16 or float16 (cuDNN flash "
                          "attention has no float32 kernel)")
    if m.loss_chunk < 0:
        raise ConfigError(f"model.loss_chunk must be >= 0 (0 = off), got {m.loss_chunk}")


def _validate_profile_steps(steps: list[int], total: int) -> None:
    if not steps:
        return
    if len(steps) != 2 or not 0 <= steps[0] < steps[1] <= total:
        raise ConfigError(f"train.profile_steps={steps} must be [start, stop] with 0 <= start < stop <= "
                          f"train.steps={total} (steps start .. stop-1 are traced), or [] for no profile")


def _validate_moe(m: ModelConfig) -> None:
    e = m.moe
    if e.num_experts < 0:
        raise ConfigError(f"model.moe.num_experts must be >= 0 (0 = dense), got {e.num_experts}")
    if not e.enabled:
        return
    if not 1 <= e.top_k <= e.num_experts:
        raise ConfigError(f"model.moe.top_k={e.top_k} must be in [1, model.moe.num_experts={e.num_experts}]")
    if e.every < 1:
        raise ConfigError(f"model.moe.every must be >= 1, got {e.every}")
    if m.n_layers % e.every:
        raise ConfigError(f"model.n_layers={m.n_layers} is not divisible by model.moe.every={e.every}")
    if e.shared_experts < 0:
        raise ConfigError(f"model.moe.shared_experts must be >= 0, got {e.shared_experts}")
    if e.aux_loss_weight < 0 or e.z_loss_weight < 0:
        raise ConfigError("model.moe.aux_loss_weight and model.moe.z_loss_weight must be >= 0")
    if not 0.0 <= e.router_jitter < 1.0:
        raise ConfigError(f"model.moe.router_jitter must be in [0, 1), got {e.router_jitter}")


def _check_expert_rules(rules: dict[str, Any]) -> None:
    """Expert parallelism exchanges tokens over the `expert` axis: experts must stay split over it and
    the batch (act_batch) must include it."""
    from llmjax.parallel.rules import make_rules

    merged = make_rules(rules)
    if merged["expert"] != ("expert",):
        raise ConfigError(f"mesh.rules.expert={rules.get('expert')!r}: with mesh.expert > 1 the experts must be split "
                          "over the expert mesh axis (leave mesh.rules.expert unset)")
    if "expert" not in merged["act_batch"]:
        raise ConfigError(f"mesh.rules.act_batch={rules.get('act_batch')!r}: with mesh.expert > 1 the batch must also "
                          "be split over the expert mesh axis (add 'expert')")


def _check_rules(rules: dict[str, Any]) -> None:
    from llmjax.parallel.rules import LOGICAL_AXES  # local import: rules imports nothing heavy

    axes = set(mesh_axis_names())
    for name, target in rules.items():
        if name not in LOGICAL_AXES:
            raise ConfigError(f"mesh.rules.{name}: unknown logical axis '{name}' (known: {', '.join(LOGICAL_AXES)})")
        targets = [] if target is None else [target] if isinstance(target, str) else target
        if not isinstance(targets, list) or any(a not in axes for a in targets):
            raise ConfigError(
                f"mesh.rules.{name}: {target!r} must be null, a mesh axis or a list of mesh axes {sorted(axes)}"
            )
