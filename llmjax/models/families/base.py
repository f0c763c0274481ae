"""The model-family contract: what training, evaluation, inference and the sweep runner ask of a family.

A family (`model.family`: decoder, encoder, encoder_decoder) owns its module, the batch it
consumes (a typed pytree, `batch_type`), how examples are made from packed token rows (its
host-side `objective`), its loss as sums (the differentiated total including already-weighted
auxiliary losses, and metric sums), evaluation sums, FLOPs per token and, where it has one, its
decoding (KV cache). Callers go through `llmjax.models.families.build_family` and never branch on
the family.

The contract is typed: `ModelFamily[C, B]` is generic in its config class C (`ModelConfig` or a family's
subclass of it, `llmjax.config.family_spec`) and its batch type B (a `Batch`: a struct dataclass with
`targets` and `weights`). `LMFamily` implements the forward pass for `LMBatch` (decoder, encoder);
`DecodingFamily` adds the KV-cache decoding that `llmjax.infer` asks for (decoder, encoder-decoder).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from llmjax.config import ModelConfig
from llmjax.config.family_spec import FamilySpec, family_spec
from llmjax.kernels.cross_entropy import token_losses as chunked_token_losses
from llmjax.models.feedforward import Aux, aux_loss_terms, aux_metrics, ffn_kinds, layer_kinds
from llmjax.models.losses import cross_entropy, weighted_sums
from llmjax.models.transformer import output_matrix
from llmjax.parallel.pipeline import Schedule

if TYPE_CHECKING:
    from llmjax.data.stream.row_objectives import Objective

Sums = dict[str, jax.Array]
# A model's parameters: the pytree of arrays under flax's "params" collection (its structure is the module's).
Params = Any
# What the feed-forward layers sowed in a forward pass: {kind: aux stacked over its layers} (empty when dense).
FFNAux = dict[str, Aux]
# Per-example field -> numpy scalar type of a batch (`Batch.FIELDS`).
FieldTypes = dict[str, type[np.generic]]


class Batch(Protocol):
    """What every family's batch is: a struct dataclass (a pytree) of arrays, `FIELDS` naming its fields'
    numpy types, `targets` the tokens the loss scores and `weights` the weight of each target (0: no loss)."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]
    FIELDS: ClassVar[FieldTypes]

    @property
    def targets(self) -> jax.Array: ...

    @property
    def weights(self) -> jax.Array: ...


class TokenIds(Protocol):
    """What an objective needs of the tokenizer (`llmjax.data.tokenizers.tokenizer.Tokenizer` has it): its
    vocabulary size and EOS id."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int | None: ...


CfgT = TypeVar("CfgT", bound=ModelConfig, covariant=True)
BatchT = TypeVar("BatchT", bound=Batch)


@struct.dataclass
class LMBatch:
    """A language-modelling batch: every field [B, L]; `weights` 0 where a token carries no loss.

    `inputs` feed the model, `targets` are what each position predicts (next token for a decoder,
    the original token at masked positions for a masked LM); `segment_ids` number the packed
    documents of a row (0: padding) and `positions` count from 0 in each."""

    inputs: jax.Array  # int32
    targets: jax.Array  # int32
    segment_ids: jax.Array  # int32
    positions: jax.Array  # int32
    weights: jax.Array  # float32

    FIELDS: ClassVar[FieldTypes] = {"inputs": np.int32, "targets": np.int32, "segment_ids": np.int32,
                                        "positions": np.int32, "weights": np.float32}
    # The same fields with every row in context parallelism's balanced order (`Setup.put_batch`): set below.
    BALANCED: ClassVar[type[Batch] | None] = None


@struct.dataclass
class BalancedLMBatch(LMBatch):
    """An `LMBatch` whose rows the host put in context parallelism's balanced order (`Setup.put_batch`, with
    `mesh.context` > 1): every field permuted alike along L (`llmjax.parallel.context.balance_rows`), positions
    the tokens' true ones. The model runs it without moving tokens; the loss, a sum over tokens, is unchanged."""


LMBatch.BALANCED = BalancedLMBatch


def batch_from_dict(batch_type: type[BatchT], arrays: Mapping[str, Any]) -> BatchT:
    """A typed batch from a dict of arrays with its field names (a loader's output); ValueError naming what
    is missing or extra."""
    names = {f.name for f in dataclasses.fields(batch_type)}
    if set(arrays) != names:
        raise ValueError(f"{batch_type.__name__} needs fields {sorted(names)}, got {sorted(arrays)}")
    return batch_type(**arrays)


def forward(model: nn.Module, params: Params, *args: jax.Array | None, rng: jax.Array | None = None, **kwargs: Any
            ) -> tuple[jax.Array, FFNAux]:
    """`model.apply` that also returns what the feed-forward layers sowed ({kind: aux stacked over its
    layers}, empty for a dense model). `rng` feeds MoE router jitter (training only); `kwargs` go to the
    module (e.g. `return_hidden=True`)."""
    rngs = {"router": rng} if rng is not None else None
    out, state = model.apply({"params": params}, *args, rngs=rngs, mutable=["intermediates"], **kwargs)
    aux: FFNAux = state.get("intermediates", {}).get("ffn_aux", ({},))[0]
    return out, aux


class ModelFamily(abc.ABC, Generic[CfgT, BatchT]):
    """Base class of the families; subclasses set `name`, `batch_type` (their B) and implement `module` and
    `logits` (`LMFamily` does for `LMBatch`), overriding what else differs. What a family can do (pipeline
    stages, decoding, HF export, ...) is declared in its `FamilySpec` (`spec`), not here."""

    name: ClassVar[str] = ""
    batch_type: ClassVar[type[Batch]] = LMBatch

    def __init__(self, cfg: CfgT):
        self.cfg: CfgT = cfg

    @property
    def spec(self) -> FamilySpec:
        """The family's capabilities, declared in `llmjax.config.family_spec`."""
        return family_spec(self.name)

    @property
    def uses_rng(self) -> bool:
        """Whether the training loss is random (e.g. MoE router jitter): the step then passes a fresh key."""
        kinds = ffn_kinds()
        return any(kinds[k].uses_rng(self.cfg) for k in set(layer_kinds(self.cfg)))

    # ------------------------------------------------------------------ model and data
    @abc.abstractmethod
    def module(self, pipeline: Schedule | None = None) -> nn.Module:
        """The linen module (parameters are the same with or without a pipeline schedule)."""

    def init_args(self, seq_len: int) -> tuple[jax.Array, ...]:
        """Dummy inputs for `module().init` (shapes only matter for the parameters' shapes: none)."""
        return (jnp.zeros((1, min(seq_len, self.cfg.max_seq_len)), jnp.int32),)

    def example_shapes(self, seq_len: int) -> dict[str, tuple[tuple[int, ...], type[np.generic]]]:
        """Per-example field shapes and numpy dtypes of `batch_type` at `data.seq_len`."""
        return {k: ((seq_len,), dt) for k, dt in self.batch_type.FIELDS.items()}

    def objective(self, seq_len: int, tokenizer: TokenIds) -> Objective:
        """The host-side example maker for the data pipeline (`llmjax.data.stream.row_objectives`); `tokenizer` gives
        the special ids and the ordinary vocabulary."""
        from llmjax.data.stream.row_objectives import NextToken

        return NextToken()

    def token_names(self) -> dict[int, str]:
        """Names of the ids the family reserves (rendered in decoded text, `llmjax.data.tokenizers.decode`)."""
        return {}

    def tokens_per_example(self, seq_len: int) -> int:
        """Tokens one example counts for throughput and MFU (`flops_per_token` is per such token)."""
        return seq_len

    # ------------------------------------------------------------------ loss
    @abc.abstractmethod
    def logits(self, model: nn.Module, params: Params, batch: BatchT, rng: jax.Array | None = None
               ) -> tuple[jax.Array, FFNAux]:
        """-> (logits [B, L, V] float32 for `batch.targets`, feed-forward aux)."""

    def hidden_states(self, model: nn.Module, params: Params, batch: BatchT, rng: jax.Array | None = None
                      ) -> tuple[jax.Array, FFNAux]:
        """-> (final-norm hidden states [B, L, D], feed-forward aux): `logits` before the output projection
        (what the chunked cross-entropy of `model.loss_chunk` > 0 needs; `LMFamily` has it)."""
        raise NotImplementedError(f"model.family={self.name} has no hidden-state output (model.loss_chunk > 0)")

    def output_matrix(self, params: Params) -> tuple[jax.Array, int]:
        """(the output projection's weights, their vocabulary axis): logits = `hidden_states` x it."""
        return output_matrix(self.cfg, params)

    def token_losses(self, model: nn.Module, params: Params, batch: BatchT, rng: jax.Array | None = None
                     ) -> tuple[jax.Array, jax.Array, FFNAux]:
        """-> (NLL [B, L], logZ [B, L] float32 of `batch.targets`, feed-forward aux). With `model.loss_chunk`
        > 0 from `hidden_states` and `output_matrix`, a chunk of positions at a time
        (`llmjax.kernels.cross_entropy`), so the full float32 logits never exist at once."""
        if self.cfg.loss_chunk > 0:
            hidden_BLD, aux = self.hidden_states(model, params, batch, rng)
            head, vocab_axis = self.output_matrix(params)
            nll_BL, logz_BL = chunked_token_losses(hidden_BLD, head, batch.targets, self.cfg.loss_chunk, vocab_axis,
                                                   self.cfg.compute_dtype)
            return nll_BL, logz_BL, aux
        logits_BLV, aux = self.logits(model, params, batch, rng)
        return (*cross_entropy(logits_BLV, batch.targets), aux)

    def loss(self, model: nn.Module, params: Params, batch: BatchT, z_loss: float, rng: jax.Array | None = None
             ) -> tuple[jax.Array, Sums]:
        """-> (the sum to differentiate, metric sums): sum over tokens of weights x (NLL + z_loss logZ^2),
        plus the feed-forward kinds' already-weighted auxiliary losses. Dividing by the batch's total
        weight gives the mean loss; sums add up exactly over microbatches."""
        nll_BL, logz_BL, aux = self.token_losses(model, params, batch, rng)
        total, sums = weighted_sums(nll_BL, logz_BL, batch.weights, z_loss)
        if aux:
            extra, aux_sums = aux_loss_terms(self.cfg, aux, jnp.sum(batch.weights))
            total, sums = total + extra, {**sums, **aux_sums}
        return total, sums

    def metrics(self, sums: Sums, total_weight: jax.Array) -> dict[str, jax.Array]:
        """Logged training metrics from the summed `loss` sums: loss, z_loss and the kinds' metrics."""
        return {"loss": sums["nll_sum"] / total_weight, "z_loss": sums["z_sum"] / total_weight,
                **aux_metrics(self.cfg, sums, total_weight)}

    def eval_sums(self, model: nn.Module, params: Params, batch: BatchT) -> Sums:
        """Sums over a validation batch, added over batches: nll_sum, weight_sum (+ family extras)."""
        if self.cfg.loss_chunk > 0:  # no full [B, L, V] logits: the NLL sums only
            nll_BL, logz_BL, _ = self.token_losses(model, params, batch)
            _, sums = weighted_sums(nll_BL, logz_BL, batch.weights, 0.0)
            return {"nll_sum": sums["nll_sum"], "weight_sum": jnp.sum(batch.weights)}
        logits_BLV, _ = self.logits(model, params, batch)
        return self.eval_sums_from_logits(logits_BLV, batch)

    def eval_sums_from_logits(self, logits_BLV: jax.Array, batch: BatchT) -> Sums:
        """`eval_sums` from the logits (families add metrics that need them, e.g. accuracy)."""
        nll_BL, logz_BL = cross_entropy(logits_BLV, batch.targets)
        _, sums = weighted_sums(nll_BL, logz_BL, batch.weights, 0.0)
        return {"nll_sum": sums["nll_sum"], "weight_sum": jnp.sum(batch.weights)}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """eval_loss (mean NLL per weighted token), eval_ppl (+ family extras) from summed `eval_sums`."""
        import math

        loss = sums["nll_sum"] / max(sums["weight_sum"], 1.0)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    # ------------------------------------------------------------------ cost
    def matmul_params(self) -> int:
        """Matmul parameters one token uses (biases excluded), for FLOPs: the layers' attention
        q (d·H·h) + k, v (2·d·K·h) + o (H·h·d), each layer's feed-forward kind (`FeedForward.matmul_params`,
        only the active experts for MoE), and the LM head V·d (the embedding table when tied). The
        embedding lookup (and a learned position table) is a gather, not a matmul."""
        m = self.cfg
        attn = m.d_model * m.resolved_head_dim * (2 * m.n_heads + 2 * m.n_kv_heads)
        kinds = ffn_kinds()
        ffn = sum(kinds[k].matmul_params(m) for k in layer_kinds(m))
        return m.n_layers * attn + ffn + m.vocab_size * m.d_model

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6·N + 12·L·H·h·T (PaLM, Chowdhery et al. 2022, app. B), see
        `llmjax.train.telemetry.metrics.flops_per_token` for the derivation."""
        m = self.cfg
        return float(6 * self.matmul_params() + 12 * m.n_layers * m.n_heads * m.resolved_head_dim * seq_len)

    def describe(self) -> str:
        return self.name


class LMFamily(ModelFamily[CfgT, LMBatch]):
    """A family whose batch is an `LMBatch` and whose module maps (inputs, segment_ids, positions) to logits
    (or, with `return_hidden=True`, to the final-norm hidden states)."""

    batch_type: ClassVar[type[Batch]] = LMBatch

    def logits(self, model: nn.Module, params: Params, batch: LMBatch, rng: jax.Array | None = None
               ) -> tuple[jax.Array, FFNAux]:
        return forward(model, params, batch.inputs, batch.segment_ids, batch.positions, rng=rng,
                       **_order(batch))

    def hidden_states(self, model: nn.Module, params: Params, batch: LMBatch, rng: jax.Array | None = None
                      ) -> tuple[jax.Array, FFNAux]:
        return forward(model, params, batch.inputs, batch.segment_ids, batch.positions, rng=rng, return_hidden=True,
                       **_order(batch))


def _order(batch: LMBatch) -> dict[str, bool]:
    """The module's keyword for a batch whose rows the host already balanced (none for natural order)."""
    return {"balanced_inputs": True} if isinstance(batch, BalancedLMBatch) else {}


# A KV cache: nested dicts of arrays (`llmjax.models.transformer.init_cache`) plus the family's entries.
Cache = dict[str, Any]


class DecodingFamily(ModelFamily[CfgT, BatchT]):
    """A family that generates: a left-padded prompt batch is prefilled into a KV cache, then `step` adds one
    token per row (`llmjax.infer.engine`)."""

    @abc.abstractmethod
    def decode_budget(self, prompt_len: int) -> int:
        """New tokens a prompt of this length leaves room for (0: too long)."""

    @abc.abstractmethod
    def cache_length(self, padded_prompt_len: int, new_tokens: int) -> int:
        """Cache slots for a prompt batch of this (padded) length and this many new tokens."""

    @abc.abstractmethod
    def new_cache(self, batch: int, slots: int, prompt_len: int) -> Cache:
        """An empty cache for `batch` rows of `slots` tokens and prompts of `prompt_len`."""

    @abc.abstractmethod
    def cache_axes(self, cache: Cache) -> dict[str, Any]:
        """Logical axes of every cache entry (the batch dimension is named `act_batch`)."""

    @abc.abstractmethod
    def prefill(self, model: nn.Module, params: Params, tokens_BP: jax.Array, segment_ids_BP: jax.Array,
                positions_BP: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Left-padded prompts [B, P] (padding: segment id 0) into an empty cache -> (next-token logits [B, V],
        cache)."""

    @abc.abstractmethod
    def step(self, model: nn.Module, params: Params, cache: Cache, token_B: jax.Array) -> tuple[jax.Array, Cache]:
        """One new token per row -> (next-token logits [B, V], cache)."""
