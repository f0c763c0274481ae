"""Token-level losses on logits: cross-entropy with the log-partition (for the z-loss). The chunked
variant that never holds the full logits is `llmjax.kernels.cross_entropy` (`model.loss_chunk`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llmjax.parallel.rules import constrain


def cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """-> (negative log-likelihood of `targets` [B, L], log-partition logZ [B, L]), float32.

    The target logit is taken by a one-hot contraction, which keeps the vocabulary dimension sharded
    (no gather across devices). Its ops carry the name scope "loss" (profiles attribute them by it)."""
    with jax.named_scope("loss"):
        return _cross_entropy(logits_BLV, targets_BL)


def _cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    logz_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    onehot_BLV = jax.nn.one_hot(targets_BL, logits_BLV.shape[-1], dtype=logits_BLV.dtype)
    onehot_BLV = constrain(onehot_BLV, ("act_batch", "act_length", "act_vocab"))
    target_logit_BL = jnp.sum(logits_BLV * onehot_BLV, axis=-1)
    return logz_BL - target_logit_BL, logz_BL


def weighted_nll(logits_BLV: jax.Array, targets_BL: jax.Array, weights_BL: jax.Array, z_loss: float
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """-> (sum of weights x (NLL + z_loss logZ^2), {"nll_sum", "z_sum"}): the sums a train step divides by
    the batch's total weight (so they add up exactly over microbatches)."""
    nll_BL, logz_BL = cross_entropy(logits_BLV, targets_BL)
    return weighted_sums(nll_BL, logz_BL, weights_BL, z_loss)


def weighted_sums(nll_BL: jax.Array, logz_BL: jax.Array, weights_BL: jax.Array, z_loss: float
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`weighted_nll` from per-token NLL and logZ [B, L] (e.g. a chunked cross-entropy's)."""
    with jax.named_scope("loss"):
        nll_sum = jnp.sum(nll_BL * weights_BL)
        z_sum = z_loss * jnp.sum(jnp.square(logz_BL) * weights_BL)
        return nll_sum + z_sum, {"nll_sum": nll_sum, "z_sum": z_sum}
