"""Typed experiment configuration: dataclasses, YAML loading, dotted overrides, validation.

A config is a tree of dataclasses (`Config` at the root). It is built from a YAML file
plus `section.key=value` overrides, every key and type is checked, and `validate`
checks the cross-field rules (divisibility, mesh size, lengths) before anything is
compiled. Every problem raises `ConfigError`, which names the offending key; the CLI
turns it into exit status 2.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "experiments" / "configs" / "default.yaml"

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A usage error in the configuration; the message names the key."""


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-Experts feed-forward layers (`model.moe.*`). `num_experts=0`: a dense model.

    Each MoE layer routes every token to `top_k` of `num_experts` expert MLPs (each of the
    dense MLP's kind and width `model.d_ff`) with a float32 linear router, plus
    `shared_experts` x d_ff of always-on (shared) MLP width. See `llmjax.models.moe`.
    """

    num_experts: int = 0  # 0: dense
    top_k: int = 2
    capacity_factor: float = 0.0  # <= 0: dropless (grouped matmul); > 0: fixed capacity, overflow dropped
    every: int = 1  # every `every`-th layer is MoE (layers every-1, 2*every-1, ...), dense layers between
    shared_experts: int = 0  # always-on MLP of width shared_experts * d_ff (DeepSeek style)
    aux_loss_weight: float = 0.01  # Switch/GShard load-balancing loss
    z_loss_weight: float = 0.001  # router z-loss
    score: str = "softmax"  # softmax | sigmoid
    renormalize: bool = True  # top-k weights divided by their sum
    router_jitter: float = 0.0  # training only: router input scaled by U(1-j, 1+j) (needs a "router" rng)

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder shape and numerics. LLaMA-style by default; GPT-2 style via norm/position/mlp.

    Frozen (hashable): the model module that holds it is a static argument under jit.
    """

    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 0  # 0: d_model // n_heads
    d_ff: int = 1024
    max_seq_len: int = 1024
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    position: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    mlp: str = "swiglu"  # swiglu | geglu | gelu | relu
    use_bias: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02
    compute_dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | dots | dots_no_batch | minimal
    scan_layers: bool = True  # False: a Python loop over the same stacked params (faster small models)
    attention: str = "einsum"  # einsum | dot_product_attention (jax.nn: cuDNN on GPU)
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


@dataclasses.dataclass
class DataConfig:
    """Where tokens come from and how they are cut into rows."""

    path: str | None = None  # local text file, directory or glob; unset = embedded default corpus
    tfds_name: str | None = None  # a TFDS dataset the user prepared under tfds_data_dir
    tfds_data_dir: str | None = None
    tfds_train_split: str = "train"
    tfds_eval_split: str = "validation"  # falls back to carving validation_fraction off train
    text_key: str = "text"
    extensions: list[str] = dataclasses.field(default_factory=lambda: [".py", ".txt", ".md", ".rst"])
    seq_len: int = 256
    validation_fraction: float = 0.01
    tokenizer: str | None = None  # path to a sentencepiece .model; unset = train one (cached)
    tokenizer_type: str = "bpe"  # bpe | unigram
    tokenizer_train_bytes: int = 20_000_000
    cache_dir: str | None = None  # unset: $LLMJAX_CACHE or ~/.cache/llmjax
    shuffle: bool = True


@dataclasses.dataclass
class MeshConfig:
    """Device mesh sizes (-1 takes the remaining devices) and logical-axis rule overrides.

    Axes, outermost first: `pipeline` (layer-stack stages, see `PipelineConfig`), `data`,
    `fsdp`, `expert` (MoE experts split over it; outside MoE layers it splits the batch like
    `data`) and `tensor`. These are the sizes within one slice (ICI). The `dcn_*` sizes split
    the same axes across slices (multi-slice TPU, over the data-centre network): the axis
    `data` then has `dcn_data * data` devices. They are not mesh axes of their own.
    """

    pipeline: int = 1
    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    dcn_pipeline: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_expert: int = 1
    dcn_tensor: int = 1
    # Overrides of the logical->mesh rules, e.g. {"embed": null, "vocab": ["tensor"]}.
    rules: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PipelineConfig:
    """Pipeline parallelism over the `pipeline` mesh axis (`mesh.pipeline` stages).

    Each global batch (per gradient-accumulation step) is cut into `microbatches` that
    flow through the stages in GPipe order; with `repeats` > 1 each stage holds that many
    non-adjacent layer groups (circular schedule), which shrinks the bubble
    (S-1)/(R*M+S-1) for S stages, R repeats, M microbatches.
    """

    microbatches: int = 1
    repeats: int = 1


@dataclasses.dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adafactor | lion | sgd
    lr: float = 3e-3
    schedule: str = "cosine"  # cosine | linear | constant | wsd
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    clip_norm: float = 1.0  # <= 0 disables clipping
    grad_accum_steps: int = 1


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # global, in sequences
    z_loss: float = 0.0
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = True
    stop_on_nonfinite: bool = True
    # Stop (with a checkpoint, exit 0) once this many steps are done, as if preempted, while the
    # schedule still follows train.steps; 0: run to train.steps. Used for WSD cooldown branches.
    stop_after: int = 0


@dataclasses.dataclass
class EvalConfig:
    every_steps: int = 200
    batches: int = 8  # validation batches per evaluation (0: whole split)


@dataclasses.dataclass
class CheckpointConfig:
    every_steps: int = 250
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass
class SampleConfig:
    prompt: str = "def fibonacci(n):\n"
    max_new_tokens: int = 64
    temperature: float = 0.8


@dataclasses.dataclass
class DistributedConfig:
    """Multi-process runtime (`jax.distributed`). Unset: auto-detect (TPU pod, Slurm), else one process.

    The CLI flags `--coordinator/--num-processes/--process-id` and the environment variables
    `LLMJAX_COORDINATOR/LLMJAX_NUM_PROCESSES/LLMJAX_PROCESS_ID` (set by launch/local.sh)
    take precedence over these keys.
    """

    coordinator: str | None = None  # host:port of process 0
    num_processes: int = 0  # 0: unset
    process_id: int = -1  # -1: unset
    auto_detect: bool = True  # call jax.distributed.initialize() on a detected TPU pod / Slurm job
    initialization_timeout: int = 300  # seconds to wait for every process to join


@dataclasses.dataclass
class Config:
    seed: int = 0
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)


# ----------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; allow int->float. Raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float) and isinstance(value, str):
        value = _parse_number(value, key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):  # nan/inf would pass every range check below
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return number
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _parse_number(text: str, key: str) -> float | int:
    """YAML 1.1 reads `3e-4` (no dot) as a string; accept any numeric spelling."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got {text!r}") from None


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = [n for n in fields if n.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "rules":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': cannot parse value: {e}") from None
    return key.split("."), value


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: invalid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: cannot read: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load `path` (default: experiments/configs/default.yaml), apply overrides, check types.

    Cross-field rules that need the device count are checked by `validate`.
    """
    data = load_yaml(path if path is not None else DEFAULT_CONFIG)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return _build(Config, data, "")


def from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- validation


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(choices)}")


def _positive(cfg: Any, section: str, *names: str) -> None:
    for n in names:
        v = getattr(cfg, n)
        if v <= 0:
            raise ConfigError(f"{section}.{n} must be positive, got {v}")


def mesh_shape(mesh: MeshConfig, n_devices: int) -> dict[str, int]:
    """Resolve -1 entries of the mesh against `n_devices`; raise ConfigError if impossible.

    Returns the total size of every axis (ICI size x DCN size).
    """
    ici, dcn = hybrid_mesh_shape(mesh, n_devices)
    return {name: ici[name] * dcn[name] for name in ici}


def hybrid_mesh_shape(mesh: MeshConfig, n_devices: int) -> tuple[dict[str, int], dict[str, int]]:
    """(per-slice ICI sizes, across-slice DCN sizes) of every mesh axis, -1 resolved.

    The product of all ICI and DCN sizes must equal `n_devices`; raise ConfigError otherwise.
    """
    names = mesh_axis_names()
    dcn = {name: getattr(mesh, f"dcn_{name}") for name in names}
    for name, size in dcn.items():
        if size < 1:
            raise ConfigError(f"mesh.dcn_{name} must be a positive size, got {size}")
    slices = math.prod(dcn.values())
    if n_devices % slices:
        shape = " x ".join(f"dcn_{n}={s}" for n, s in dcn.items())
        raise ConfigError(f"mesh: {shape} = {slices} slices do not divide the {n_devices} available devices")
    per_slice = n_devices // slices
    sizes = {name: getattr(mesh, name) for name in names}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name} must be a positive size or -1, got {size}")
    free = [n for n, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ConfigError(f"only one mesh axis may be -1, got {', '.join('mesh.' + n for n in free)}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    where = f"the {per_slice} devices of each of the {slices} slices" if slices > 1 else \
        f"the {n_devices} available devices"
    if free:
        if per_slice % fixed:
            raise ConfigError(f"mesh: the fixed axes ({fixed} devices) do not divide {where} for mesh.{free[0]}=-1")
        sizes[free[0]] = per_slice // fixed
    elif fixed != per_slice:
        shape = " x ".join(f"{n}={s}" for n, s in sizes.items())
        if slices > 1:
            dshape = " x ".join(f"dcn_{n}={s}" for n, s in dcn.items())
            raise ConfigError(f"mesh: ({shape}) x ({dshape}) = {fixed * slices} devices, but {n_devices} devices "
                              "are available")
        raise ConfigError(f"mesh: {shape} = {fixed} devices, but {n_devices} devices are available")
    return sizes, dcn


def mesh_axis_names() -> tuple[str, ...]:
    """Mesh axes in device order (outermost first). New axes are added here and in MeshConfig."""
    return tuple(f.name for f in dataclasses.fields(MeshConfig)
                 if f.type in ("int", int) and not f.name.startswith("dcn_"))


def validate(cfg: Config, n_devices: int) -> dict[str, int]:
    """Check every cross-field rule; return the resolved mesh shape. Raises ConfigError."""
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    _positive(m, "model", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len")
    _choice("model.norm", m.norm, ("rmsnorm", "layernorm"))
    _choice("model.position", m.position, ("rope", "learned"))
    _choice("model.mlp", m.mlp, ("swiglu", "geglu", "gelu", "relu"))
    _choice("model.compute_dtype", m.compute_dtype, DTYPES)
    _choice("model.param_dtype", m.param_dtype, DTYPES)
    _choice("model.remat", m.remat, ("none", "full", "dots", "dots_no_batch", "minimal"))
    _choice("model.attention", m.attention, ("einsum", "dot_product_attention"))
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
    _choice("data.tokenizer_type", d.tokenizer_type, ("bpe", "unigram"))

    _choice("optim.name", o.name, ("adamw", "adafactor", "lion", "sgd"))
    _choice("optim.schedule", o.schedule, ("cosine", "linear", "constant", "wsd"))
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
    _choice("model.moe.score", e.score, ("softmax", "sigmoid"))


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
