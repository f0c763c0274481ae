"""The rules of a `Config`: checked when it loads, and against the devices before anything is compiled.

`validate_config(cfg)` holds every rule that depends on the config alone; `load_config` runs it,
so an invalid config fails where it is read, whichever command reads it. It first checks every
key on its own (`check_keys`: the `Literal` choices, the ranges declared in the schema, 32-bit
integers, no empty strings), then the cross-field rules: divisibility, lengths, the family's
capabilities (`config.family_spec`), μP (`config.rules.mup_rules`), MoE, data (`config.rules.data_rules`),
the logical-rule overrides and the in-loop tasks. `validate_mesh(cfg, n_devices)` resolves the
mesh against a device count and checks what depends on it (tensor, expert and batch
divisibility, pipeline stages, expert-parallel rules); `check_environment(cfg)` what depends on
this machine (an optional package a key asks for). `validate(cfg, n_devices)` runs all three,
for configs assembled in code (`dataclasses.replace`) and for tools that check a config for
another machine (the planner, sweeps). Every problem raises `ConfigError` naming the key.
Types are checked when the config is built (`config.loading`). `config_warnings` lists accepted
settings that are adjusted (a warmup longer than the run).

Jax-free, and importing nothing above the config: the tables the rules read (attention
implementations, logical axes, μP's optimizers, span-corruption lengths, mesh sizes) are declared
in `llmjax.config` and read from there by the layers above.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from llmjax.config.attention_impls import attention_names, canonical_attention
from llmjax.config.family_spec import family_spec, model_config_class
from llmjax.config.fields import allows_empty, check_range, range_of
from llmjax.config.logical_axes import LOGICAL_AXES, merge_rules
from llmjax.config.mesh_shape import mesh_shape
from llmjax.config.rules import mup_rules
from llmjax.config.rules.context_rules import check_context
from llmjax.config.rules.data_rules import validate_data
from llmjax.config.schema import Config, ModelConfig, mesh_axis_names
from llmjax.errors import ConfigError


def check_keys(node: Any, prefix: str = "") -> None:
    """Per-key rules of the dataclass tree `node`: every `Literal` field holds one of its values, every
    number is in its declared range (integers also within 32 bits), no string is empty unless its field
    allows it. Raises ConfigError naming the first offending key."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        key, value, tp = f"{prefix}{f.name}", getattr(node, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            check_keys(value, f"{key}.")
            continue
        if typing.get_origin(tp) is Literal:
            if value not in typing.get_args(tp):
                raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, typing.get_args(tp)))}")
            continue
        base = _number_type(tp)
        if base is not None and value is not None:
            problem = check_range(key, value, range_of(f, base))
            if problem:
                raise ConfigError(problem)
        if not allows_empty(f):
            strings = value if isinstance(value, list) else [value]
            for i, v in enumerate(strings):
                if isinstance(v, str) and not v.strip():
                    where = f"{key}[{i}]" if isinstance(value, list) else key
                    unset = " (null unsets it)" if _optional(tp) else ""
                    raise ConfigError(f"{where}: empty string; give a value{unset}")


def _number_type(tp: Any) -> type | None:
    """int or float for a numeric annotation (optional or not), else None; bool is not a number."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    for arg in args:
        if arg is int or arg is float:
            return int if arg is int else float
    return None


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(choices)}")


def config_warnings(cfg: Config) -> list[str]:
    """Settings that are accepted but adjusted, one message each (the trainer logs them)."""
    notes = []
    o, t = cfg.optim, cfg.train
    if o.warmup_steps > t.steps:
        notes.append(f"optim.warmup_steps={o.warmup_steps} is longer than train.steps={t.steps}: warming up over "
                     f"all {t.steps} steps (set optim.warmup_steps to choose)")
    return notes


def validate(cfg: Config, n_devices: int) -> dict[str, int]:
    """Every rule: `validate_config`, `validate_mesh` on `n_devices` devices and `check_environment`. Returns the
    resolved mesh shape. Raises ConfigError."""
    validate_config(cfg)
    shape = validate_mesh(cfg, n_devices)
    check_environment(cfg)
    return shape


def validate_config(cfg: Config) -> None:
    """The rules that depend on the config alone (`load_config` runs them). Raises ConfigError."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    check_keys(cfg)
    _choice("model.attention", m.attention, attention_names())
    if type(m) is not model_config_class(m.family):
        raise ConfigError(f"model.family={m.family}: the model section is a {type(m).__name__}")
    spec = family_spec(m.family)
    m.check(d.seq_len)
    _validate_kernels(m)
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
    _validate_attention_options(m)
    mup_rules.check_run(cfg)

    if d.packing not in spec.packings:
        raise ConfigError(f"data.packing={d.packing}: model.family={m.family} takes data.packing="
                          f"{' or '.join(spec.packings)} (its objective reads a packed row as one sequence, padding "
                          "included)")
    validate_data(cfg)
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if t.stop_after > t.steps:
        raise ConfigError(f"train.stop_after={t.stop_after} must be in [0, train.steps={t.steps}] (0: no early stop)")
    _validate_profile_steps(t.profile_steps, t.steps)
    if t.objective in ("dpo", "reward") and not spec.causal_lm:
        raise ConfigError(f"train.objective={t.objective} needs a causal language model; model.family={m.family} "
                          "is not")
    _validate_rl(cfg)
    if t.batch_size % o.grad_accum_steps:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by optim.grad_accum_steps={o.grad_accum_steps}"
        )
    _check_rules(cfg.mesh.rules)
    _validate_tasks_and_tracking(cfg)


def validate_mesh(cfg: Config, n_devices: int) -> dict[str, int]:
    """The rules that depend on the device count: the mesh resolved against `n_devices` (returned) and what
    must divide over its axes. Assumes `validate_config` passed. Raises ConfigError."""
    m, o, t = cfg.model, cfg.optim, cfg.train
    shape = mesh_shape(cfg.mesh, n_devices)
    if shape["pipeline"] > 1 and not family_spec(m.family).pipeline:
        raise ConfigError(f"mesh.pipeline={shape['pipeline']}: model.family={m.family} does not support pipeline "
                          "parallelism")
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
    micro = t.batch_size // o.grad_accum_steps
    if micro % batch_shards:
        raise ConfigError(
            f"train.batch_size={t.batch_size} (per accumulation step {micro}) is not divisible by "
            f"mesh.data x mesh.fsdp x mesh.expert = {shape['data']} x {shape['fsdp']} x {shape['expert']} = "
            f"{batch_shards}"
        )
    _validate_pipeline(cfg, shape, micro)
    check_context(cfg, shape)
    if shape["expert"] > 1:
        _check_expert_rules(cfg.mesh.rules)
    return shape


def check_environment(cfg: Config) -> None:
    """What the config asks of this machine beyond devices: the optional packages its keys need (checked where
    a run starts, not when a config loads: a workdir's config stays readable elsewhere). Raises ConfigError."""
    import importlib.util

    if cfg.log.wandb.project is not None and importlib.util.find_spec("wandb") is None:
        raise ConfigError("log.wandb.project is set but wandb is not installed: pip install 'llmjax[wandb]'")


def _validate_pipeline(cfg: Config, shape: dict[str, int], micro: int) -> None:
    """Stages x repeats must divide the scanned layer units; microbatches the per-replica batch (and,
    for a circular schedule, be at least the stages)."""
    p, m = cfg.pipeline, cfg.model
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
    if canonical_attention(m.attention) == "splash" and m.attention_block_kv % 128:
        raise ConfigError(f"model.attention_block_kv={m.attention_block_kv}: splash attention needs a multiple of "
                          "128 (the TPU lane width)")
    if canonical_attention(m.attention) == "splash" and m.attention_block_q % 128:
        raise ConfigError(f"model.attention_block_q={m.attention_block_q}: splash attention needs a multiple of "
                          "128 (its backward kernels' query tile)")
    if canonical_attention(m.attention) == "cudnn" and m.compute_dtype == "float32":
        raise ConfigError("model.attention=cudnn needs model.compute_dtype=bfloat16 or float16 (cuDNN flash "
                          "attention has no float32 kernel)")


def _validate_attention_options(m: ModelConfig) -> None:
    """RoPE scaling, local attention and soft-capping against the rest of the model."""
    r = m.rope_scaling
    if r.enabled and m.position != "rope":
        raise ConfigError(f"model.rope_scaling.type={r.type} needs model.position=rope")
    if r.type == "llama3" and r.high_freq_factor <= r.low_freq_factor:
        raise ConfigError(f"model.rope_scaling.high_freq_factor={r.high_freq_factor} must exceed "
                          f"model.rope_scaling.low_freq_factor={r.low_freq_factor}")
    if r.type == "yarn" and r.beta_fast <= r.beta_slow:
        raise ConfigError(f"model.rope_scaling.beta_fast={r.beta_fast} must exceed model.rope_scaling.beta_slow="
                          f"{r.beta_slow}")
    if m.sliding_window and not m.causal_lm:
        raise ConfigError(f"model.sliding_window: model.family={m.family} has no causal self-attention to window")
    if m.global_every and not m.sliding_window:
        raise ConfigError(f"model.global_every={m.global_every} needs model.sliding_window > 0 (the local layers' "
                          "window)")
    if m.attn_softcap > 0 and canonical_attention(m.attention) != "xla":
        raise ConfigError(f"model.attn_softcap={m.attn_softcap}: model.attention={m.attention} has no score "
                          "soft-capping (use model.attention=xla)")
    if m.logit_softcap > 0 and m.loss_chunk > 0:
        raise ConfigError(f"model.logit_softcap={m.logit_softcap}: the chunked loss (model.loss_chunk="
                          f"{m.loss_chunk}) does not soft-cap; set model.loss_chunk=0")


def _validate_profile_steps(steps: list[int], total: int) -> None:
    if not steps:
        return
    if len(steps) != 2 or not 0 <= steps[0] < steps[1] <= total:
        raise ConfigError(f"train.profile_steps={steps} must be [start, stop] with 0 <= start < stop <= "
                          f"train.steps={total} (steps start .. stop-1 are traced), or [] for no profile")


def _validate_moe(m: ModelConfig) -> None:
    e = m.moe
    if not e.enabled:
        return
    if not 1 <= e.top_k <= e.num_experts:
        raise ConfigError(f"model.moe.top_k={e.top_k} must be in [1, model.moe.num_experts={e.num_experts}]")
    if m.n_layers % e.every:
        raise ConfigError(f"model.n_layers={m.n_layers} is not divisible by model.moe.every={e.every}")


def _check_expert_rules(rules: dict[str, Any]) -> None:
    """Expert parallelism exchanges tokens over the `expert` axis: experts must stay split over it and
    the batch (act_batch) must include it."""
    merged = merge_rules(rules)
    if merged["expert"] != ("expert",):
        raise ConfigError(f"mesh.rules.expert={rules.get('expert')!r}: with mesh.expert > 1 the experts must be split "
                          "over the expert mesh axis (leave mesh.rules.expert unset)")
    if "expert" not in merged["act_batch"]:
        raise ConfigError(f"mesh.rules.act_batch={rules.get('act_batch')!r}: with mesh.expert > 1 the batch must also "
                          "be split over the expert mesh axis (add 'expert')")


def _check_rules(rules: dict[str, Any]) -> None:
    axes = set(mesh_axis_names())
    for name, target in rules.items():
        if name not in LOGICAL_AXES:
            raise ConfigError(f"mesh.rules.{name}: unknown logical axis '{name}' (known: {', '.join(LOGICAL_AXES)})")
        targets = [] if target is None else [target] if isinstance(target, str) else target
        if not isinstance(targets, list) or any(a not in axes for a in targets):
            raise ConfigError(
                f"mesh.rules.{name}: {target!r} must be null, a mesh axis or a list of mesh axes {sorted(axes)}"
            )


def _validate_tasks_and_tracking(cfg: Config) -> None:
    """eval.tasks entries and log.wandb (the task files themselves are read by `evals.tasks.load_tasks`; whether
    wandb is installed is `check_environment`'s)."""
    for i, path in enumerate(cfg.eval.tasks):
        if not path.strip():
            raise ConfigError(f"eval.tasks[{i}] is empty (give the path of a JSONL task file)")
    if cfg.eval.tasks and not cfg.model.causal_lm:
        raise ConfigError(f"eval.tasks: model.family={cfg.model.family} is not a next-token model; log-likelihood "
                          "tasks need model.family=decoder")
    if cfg.eval.tasks and cfg.eval.every_steps <= 0:
        raise ConfigError("eval.tasks are scored at every evaluation: set eval.every_steps > 0")
    if cfg.eval.tasks_limit < 0:
        raise ConfigError(f"eval.tasks_limit must be >= 0 (0: every example), got {cfg.eval.tasks_limit}")
    w = cfg.log.wandb
    for key in ("project", "entity", "name", "group"):
        value = getattr(w, key)
        if value is not None and not value.strip():
            raise ConfigError(f"log.wandb.{key} is empty (leave it unset instead)")
    if any(not t.strip() for t in w.tags):
        raise ConfigError("log.wandb.tags: tags must not be empty")


def _validate_ppo(cfg: Config) -> None:
    """PPO's epochs of minibatches: each minibatch whole rows, split evenly into optim.grad_accum_steps."""
    t, rl = cfg.train, cfg.rl
    if t.batch_size % rl.minibatches:
        raise ConfigError(f"rl.minibatches={rl.minibatches} does not divide train.batch_size={t.batch_size} (the "
                          "rollouts of a step are split into that many minibatches)")
    per = t.batch_size // rl.minibatches
    if per % cfg.optim.grad_accum_steps:
        raise ConfigError(f"optim.grad_accum_steps={cfg.optim.grad_accum_steps} does not divide a PPO minibatch of "
                          f"{per} rollouts (train.batch_size / rl.minibatches)")


def _validate_rl(cfg: Config) -> None:
    """`rl.*` of a policy-optimisation run (train.objective=grpo or ppo)."""
    t, rl = cfg.train, cfg.rl
    if t.objective not in ("grpo", "ppo"):
        return
    if not cfg.model.causal_lm:
        raise ConfigError(f"train.objective={t.objective} needs a causal language model; model.family="
                          f"{cfg.model.family} is not")
    if not rl.prompts:
        raise ConfigError(f"rl.prompts: train.objective={t.objective} needs a prompt set (JSON lines with a "
                          '"prompt" or "messages" per record)')
    if (rl.reward_fn is None) == (rl.reward_model is None):
        raise ConfigError("rl.reward_fn / rl.reward_model: set exactly one (a module:function, or a reward-model "
                          "workdir)")
    if rl.reward_fn is not None and rl.reward_fn.count(":") != 1:
        raise ConfigError(f"rl.reward_fn={rl.reward_fn!r}: expected module:function")
    if t.objective == "ppo":
        _validate_ppo(cfg)
    elif rl.samples_per_prompt < 2:
        raise ConfigError(f"rl.samples_per_prompt={rl.samples_per_prompt}: GRPO normalises each prompt's rewards "
                          "over its group of samples, which needs at least 2")
    if t.batch_size % rl.samples_per_prompt:
        raise ConfigError(f"train.batch_size={t.batch_size} is not a multiple of rl.samples_per_prompt="
                          f"{rl.samples_per_prompt} (each step samples whole groups)")
