"""Model families (`model.family`): each one's config class and where its code lives.

A family may add model keys of its own by subclassing `ModelConfig` here (frozen, with defaults);
`model.family` picks the class when a config is built, so `model.mask_prob` is a key of the
encoder family only, and an unknown family or key fails with a message naming it. Jax-free, so
config validation never imports jax; the family classes are in `llmjax.models.families`
(`build_family` imports them). Adding a family is its module plus an entry here.
"""

from __future__ import annotations

import dataclasses

from llmjax.config.fields import option
from llmjax.config.schema import ConfigError, ModelConfig

# name -> "module:class" of the family implementation
FAMILY_CLASSES: dict[str, str] = {
    "decoder": "llmjax.models.families.decoder:DecoderFamily",
    "encoder": "llmjax.models.families.encoder:EncoderFamily",
    "encoder_decoder": "llmjax.models.families.encoder_decoder:EncoderDecoderFamily",
}


@dataclasses.dataclass(frozen=True)
class EncoderConfig(ModelConfig):
    """BERT-style encoder trained by masked language modelling (`model.family=encoder`).

    Each token (EOS excepted) is selected for prediction with probability `mask_prob`; a selected
    token is replaced by the mask id (the last id of the vocabulary, reserved) with probability
    `mask_token_prob`, by a random token with `random_token_prob`, and kept otherwise (BERT: 15%,
    80/10/10). The loss and accuracy are over the selected tokens."""

    family: str = option("encoder", "model family (llmjax.config.family_spec)")
    causal_lm = False  # class attribute: masked-LM scores are not sequence log-likelihoods
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

    supports_pipeline = False  # two stacks: not split into pipeline stages
    causal_lm = False  # class attribute: scores continuations given an encoded input, not a text's likelihood
    packings = ("concat",)  # span corruption reads a row as one sequence: best-fit padding would be corrupted

    def check(self, seq_len: int) -> None:
        from llmjax.data.stream.row_objectives import corrupted_lengths, corruption_row_length, span_lengths

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
        raw = corruption_row_length(seq_len, self.noise_density, self.mean_span_length)  # numpy only, no jax
        spans = span_lengths(raw, self.noise_density, self.mean_span_length)[1]
        if spans > self.sentinels:
            raise ConfigError(f"model.sentinels={self.sentinels}: span corruption of data.seq_len={seq_len} makes "
                              f"{spans} spans per example, each needs its own sentinel id")
        targets = corrupted_lengths(raw, self.noise_density, self.mean_span_length)[1]
        if targets > self.max_seq_len:
            raise ConfigError(f"model.max_seq_len={self.max_seq_len} is shorter than the decoder's target length "
                              f"{targets} (data.seq_len={seq_len}, model.noise_density={self.noise_density})")


# family -> its config class (ModelConfig for families without keys of their own)
MODEL_CONFIGS: dict[str, type[ModelConfig]] = {
    "decoder": ModelConfig, "encoder": EncoderConfig, "encoder_decoder": EncoderDecoderConfig}


def model_config_class(family: object) -> type[ModelConfig]:
    """The config class of `model.family`; ConfigError naming the key for an unknown family."""
    if not isinstance(family, str) or family not in MODEL_CONFIGS:
        raise ConfigError(f"model.family: {family!r} is not one of {', '.join(MODEL_CONFIGS)}")
    return MODEL_CONFIGS[family]
