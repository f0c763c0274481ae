"""The config schema: one frozen or plain dataclass per section, `Config` at the root.

Every key's type is its annotation; a key with a fixed set of values is a `Literal`, and
that annotation is the one place the allowed values are declared (`choices` reads them
back, e.g. for a CLI's `choices=`). Every key is declared with `option(default, doc,
range)` (`config.fields`): its one-line description and its allowed range live next to it,
`llmjax config show` prints both and `validate` checks every range. Loading and type checks
live in `config.loading`, cross-field rules in `config.rules.validate`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import TYPE_CHECKING, Any, Literal

from llmjax.config.curation import CurateConfig
from llmjax.config.fields import INT32_MAX, option, section
from llmjax.config.post_training import DPOConfig, LoraConfig, RewardConfig, RLConfig
from llmjax.config.rope_scaling import RopeScalingConfig
from llmjax.errors import ConfigError  # noqa: F401 - re-exported (`llmjax.config.schema.ConfigError`)

if TYPE_CHECKING:
    from llmjax.config.family_spec import FamilySpec

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = typing.get_args(Dtype)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-Experts feed-forward layers (`model.moe.*`). `num_experts=0`: a dense model.

    Each MoE layer routes every token to `top_k` of `num_experts` expert MLPs (each of the
    dense MLP's kind and width `model.d_ff`) with a float32 linear router, plus
    `shared_experts` x d_ff of always-on (shared) MLP width. See `llmjax.models.moe`.
    """

    num_experts: int = option(0, "routed experts per MoE layer; 0: a dense model", ge=0)
    top_k: int = option(2, "experts each token is routed to (<= num_experts)", ge=1)
    capacity_factor: float = option(
        0.0, "<= 0: dropless (grouped matmul); > 0: slots per expert = factor x tokens x top_k / experts, "
        "overflow dropped")
    every: int = option(1, "every `every`-th layer is MoE (layers every-1, 2*every-1, ...), dense between", ge=1)
    shared_experts: int = option(0, "always-on MLP of width shared_experts x d_ff (DeepSeek style)", ge=0)
    aux_loss_weight: float = option(0.01, "weight of the Switch/GShard load-balancing loss", ge=0)
    z_loss_weight: float = option(0.001, "weight of the router z-loss", ge=0)
    score: Literal["softmax", "sigmoid"] = option("softmax", "router scores over the experts")
    renormalize: bool = option(True, "divide the top-k weights by their sum")
    router_jitter: float = option(0.0, "training only: router input scaled by U(1-j, 1+j)", ge=0, lt=1)

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Model shape and numerics, shared by every family. LLaMA-style by default; GPT-2 style via
    norm/position/mlp. `family` picks the model family (`llmjax.config.family_spec`), whose config class
    may add keys of its own (a subclass of this one).

    Frozen (hashable): the model module that holds it is a static argument under jit.
    """

    family: str = option("decoder", "model family (llmjax.config.family_spec): decoder, ...")
    vocab_size: int = option(8192, "token ids 0 .. vocab_size-1 (>= the tokenizer's pieces)", gt=0)
    d_model: int = option(256, "model width (residual stream)", gt=0)
    n_layers: int = option(4, "decoder blocks", gt=0)
    n_heads: int = option(4, "query heads", gt=0)
    n_kv_heads: int = option(4, "key/value heads (grouped-query attention; n_heads: MHA, 1: MQA)", gt=0)
    head_dim: int = option(0, "per-head width; 0: d_model // n_heads", ge=0)
    d_ff: int = option(1024, "MLP hidden width (also each MoE expert's)", gt=0)
    max_seq_len: int = option(1024, "longest context (learned position table size, KV cache limit)", gt=0)
    norm: Literal["rmsnorm", "layernorm"] = option("rmsnorm", "normalisation layer")
    norm_eps: float = option(1e-5, "epsilon of the norms", gt=0, lt=1)
    position: Literal["rope", "learned"] = option("rope", "position encoding: rotary (rotate-half) or a learned table")
    rope_theta: float = option(10000.0, "RoPE base wavelength", gt=0)
    rope_scaling: RopeScalingConfig = section(RopeScalingConfig, "RoPE frequency scaling (long contexts)")
    sliding_window: int = option(0, "local attention: each query sees the last sliding_window keys (itself "
                                    "included), in training, prefill and cached decoding; 0: full attention", ge=0)
    global_every: int = option(0, "with sliding_window: layers global_every-1, 2*global_every-1, ... attend "
                                  "globally, the others locally (Gemma 2: 2); 0: every layer local", ge=0)
    mlp: Literal["swiglu", "geglu", "gelu", "relu"] = option("swiglu", "MLP kind (gated: swiglu, geglu)")
    use_bias: bool = option(False, "biases in the dense layers")
    qkv_bias: bool = option(False, "biases on the query/key/value projections only (Qwen2); use_bias: all layers")
    qk_norm: bool = option(False, "RMSNorm over the head dimension of queries and keys before RoPE (Qwen3)")
    norm_scale_offset: float = option(0.0, "norms multiply by (norm_scale_offset + scale), scale initialised to "
                                           "1 - offset (Gemma: 1)", ge=0, le=1)
    post_norms: bool = option(False, "also normalise each sublayer's output before its residual add (Gemma 2)")
    scale_embeddings: bool = option(False, "multiply the token embeddings by sqrt(d_model) (Gemma)")
    attention_scale_dim: float = option(0.0, "attention scores are scaled by attention_scale_dim^-1/2; 0: the head "
                                             "dimension (Gemma 2: query_pre_attn_scalar)", ge=0)
    attn_softcap: float = option(0.0, "attention scores s become c tanh(s / c) before the mask (Gemma 2); 0: off",
                                 ge=0)
    logit_softcap: float = option(0.0, "output logits z become c tanh(z / c) (Gemma 2); 0: off", ge=0)
    tie_embeddings: bool = option(False, "the LM head reuses the token embedding table")
    init_std: float = option(0.02, "standard deviation of the normal weight initialisation", gt=0)
    parametrization: Literal["standard", "mup"] = option(
        "standard", "standard: init_std and optim.lr for every parameter; mup: maximal update parametrisation "
        "(llmjax.models.mup), per-role init and learning-rate multipliers of the width d_model / mup_base_width, "
        "attention logits scaled 1/head_dim")
    mup_base_width: int = option(256, "mup: the width (d_model) at which mup equals standard parametrisation, "
                                      "the one whose tuned init_std and optim.lr transfer", gt=0)
    mup_base_head_dim: int = option(0, "mup: attention scale sqrt(mup_base_head_dim) / head_dim; 0: the head dim "
                                       "at mup_base_width (head_dim if set, else mup_base_width // n_heads)", ge=0)
    compute_dtype: Dtype = option("bfloat16", "matmul input dtype (accumulation is float32)")
    param_dtype: Dtype = option("float32", "dtype the parameters are stored and updated in")
    matmul_dtype: Literal["compute", "fp8"] = option(
        "compute", "the dense and expert matmuls (attention projections, MLPs, experts): compute: inputs in "
        "compute_dtype; fp8: float8 with per-tensor current scaling, e4m3 forward, e5m2 gradients, float32 "
        "accumulation (llmjax.kernels.fp8; embeddings, LM head, norms and router stay in compute_dtype or float32)")
    remat: Literal["none", "full", "dots", "dots_no_batch", "minimal"] = option(
        "none", "activation recomputation policy per layer")
    scan_layers: bool = option(True, "nn.scan over the layers; false: a Python loop over the same stacked params "
                                     "(faster for small models)")
    attention: str = option("xla", "attention implementation (llmjax.kernels): xla (the einsum reference; "
                                   "alias einsum) | chunked | splash (TPU) | cudnn (GPU) | dot_product_attention")
    attention_block_q: int = option(512, "queries per tile of the blockwise kernels (chunked, splash)", gt=0)
    attention_block_kv: int = option(512, "keys per tile (splash: a multiple of 128)", gt=0)
    context_parallel: Literal["all_gather", "ring"] = option(
        "all_gather", "attention with mesh.context > 1 (the sequence split over devices, load-balanced for causal "
        "masks): all_gather (each device's queries against all gathered keys/values, by model.attention) | ring "
        "(key/value blocks passed around the context axis, online softmax)")
    loss_chunk: int = option(0, "> 0: cross-entropy over chunks of this many positions, no full [B, L, V] logits; "
                                "0: off", ge=0)
    moe: MoEConfig = section(MoEConfig, "Mixture-of-Experts layers (num_experts > 0)")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def spec(self) -> FamilySpec:
        """The capabilities of `family` (`llmjax.config.family_spec.FamilySpec`)."""
        from llmjax.config.family_spec import family_spec  # that module defines the family subclasses of this one

        return family_spec(self.family)

    @property
    def causal_lm(self) -> bool:
        """A next-token model (log-likelihood tasks, `llmjax harness`, DPO): `FamilySpec.causal_lm`."""
        return self.spec.causal_lm

    # Family hooks (`llmjax.config.family_spec` subclasses override them).
    @property
    def reserved_ids(self) -> int:
        """Ids at the top of the vocabulary the family reserves (mask, sentinels): a trained tokenizer gets
        vocab_size minus these."""
        return 0

    def check(self, seq_len: int) -> None:
        """Family-specific rules (ConfigError naming the key); `seq_len` is data.seq_len."""


@dataclasses.dataclass
class SourceConfig:
    """One source of a mixture (`data.sources[i]`): local text, a prepared directory, or a TFDS dataset.

    `weight` is the source's share of the packed rows (so of the tokens, with `data.packing=concat`);
    weights are normalised by their sum.
    """

    name: str = option("", "label in logs and metrics; empty: derived from path / tfds_name", allow_empty=True)
    weight: float = option(1.0, "the source's share of the packed rows (normalised by the sum of the weights)")
    path: str | None = option(None, "text files (file, directory, glob) or a directory from `llmjax data prepare`")
    tfds_name: str | None = option(None, "a TFDS dataset prepared (array_record) under tfds_data_dir")
    tfds_data_dir: str | None = option(None, "directory the TFDS dataset was prepared in")
    tfds_train_split: str = option("train", "TFDS split to train on")
    tfds_eval_split: str = option("validation", "TFDS split to evaluate on (absent: validation_fraction of train)")
    text_key: str = option("text", "the text field of TFDS examples and of JSON-lines records")


@dataclasses.dataclass
class DataConfig:
    """Where tokens come from, how documents are packed into rows, and how they are read.

    One source is given by `path` or `tfds_name` (and the keys next to them); a mixture by
    `sources`, a list of `SourceConfig`. See llmjax/data/__init__.py for the pipeline.
    """

    path: str | None = option(None, "text files (file, directory or glob) or a prepared directory; null: the "
                                    "embedded default corpus")
    tfds_name: str | None = option(None, "a TFDS dataset the user prepared under data.tfds_data_dir")
    tfds_data_dir: str | None = option(None, "directory the TFDS dataset was prepared in")
    tfds_train_split: str = option("train", "TFDS split to train on")
    tfds_eval_split: str = option("validation", "TFDS split to evaluate on (absent: validation_fraction of train)")
    text_key: str = option("text", "the text field of TFDS examples and of JSON-lines records")
    sources: list[SourceConfig] = option(factory=list, doc="a weighted mixture of sources (instead of path / "
                                         "tfds_name): [{name, weight, path | tfds_name, ...}, ...]")
    extensions: list[str] = option(factory=lambda: [".py", ".txt", ".md", ".rst", ".jsonl"],
                                   doc="file endings read when data.path is a directory")
    seq_len: int = option(256, "tokens per training row", gt=0)
    validation_fraction: float = option(0.01, "share of the documents held out for validation", ge=0, lt=1)
    tokenizer: str | None = option(None, "a SentencePiece .model, a Hugging Face tokenizer.json or a directory "
                                         "holding either; null: train one on the corpus (cached)")
    tokenizer_type: Literal["bpe", "unigram"] = option("bpe", "sentencepiece model type when training one")
    tokenizer_train_bytes: int = option(20_000_000, "bytes of the corpus the tokenizer is trained on", gt=0,
                                        le=2**62)
    add_bos: bool | None = option(None, "start every document with BOS; null: the tokenizer's own convention")
    chat_template: str | None = option(None, "train.objective=sft/dpo: a Jinja chat template file; null: the "
                                             "tokenizer's own (tokenizer_config.json / chat_template.jinja)")
    packing: Literal["concat", "best_fit"] = option("concat", "concatenate-and-split, or best-fit bins (padding); "
                                                    "sft: always best-fit (conversations are never split)")
    packing_bins: int = option(16, "best_fit: rows open at once", ge=1)
    shuffle: bool = option(True, "documents in one random order over the whole corpus each epoch, and rows within "
                                 "shuffle_window")
    shuffle_window: int = option(256, "packed rows shuffled together, per data share, so the rows of one document "
                                      "land in different batches (0 or 1: no row shuffle)", ge=0)
    workers: int = option(0, "tokenizer processes per source and data share; 0: in the training process", ge=0)
    shares: int = option(0, "disjoint shares of the data, each filling batch_size/shares rows; 0: gcd(batch_size, "
                            "8), the same batches on 1, 2, 4 or 8 processes", ge=0)
    prefetch: int = option(2, "batches prepared ahead in a background thread (per share)", ge=0)
    document_bytes: int = option(4096, "files larger than this are cut into documents of about this size at "
                                       "blank lines / top-level definitions (at most twice it)", ge=64, le=2**40)
    block_bytes: int = option(1 << 20, "files larger than this go to train or validation in blocks of this size "
                                       "(hash of file and block), smaller ones whole", ge=4096, le=2**62)
    cache_dir: str | None = option(None, "tokenizer and compilation caches; null: $LLMJAX_CACHE or ~/.cache/llmjax")


@dataclasses.dataclass
class MeshConfig:
    """Device mesh sizes (-1 takes the remaining devices) and logical-axis rule overrides.

    Axes, outermost first: `pipeline` (layer-stack stages, see `PipelineConfig`), `data`,
    `fsdp`, `expert` (MoE experts split over it; outside MoE layers it splits the batch like
    `data`), `context` (the sequence split, `ModelConfig.context_parallel`) and `tensor`. These are
    the sizes within one slice (ICI). The `dcn_*` sizes split
    the same axes across slices (multi-slice TPU, over the data-centre network): the axis
    `data` then has `dcn_data * data` devices. They are not mesh axes of their own.
    """

    pipeline: int = option(1, "pipeline stages (-1: the remaining devices)", ge=-1)
    data: int = option(-1, "data-parallel replicas (-1: the remaining devices)", ge=-1)
    fsdp: int = option(1, "fully-sharded data parallelism: parameters split, batch split", ge=-1)
    expert: int = option(1, "expert parallelism (MoE experts split over it)", ge=-1)
    context: int = option(1, "context parallelism: the sequence split (activations and attention, "
                             "model.context_parallel)", ge=-1)
    tensor: int = option(1, "tensor parallelism: heads, MLP width and vocabulary split", ge=-1)
    dcn_pipeline: int = option(1, "slices the pipeline axis spans (multi-slice)", ge=1)
    dcn_data: int = option(1, "slices the data axis spans (multi-slice)", ge=1)
    dcn_fsdp: int = option(1, "slices the fsdp axis spans (multi-slice)", ge=1)
    dcn_expert: int = option(1, "slices the expert axis spans (multi-slice)", ge=1)
    dcn_context: int = option(1, "slices the context axis spans (multi-slice)", ge=1)
    dcn_tensor: int = option(1, "slices the tensor axis spans (multi-slice)", ge=1)
    rules: dict[str, Any] = option(factory=dict, doc="logical->mesh rule overrides, e.g. {embed: null, vocab: "
                                                     "[tensor]}")


@dataclasses.dataclass
class PipelineConfig:
    """Pipeline parallelism over the `pipeline` mesh axis (`mesh.pipeline` stages).

    Each global batch (per gradient-accumulation step) is cut into `microbatches` that
    flow through the stages in GPipe order; with `repeats` > 1 each stage holds that many
    non-adjacent layer groups (circular schedule), which shrinks the bubble
    (S-1)/(R*M+S-1) for S stages, R repeats, M microbatches.
    """

    microbatches: int = option(1, "microbatches per (accumulation) batch", ge=1)
    repeats: int = option(1, "layer groups per stage (circular schedule when > 1)", ge=1)


@dataclasses.dataclass
class OptimConfig:
    name: Literal["adamw", "adafactor", "lion", "sgd"] = option("adamw", "optimizer")
    lr: float = option(3e-3, "peak learning rate", gt=0)
    schedule: Literal["cosine", "linear", "constant", "wsd"] = option("cosine", "decay after the linear warmup")
    warmup_steps: int = option(100, "linear warmup steps from 0 (longer than train.steps: clamped, with a warning)",
                               ge=0)
    decay_fraction: float = option(0.2, "wsd: share of the steps spent decaying", ge=0, le=1)
    min_lr_ratio: float = option(0.1, "final learning rate / peak", ge=0, le=1)
    b1: float = option(0.9, "first-moment decay (adamw, lion; sgd: momentum, 0 = none)", ge=0, lt=1)
    b2: float = option(0.95, "second-moment decay (adamw, lion)", ge=0, lt=1)
    eps: float = option(1e-8, "adamw/adafactor denominator epsilon", gt=0)
    weight_decay: float = option(0.1, "decoupled weight decay (norms, biases and embeddings excluded)", ge=0)
    decay_embeddings: bool = option(False, "also decay the embedding tables")
    clip_norm: float = option(1.0, "global gradient-norm clip; <= 0 disables clipping")
    grad_accum_steps: int = option(1, "microbatches accumulated per update (divides train.batch_size)", ge=1)


@dataclasses.dataclass
class TrainConfig:
    steps: int = option(1000, "optimizer updates of the run (the schedule's length)", gt=0)
    batch_size: int = option(8, "global batch, in sequences", gt=0)
    z_loss: float = option(0.0, "weight of the z-loss on the logits' log-partition", ge=0)
    log_every: int = option(10, "steps between log lines when stderr is not a terminal", ge=1)
    progress: bool = option(True, "progress bar (loss, smoothed loss, tokens/s, MFU, ETA)")
    tensorboard: bool = option(True, "write TensorBoard events to WORKDIR/tensorboard")
    stop_on_nonfinite: bool = option(True, "stop the run on a non-finite loss")
    stop_after: int = option(0, "stop with a checkpoint (exit 0) after this many steps while the schedule "
                                "follows train.steps; 0: run to train.steps", ge=0)
    cpu_xla_flags: bool = option(False, "opt-in XLA:CPU flags (oneDNN matmul calls, no YNN fusions; "
                                        "llmjax.runtime.CPU_XLA_FLAGS): a few % shorter CPU steps, but other matmul "
                                        "rounding (losses drift ~5e-4 relative over 100 steps); added to XLA_FLAGS "
                                        "only for a jaxlib known to accept them (a warning line otherwise), before "
                                        "the first device use")
    profile_steps: list[int] = option(factory=list, doc="[start, stop): a jax.profiler trace of steps start .. "
                                      "stop-1 in WORKDIR/profile; []: off")
    objective: Literal["lm", "sft", "dpo", "reward", "grpo", "ppo"] = option(
        "lm", "lm: the family's pre-training objective on text; sft: chat/prompt-completion JSONL through the "
        "chat template, loss on assistant tokens; dpo: preference pairs (dpo.*); reward: a reward model on "
        "preference pairs (reward.*); grpo: policy optimisation with sampled rollouts and group-normalised "
        "advantages (rl.*); ppo: the same rollouts with a value head, GAE and epochs of minibatches (rl.*)")
    init_from: str | None = option(None, "start from the newest checkpoint's parameters of this workdir (a run or "
                                         "`convert from-hf`); with lora.rank > 0 it is the frozen base")


@dataclasses.dataclass
class EvalConfig:
    every_steps: int = option(200, "steps between validation evaluations; 0: none", ge=0)
    batches: int = option(8, "validation batches per evaluation; 0: the whole split", ge=0)
    tasks: list[str] = option(factory=list, doc="multiple-choice JSONL tasks scored by log-likelihood at every "
                              "evaluation (llmjax.evals.tasks), e.g. [experiments/data/python_mc.jsonl]")
    tasks_limit: int = option(0, "examples scored per task; 0: all", ge=0)


@dataclasses.dataclass
class CheckpointConfig:
    every_steps: int = option(250, "steps between checkpoints (and one at the end); 0: only at the end", ge=0)
    keep: int = option(3, "newest checkpoints kept", ge=1)
    async_save: bool = option(True, "write checkpoints in the background while training goes on")
    checksums: bool = option(True, "SHA-256 of every checkpoint file, written at save and verified at restore")


@dataclasses.dataclass
class SampleConfig:
    prompt: str = option("def fibonacci(n):\n", "prompt of the end-of-run samples")
    max_new_tokens: int = option(64, "tokens sampled at the end of the run; 0: no samples", ge=0)
    temperature: float = option(0.8, "temperature of the second end-of-run sample", ge=0)


@dataclasses.dataclass
class WandbConfig:
    """Weights & Biases logging from process 0 (`llmjax.train.telemetry.tracking`); off unless `project` is set.

    The run records the resolved config and the hardware, and every metrics.jsonl record
    (`train/*`, `eval/*`, `tasks/*` against `step`). Its files go to WORKDIR/wandb; a resumed
    run continues the same W&B run (its id is kept in WORKDIR/wandb_run_id).
    """

    project: str | None = option(None, "W&B project; null: no W&B logging")
    entity: str | None = option(None, "W&B entity (user or team); null: the account's default")
    name: str | None = option(None, "run name; null: the workdir's name")
    group: str | None = option(None, "W&B group of the run")
    tags: list[str] = option(factory=list, doc="W&B tags of the run")
    mode: Literal["online", "offline", "disabled"] | None = option(
        None, "null: wandb decides (WANDB_MODE, else online); offline: to disk only (`wandb sync` later)")


@dataclasses.dataclass
class LogConfig:
    """Experiment tracking beyond metrics.jsonl and TensorBoard (`train.tensorboard`)."""

    wandb: WandbConfig = section(WandbConfig, "Weights & Biases logging from process 0")


@dataclasses.dataclass
class DistributedConfig:
    """Multi-process runtime (`jax.distributed`). Unset: auto-detect (TPU pod, Slurm), else one process.

    The CLI flags `--coordinator/--num-processes/--process-id` and the environment variables
    `LLMJAX_COORDINATOR/LLMJAX_NUM_PROCESSES/LLMJAX_PROCESS_ID` (set by launch/local.sh)
    take precedence over these keys.
    """

    coordinator: str | None = option(None, "host:port of process 0's coordinator")
    num_processes: int = option(0, "processes in the run; 0: unset", ge=0)
    process_id: int = option(-1, "this process's index; -1: unset", ge=-1)
    auto_detect: bool = option(True, "call jax.distributed.initialize() on a detected TPU pod / Slurm job")
    initialization_timeout: int = option(300, "seconds to wait for every process to join", gt=0)


@dataclasses.dataclass
class Config:
    seed: int = option(0, "seed of the initialisation, the data order and the samples", ge=0, le=INT32_MAX)
    model: ModelConfig = section(ModelConfig, "the network")
    data: DataConfig = section(DataConfig, "corpus, tokenizer, rows")
    mesh: MeshConfig = section(MeshConfig, "device mesh and sharding rules")
    pipeline: PipelineConfig = section(PipelineConfig, "pipeline schedule")
    optim: OptimConfig = section(OptimConfig, "optimizer and learning-rate schedule")
    train: TrainConfig = section(TrainConfig, "the training loop")
    eval: EvalConfig = section(EvalConfig, "in-loop validation and downstream tasks")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "orbax checkpoints in WORKDIR/checkpoints")
    sample: SampleConfig = section(SampleConfig, "end-of-run samples")
    log: LogConfig = section(LogConfig, "experiment tracking (Weights & Biases)")
    distributed: DistributedConfig = section(DistributedConfig, "multi-process runtime")
    lora: LoraConfig = section(LoraConfig, "low-rank adapters (lora.rank > 0)")
    dpo: DPOConfig = section(DPOConfig, "direct preference optimisation (train.objective=dpo)")
    curate: CurateConfig = section(CurateConfig, "corpus curation in `llmjax data prepare` (dedup, quality, PII)")
    reward: RewardConfig = section(RewardConfig, "reward models (train.objective=reward)")
    rl: RLConfig = section(RLConfig, "rollouts, rewards and the policy loss (train.objective=grpo, ppo)")


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
