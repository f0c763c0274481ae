"""Chunked cross-entropy (`model.loss_chunk`): per-token NLL and log-partition straight from the
final hidden states and the output matrix, without ever holding the full float32 [B, L, V] logits.

The sequence is cut into chunks of `chunk` positions; a `lax.scan` computes each chunk's
logits [B, chunk, V] (float32, from compute-dtype inputs as the LM head does), their
log-sum-exp and the target logit, and drops them. A custom VJP recomputes each chunk's logits
in the backward pass from the saved log-sum-exp: with cotangents g_nll and g_logz of the two
outputs, dlogits = (g_nll + g_logz) softmax - g_nll onehot(target), then dx = dlogits W^T
(per chunk) and dW = sum over chunks of x^T dlogits (a float32 accumulator shaped like W). Live
memory is O(B chunk V) instead of O(B L V) (plus, in the dense path, a one-hot of the same size
and the logits' gradient). Token weights and the z-loss are applied by the caller to the
returned per-token values, so they are differentiated through the same VJP.

Sharding: logits chunks are constrained ("act_batch", "act_length", "act_vocab") like the dense
logits (vocabulary over `tensor`); the target logit is a one-hot contraction, so the vocabulary
dimension is never gathered.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from llmjax.parallel.rules import constrain

Static = tuple[int, str]  # (vocab axis of the head matrix: 0 for [V, D], 1 for [D, V]; compute dtype name)


@jax.named_scope("loss")  # the name profiles attribute these ops by
def token_losses(x_BLD: jax.Array, head: jax.Array, targets_BL: jax.Array, chunk: int, vocab_axis: int = 1,
                 compute_dtype: str = "float32") -> tuple[jax.Array, jax.Array]:
    """(NLL [B, L], logZ [B, L]) float32 of the logits x W, computed `chunk` positions at a time.

    x [B, L, D] (the final-norm hidden states, "act_batch", "act_length", "act_embed"); `head` the
    output matrix, [D, V] (`vocab_axis=1`, an untied LM head) or [V, D] (`vocab_axis=0`, tied
    embeddings); targets [B, L] int. L need not divide by `chunk` (the last chunk is padded)."""
    B, L, D = x_BLD.shape
    chunk = min(chunk, L)
    n = math.ceil(L / chunk)
    pad = n * chunk - L
    if pad:
        x_BLD = jnp.pad(x_BLD, ((0, 0), (0, pad), (0, 0)))
        targets_BL = jnp.pad(targets_BL, ((0, 0), (0, pad)))
    x_NBCD = x_BLD.reshape(B, n, chunk, D).swapaxes(0, 1)
    t_NBC = targets_BL.astype(jnp.int32).reshape(B, n, chunk).swapaxes(0, 1)
    nll_NBC, logz_NBC = _chunked(x_NBCD, head, t_NBC, (vocab_axis, compute_dtype))
    unchunk = lambda a: a.swapaxes(0, 1).reshape(B, n * chunk)[:, :L]  # noqa: E731
    return unchunk(nll_NBC), unchunk(logz_NBC)


def _logits(x_BCD: jax.Array, head: jax.Array, static: Static) -> jax.Array:
    vocab_axis, compute = static
    contract = 1 - vocab_axis  # the head's D axis
    logits = jax.lax.dot_general(x_BCD.astype(compute), head.astype(compute), (((2,), (contract,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    return constrain(logits, ("act_batch", "act_length", "act_vocab"))


def _onehot(t_BC: jax.Array, vocab: int) -> jax.Array:
    return constrain(jax.nn.one_hot(t_BC, vocab, dtype=jnp.float32), ("act_batch", "act_length", "act_vocab"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(x_NBCD: jax.Array, head: jax.Array, t_NBC: jax.Array, static: Static) -> tuple[jax.Array, jax.Array]:
    return _forward(x_NBCD, head, t_NBC, static)


def _forward(x_NBCD: jax.Array, head: jax.Array, t_NBC: jax.Array, static: Static) -> tuple[jax.Array, jax.Array]:
    vocab = head.shape[static[0]]

    def one_chunk(_: None, xs: tuple[jax.Array, jax.Array]) -> tuple[None, tuple[jax.Array, jax.Array]]:
        x_BCD, t_BC = xs
        logits = _logits(x_BCD, head, static)
        logz = jax.nn.logsumexp(logits, axis=-1)
        target = jnp.sum(logits * _onehot(t_BC, vocab), axis=-1)
        return None, (logz - target, logz)

    nll_logz: tuple[jax.Array, jax.Array] = jax.lax.scan(one_chunk, None, (x_NBCD, t_NBC))[1]
    return nll_logz


def _chunked_fwd(x_NBCD: jax.Array, head: jax.Array, t_NBC: jax.Array, static: Static
                 ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, ...]]:
    nll, logz = _forward(x_NBCD, head, t_NBC, static)
    return (nll, logz), (x_NBCD, head, t_NBC, logz)


def _chunked_bwd(static: Static, residuals: tuple[jax.Array, ...], cotangents: tuple[jax.Array, jax.Array]
                 ) -> tuple[jax.Array, jax.Array, None]:
    x_NBCD, head, t_NBC, logz_NBC = residuals
    g_nll, g_logz = cotangents
    vocab_axis, compute = static
    vocab = head.shape[vocab_axis]

    def one_chunk(d_head: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array]:
        x_BCD, t_BC, logz_BC, gn_BC, gz_BC = xs
        probs = jnp.exp(_logits(x_BCD, head, static) - logz_BC[..., None])
        d_logits = (gn_BC + gz_BC)[..., None] * probs - gn_BC[..., None] * _onehot(t_BC, vocab)
        d_logits = constrain(d_logits.astype(compute), ("act_batch", "act_length", "act_vocab"))
        head_c = head.astype(compute)
        dx = jax.lax.dot_general(d_logits, head_c, (((2,), (vocab_axis,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        # [B, C, D] x [B, C, V] -> [D, V] (or [V, D] for a tied head), summed over the chunk's tokens
        x_c = x_BCD.astype(compute)
        if vocab_axis == 1:
            dh = jax.lax.dot_general(x_c, d_logits, (((0, 1), (0, 1)), ((), ())), preferred_element_type=jnp.float32)
        else:
            dh = jax.lax.dot_general(d_logits, x_c, (((0, 1), (0, 1)), ((), ())), preferred_element_type=jnp.float32)
        return d_head + dh, dx.astype(x_BCD.dtype)

    d_head, dx = jax.lax.scan(one_chunk, jnp.zeros(head.shape, jnp.float32),
                              (x_NBCD, t_NBC, logz_NBC, g_nll, g_logz))
    return dx, d_head.astype(head.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
