"""`model.rope_scaling.*`: RoPE frequency scaling for long contexts (`llmjax.models.rope` implements it)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from llmjax.config.fields import option


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
    """RoPE frequency scaling for contexts beyond the pre-training length (`model.rope_scaling.*`).

    `linear` divides every frequency by `factor` (position interpolation); `dynamic` (NTK-aware)
    raises the base to theta ((factor L / L0) - (factor - 1))^(E / (E - 2)) once a call's positions
    reach past L0 (L = the call's largest position + 1, as transformers does per forward); `yarn`
    blends interpolated and original frequencies per dimension (ramp between `beta_fast` and
    `beta_slow` rotations over L0) and scales cos/sin by `attention_factor`; `llama3` divides the
    low frequencies (wavelength > L0 / low_freq_factor) by `factor`, keeps the high ones
    (< L0 / high_freq_factor) and interpolates between. L0 = `original_max_seq_len`.
    """

    type: Literal["none", "linear", "dynamic", "yarn", "llama3"] = option("none", "RoPE scaling kind; none: plain RoPE")
    factor: float = option(1.0, "context extension factor", ge=1)
    original_max_seq_len: int = option(0, "pre-training context L0 (dynamic, yarn, llama3); 0: model.max_seq_len",
                                       ge=0)
    low_freq_factor: float = option(1.0, "llama3: wavelengths above L0 / low_freq_factor are scaled by 1/factor",
                                    gt=0)
    high_freq_factor: float = option(4.0, "llama3: wavelengths below L0 / high_freq_factor are kept", gt=0)
    beta_fast: float = option(32.0, "yarn: rotations over L0 below which a dimension is interpolated fully", gt=0)
    beta_slow: float = option(1.0, "yarn: rotations over L0 above which a dimension is kept", gt=0)
    attention_factor: float = option(0.0, "yarn: cos/sin multiplier; 0: 0.1 ln(factor) + 1", ge=0)
    truncate: bool = option(True, "yarn: round the ramp's ends to whole dimensions")

    @property
    def enabled(self) -> bool:
        return self.type != "none"
