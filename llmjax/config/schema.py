"""The config schema: one frozen or plain dataclass per section, `Config` at the root.

Every key's type is its annotation; a key with a fixed set of values is a `Literal`, and
that annotation is the one place the allowed values are declared (`choices` reads them
back, e.g. for a CLI's `choices=`). Loading and type checks live in `config.loading`,
cross-field rules in `config.validate`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = typing.get_args(Dtype)


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
    score: Literal["softmax", "sigmoid"] = "softmax"
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

    family: str = "decoder"  # a model family of llmjax.config.families (decoder, encoder, encoder_decoder)
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 0  # 0: d_model // n_heads
    d_ff: int = 1024
    max_seq_len: int = 1024
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    position: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10000.0
    mlp: Literal["swiglu", "geglu", "gelu", "relu"] = "swiglu"
    use_bias: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02
    compute_dtype: Dtype = "bfloat16"
    param_dtype: Dtype = "float32"
    remat: Literal["none", "full", "dots", "dots_no_batch", "minimal"] = "none"
    scan_layers: bool = True  # False: a Python loop over the same stacked params (faster small models)
    attention: str = "xla"  # an implementation of llmjax.kernels.ATTENTION_MODULES (xla = the einsum reference)
    attention_block_q: int = 512  # queries per tile of the blockwise kernels (chunked, splash)
    attention_block_kv: int = 512  # keys per tile (splash: a multiple of 128)
    loss_chunk: int = 0  # > 0: cross-entropy over chunks of this many positions, no full [B, L, V] logits
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
    tokenizer_type: Literal["bpe", "unigram"] = "bpe"
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
    name: Literal["adamw", "adafactor", "lion", "sgd"] = "adamw"
    lr: float = 3e-3
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
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
    # [start, stop): write a jax.profiler trace of steps start .. stop-1 to <workdir>/profile; []: off.
    profile_steps: list[int] = dataclasses.field(default_factory=list)


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


def choices(cls: type, name: str) -> tuple[Any, ...]:
    """The allowed values of the `Literal` field `name` of config dataclass `cls`."""
    tp = typing.get_type_hints(cls)[name]
    if typing.get_origin(tp) is not Literal:
        raise TypeError(f"{cls.__name__}.{name} is not a Literal field")
    return typing.get_args(tp)


def mesh_axis_names() -> tuple[str, ...]:
    """Mesh axes in device order (outermost first). New axes are added here and in MeshConfig."""
    return tuple(f.name for f in dataclasses.fields(MeshConfig)
                 if f.type in ("int", int) and not f.name.startswith("dcn_"))
