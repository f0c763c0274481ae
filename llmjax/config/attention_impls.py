"""Where each attention implementation (`model.attention`) lives: the names config validation accepts.

This table is jax-free so that config validation can check a name without importing jax (and
without importing `llmjax.kernels`). Each module registers its function with
`llmjax.models.attention.register` when it is imported; `llmjax.models.attention.get` imports
the module on first use. Adding an implementation is one module and one line here.
"""

from __future__ import annotations

# name -> module that registers it
ATTENTION_MODULES: dict[str, str] = {
    "xla": "llmjax.models.attention",  # the reference: einsum scores + softmax, dense boolean mask
    "dot_product_attention": "llmjax.models.attention",  # jax.nn.dot_product_attention, default (XLA) backend
    "chunked": "llmjax.kernels.chunked",  # blockwise online softmax in pure JAX, O(L) memory, any backend
    "splash": "llmjax.kernels.splash",  # Pallas TPU splash attention (interpret mode on CPU)
    "cudnn": "llmjax.kernels.cudnn",  # jax.nn.dot_product_attention(implementation="cudnn"), NVIDIA GPUs
}
# accepted spellings -> name
ATTENTION_ALIASES: dict[str, str] = {"einsum": "xla"}


def attention_names() -> tuple[str, ...]:
    """Every accepted `model.attention` value (names and aliases)."""
    return (*ATTENTION_MODULES, *ATTENTION_ALIASES)


def canonical_attention(name: str) -> str:
    """The implementation a `model.attention` value names (aliases resolved)."""
    return ATTENTION_ALIASES.get(name, name)
