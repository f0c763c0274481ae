"""Model families (`model.family`): one `FamilySpec` each, the one place a family's capabilities are declared.

A `FamilySpec` says what a family is (its config class, the module of its code) and what it can do
(which `data.packing` its objective takes, whether it is a next-token model, splits into pipeline
stages, decodes with a KV cache, exports to Hugging Face). Config validation
(`llmjax.config.rules.validate`) and the family code (`llmjax.models.families`, `ModelFamily.spec`) both
read these flags from here; `ModelConfig.spec` gives a config's.

A family may add model keys of its own by subclassing `ModelConfig` here (frozen, with defaults);
`model.family` picks the class when a config is built, so `model.mask_prob` is a key of the
encoder family only, and an unknown family or key fails with a message naming it. Jax-free, so
config validation never imports jax; the family classes are in `llmjax.models.families`
(`build_family` imports them). Adding a family is its module plus a `FamilySpec` here.
"""

from __future__ import annotations

import dataclasses

from llmjax.config.fields import option
from llmjax.config.schema import ModelConfig
from llmjax.config.span_corruption import corrupted_lengths, corruption_row_length, span_lengths
from llmjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class EncoderConfig(ModelConfig):
    """BERT-style encoder trained by masked language modelling (`model.family=encoder`).

    Each token (EOS excepted) is selected for prediction with probability `mask_prob`; a selected
    token is replaced by the mask id (the last id of the vocabulary, reserved) with probability
    `mask_token_prob`, by a random token with `random_token_prob`, and kept otherwise (BERT: 15%,
    80/10/10). The loss and accuracy are over the selected tokens."""

    family: str = option("encoder", "model family (llmjax.config.family_spec)")
    mask_prob: float = option(0.15, "share of the tokens selected for prediction (masked LM)")
    mask_token_prob: float = option(0.8, "a selected token is replaced by the mask id with this probability")
    random_token_prob: float = option(0.1, "a selected token is replaced by a random token with this probability")

    @property
    def reserved_ids(self) -> int:
        return 1

    def check(self, seq_len: int) -> None:
        for name in ("mask_prob", "mask_token_prob", "random_token_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mask_prob == 0:
            raise ConfigError("model.mask_prob must be positive (no token would carry a loss)")
        if self.mask_token_prob + self.random_token_prob > 1.0:
            raise ConfigError(f"model.mask_token_prob + model.random_token_prob = "
                              f"{self.mask_token_prob + self.random_token_prob} must be <= 1")


@dataclasses.dataclass(frozen=True)
class EncoderDecoderConfig(ModelConfig):
    """T5-style encoder-decoder trained by span corruption (`model.family=encoder_decoder`).

    `n_layers` is the decoder's depth, `n_encoder_layers` the encoder's (0: the same). Span corruption
    (Raffel et al. 2020): `noise_density` of each row's tokens, in spans of mean length
    `mean_span_length`, are replaced in the encoder input by one sentinel id per span; the decoder
    predicts each sentinel followed by its span. Sentinels and the decoder-start id are the top
    `sentinels + 1` ids of the vocabulary (reserved). `data.seq_len` is the encoder input length; the
    target length follows from it."""

    family: str = option("encoder_decoder", "model family (llmjax.config.family_spec)")
    n_encoder_layers: int = option(0, "encoder blocks; 0: model.n_layers (the decoder's depth)")
    noise_density: float = option(0.15, "share of each row's tokens corrupted (span corruption)")
    mean_span_length: float = option(3.0, "mean length of a corrupted span, in tokens")
    sentinels: int = option(100, "sentinel ids reserved at the top of the vocabulary (one per span)")

    @property
    def reserved_ids(self) -> int:
        return self.sentinels + 1

    @property
    def encoder_layers(self) -> int:
        return self.n_encoder_layers or self.n_layers

    def check(self, seq_len: int) -> None:
        if self.loss_chunk > 0:
            raise ConfigError("model.loss_chunk: the chunked cross-entropy is not implemented for "
                              "model.family=encoder_decoder (its decoder's logits are [B, target length, V]); set 0")
        if self.n_encoder_layers < 0:
            raise ConfigError(f"model.n_encoder_layers must be >= 0 (0 = model.n_layers), got {self.n_encoder_layers}")
        if not 0.0 < self.noise_density < 1.0:
            raise ConfigError(f"model.noise_density must be in (0, 1), got {self.noise_density}")
        if self.mean_span_length < 1.0:
            raise ConfigError(f"model.mean_span_length must be >= 1, got {self.mean_span_length}")
        if self.sentinels < 1:
            raise ConfigError(f"model.sentinels must be >= 1, got {self.sentinels}")
        raw = corruption_row_length(seq_len, self.noise_density, self.mean_span_length)
        spans = span_lengths(raw, self.noise_density, self.mean_span_length)[1]
        if spans > self.sentinels:
            raise ConfigError(f"model.sentinels={self.sentinels}: span corruption of data.seq_len={seq_len} makes "
                              f"{spans} spans per example, each needs its own sentinel id")
        targets = corrupted_lengths(raw, self.noise_density, self.mean_span_length)[1]
        if targets > self.max_seq_len:
            raise ConfigError(f"model.max_seq_len={self.max_seq_len} is shorter than the decoder's target length "
                              f"{targets} (data.seq_len={seq_len}, model.noise_density={self.noise_density})")


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """What a model family is and what it can do, declared once (jax-free)."""

    name: str  # the `model.family` value
    config_class: type[ModelConfig]  # its model section (ModelConfig for families without keys of their own)
    implementation: str  # "module:class" of its `ModelFamily` (imported by `llmjax.models.families.build_family`)
    packings: tuple[str, ...]  # the data.packing values its objective takes
    causal_lm: bool  # a next-token model: log-likelihood tasks (eval.tasks, `llmjax harness`), train.objective=dpo
    pipeline: bool  # its stack splits into pipeline stages (mesh.pipeline > 1)
    decoding: bool  # a KV cache and incremental decoding (`llmjax generate`, end-of-run samples)
    hf_export: bool  # `llmjax convert to-hf` writes it as a Hugging Face model
    context_parallel: bool = True  # its sequence splits over the `context` mesh axis (mesh.context > 1)


FAMILIES: dict[str, FamilySpec] = {s.name: s for s in (
    FamilySpec("decoder", ModelConfig, "llmjax.models.families.decoder:DecoderFamily",
               packings=("concat", "best_fit"), causal_lm=True, pipeline=True, decoding=True, hf_export=True),
    # masked-LM scores are not sequence log-likelihoods; no decoder to generate with
    FamilySpec("encoder", EncoderConfig, "llmjax.models.families.encoder:EncoderFamily",
               packings=("concat", "best_fit"), causal_lm=False, pipeline=True, decoding=False, hf_export=False),
    # span corruption reads a row as one sequence (best-fit padding would be corrupted); it scores continuations
    # given an encoded input, not a text's likelihood; two stacks are not split into pipeline stages
    FamilySpec("encoder_decoder", EncoderDecoderConfig, "llmjax.models.families.encoder_decoder:EncoderDecoderFamily",
               packings=("concat",), causal_lm=False, pipeline=False, decoding=True, hf_export=False,
               context_parallel=False),
)}
# name -> "module:class" of the family implementation (`FamilySpec.implementation`)
FAMILY_CLASSES: dict[str, str] = {name: s.implementation for name, s in FAMILIES.items()}
# family -> its config class (`FamilySpec.config_class`)
MODEL_CONFIGS: dict[str, type[ModelConfig]] = {name: s.config_class for name, s in FAMILIES.items()}


def family_spec(family: object) -> FamilySpec:
    """The spec of `model.family`; ConfigError naming the key for an unknown family."""
    if not isinstance(family, str) or family not in FAMILIES:
        raise ConfigError(f"model.family: {family!r} is not one of {', '.join(FAMILIES)}")
    return FAMILIES[family]


def model_config_class(family: object) -> type[ModelConfig]:
    """The config class of `model.family`; ConfigError naming the key for an unknown family."""
    return family_spec(family).config_class
