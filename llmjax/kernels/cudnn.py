"""cuDNN flash attention (`model.attention=cudnn`): `jax.nn.dot_product_attention(implementation="cudnn")`.

The `MaskSpec` is translated into the arguments that jax's cuDNN path accepts (`cudnn_arguments`):
- self-attention from offset 0 (training; L = S, offset a Python 0) with `causal`:
  `is_causal=True`, so cuDNN uses its causal mask type and skips the upper triangle; a window
  becomes `local_window_size=(window - 1, 0)` (cuDNN's left sliding window); packed documents
  (segment ids) become the boolean `mask` q_seg == kv_seg, which jax hands to cuDNN as an
  additive bias [B, 1, L, S] in the compute dtype;
- anything else (a KV cache's traced offset, a non-causal window): the whole rule as one
  boolean `mask` (`MaskSpec.dense()`), `is_causal=False` (cuDNN's causal mask is aligned to the
  top-left corner, which is wrong for a query block that starts at a cache offset).
The document mask as a bias costs B x L x S x 2 bytes (bf16) and cuDNN cannot skip the tiles
it hides; jax's private packed (THD) cuDNN layout would avoid that but is not public API.

cuDNN needs an NVIDIA GPU and bf16/fp16 inputs (`model.compute_dtype`, checked in validation);
elsewhere the implementation is refused with a message (`check`), never replaced. Not run on a
GPU in this repository's tests: on CPU they check the arguments by running the same call with
`implementation="xla"` against the reference.
"""

from __future__ import annotations

from typing import Any, Literal

import jax

from llmjax.config import ConfigError
from llmjax.models.attention import Blocks, MaskSpec, register


def check(platform: str) -> None:
    """cuDNN runs on NVIDIA GPUs only, and jax must find the cuDNN library (it asks for its version)."""
    if platform != "gpu":
        raise ConfigError(f"model.attention=cudnn needs an NVIDIA GPU (cuDNN flash attention), but this run is for "
                          f"{platform}: use model.attention=chunked (any backend), splash (TPU) or xla")
    try:  # private jax API (moves between releases): without it, jax's own error comes at trace time
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version
    except ImportError:
        return
    try:
        check_cudnn_version()
    except RuntimeError as e:
        raise ConfigError(f"model.attention=cudnn: jax cannot use cuDNN here ({e}); a compile for GPUs without "
                          "the CUDA libraries cannot trace cuDNN attention: use model.attention=chunked") from None


def cudnn_arguments(mask: MaskSpec, L: int, S: int) -> dict[str, Any]:
    """The mask-related keyword arguments of `jax.nn.dot_product_attention` for `mask` over [L, S] scores."""
    static_self = isinstance(mask.q_offset, int) and mask.q_offset == 0 and L == S
    if static_self and mask.causal:
        segments = mask.q_segment_ids[:, :, None] == mask.kv_segment_ids[:, None, :]
        args: dict[str, Any] = {"is_causal": True, "mask": segments[:, None]}
        if mask.window > 0:
            args["local_window_size"] = (mask.window - 1, 0)
        return args
    return {"is_causal": False, "mask": mask.dense()}


def cudnn_attention(q_BLHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, mask: MaskSpec, scale: float,
                    blocks: Blocks | None = None, implementation: Literal["xla", "cudnn"] = "cudnn") -> jax.Array:
    """Attention through cuDNN -> [B, L, H, E] in q's dtype. q [B, L, H, E], k/v [B, S, K, E] (GQA native).

    `implementation="xla"` runs the same call on XLA (how the tests check the arguments on CPU)."""
    args = cudnn_arguments(mask, q_BLHE.shape[1], k_BSKE.shape[1])
    out: jax.Array = jax.nn.dot_product_attention(q_BLHE, k_BSKE, v_BSKE, scale=scale, implementation=implementation,
                                                  **args)
    return out.astype(q_BLHE.dtype)


register("cudnn", cudnn_attention, check)
