"""Causal self-attention that skips the score tile above the diagonal, with the reference's arithmetic.

The reference (`llmjax.models.attention.xla_attention`) computes all L x L scores and masks the upper
triangle. Here the queries are cut in two halves: the first half is scored only against the first half
of the keys (the only keys it may see), the second half against all of them, so the forward's two
matmuls, the softmax and the backward's dP and dQ matmuls touch 3/4 of the full matrix.

At the default model's shape (and d_model 512's) every value is the reference's bit for bit, not merely
close: the default run's losses may not drift (issue 27's rule). At some other shapes a gradient can differ
in its last bit (dQ, dK with 2 heads of 64 at batch 8 x 256), so the tests pin the shapes that matter.
XLA:CPU contracts a * b + c into one fused multiply-add where a fusion allows it and groups a row sum by
the row's length, so the same formula in another program can round differently; what keeps the results
equal, checked by `tests/kernels/test_causal_tiles.py` forward and backward:
- each half runs the reference's own code (scale, mask, `jax.nn.softmax`, the two products) on its rows,
  over key rows of L/2 or L (lengths whose sums XLA:CPU groups as the full row's first part: with
  quarters, a row of 3L/4 keys is not);
- a skipped score is masked in the reference, so its probability is exactly 0; the products that skip
  it drop exact zeros at the *end* of a contraction (P V, dS K), which a sequential accumulation leaves
  unchanged; where the zeros would come *first* (the contractions over queries: dK = dS^T Q, dV = P^T dO)
  blocking could regroup the sums, so those two run as the reference's full products over the
  zero-filled [L, L] matrices (a custom VJP).

Sharding: slices along the sequence of arrays sharded over batch (data axes) and heads (`tensor`), as
the reference; not used for a sequence split over devices (context parallelism has its own path).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp

from llmjax.kernels import matmul

_BATCHED = ((0, 1), (0, 1))  # dot_general batch dims (B, K)
_QK = (((3,), (3,)), _BATCHED)  # [B, K, X, E] x [B, K, S, E] -> [B, K, X, S]
_PV = (((3,), (2,)), _BATCHED)  # [B, K, X, S] x [B, K, S, E] -> [B, K, X, E]


def applies(L: int, S: int) -> bool:
    """Whether L queries over S keys (the same tokens, causal, first query at slot 0) split in halves of a
    multiple of 64."""
    return L == S and L % 128 == 0


def probabilities(scores_BKXS: jax.Array, allowed_BLS: jax.Array, scale: float, fill: float, G: int, dtype: Any,
                  softcap: float = 0.0) -> jax.Array:
    """Raw scores [B, K, G L, S] (rows: query heads grouped under their key/value head) -> probabilities in
    `dtype`: scaled, soft-capped if `softcap` > 0 (s -> softcap tanh(s / softcap)), masked to `fill` where
    `allowed_BLS` [B, L, S] is False, softmax over the keys. The reference's whole matrix and each of these
    halves go through this one function, so that both compute the same operations."""
    B, K, X, S = scores_BKXS.shape
    s = scores_BKXS.reshape(B, K, G, X // G, S) * scale
    if softcap > 0:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(allowed_BLS[:, None, None], s, fill)
    return jax.nn.softmax(s, axis=-1).astype(dtype).reshape(B, K, X, S)


def _pad_keys(a_BKXe: jax.Array, width: int) -> jax.Array:
    return jnp.pad(a_BKXe, ((0, 0), (0, 0), (0, 0), (0, width - a_BKXe.shape[-1])))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def causal_tiled(q_BKGLE: jax.Array, k_BKSE: jax.Array, v_BKSE: jax.Array, allowed_BLS: jax.Array, scale: float,
                 fill: float, tile: int) -> jax.Array:
    """Causal self-attention, upper tiles skipped -> out [B, K, G, L, E] float32 (the reference's P V product).

    q [B, K, G, L, E] (query heads grouped under their key/value head), k/v [B, K, S, E] with S = L,
    `allowed_BLS` the boolean mask [B, L, S] (causal and whatever else: segments, window), `scale` the scores'
    factor, `fill` the masked scores' value, `tile` queries per row block (a divisor of L): any tile gives
    the reference's values, L / 2 (`xla_attention`'s choice where `applies`) bit for bit at the shapes the
    module docstring names."""
    return _forward(q_BKGLE, k_BKSE, v_BKSE, allowed_BLS, scale, fill, tile)[0]


def _forward(q_BKGLE: jax.Array, k_BKSE: jax.Array, v_BKSE: jax.Array, allowed_BLS: jax.Array, scale: float,
             fill: float, tile: int) -> tuple[jax.Array, tuple[Any, ...]]:
    B, K, G, L, E = q_BKGLE.shape
    outs, saved = [], []
    for start in range(0, L, tile):
        end = start + tile  # this block's queries, and the keys [0, end) they may see
        q_BKXE = q_BKGLE[:, :, :, start:end].reshape(B, K, G * tile, E)
        scores = _scores(q_BKXE, k_BKSE[:, :, :end])
        probs_fn = functools.partial(probabilities, allowed_BLS=allowed_BLS[:, start:end, :end], scale=scale, fill=fill,
                                     G=G, dtype=v_BKSE.dtype)
        probs, probs_vjp = jax.vjp(probs_fn, scores)
        outs.append(_values(probs, v_BKSE[:, :, :end]).reshape(B, K, G, tile, E))
        saved.append((probs, probs_vjp))
    return jnp.concatenate(outs, axis=3), (q_BKGLE, k_BKSE, v_BKSE, saved)


def _scores(q_BKXE: jax.Array, k_BKSE: jax.Array) -> jax.Array:
    return matmul.dot_general(q_BKXE, k_BKSE, _QK)


def _values(probs_BKXS: jax.Array, v_BKSE: jax.Array) -> jax.Array:
    return matmul.dot_general(probs_BKXS, v_BKSE, _PV)


def _cotangent(fn: Callable[[jax.Array], jax.Array], x: jax.Array, ct: jax.Array) -> jax.Array:
    """The cotangent of fn's input x given the cotangent `ct` of fn(x), by jax's own transpose rule."""
    return cast(jax.Array, jax.vjp(fn, x)[1](ct)[0])


def _backward(scale: float, fill: float, tile: int, res: tuple[Any, ...], g_BKGLE: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array, None]:
    q_BKGLE, k_BKSE, v_BKSE, saved = res
    B, K, G, L, E = q_BKGLE.shape
    dqs, dss, ps = [], [], []
    for i, start in enumerate(range(0, L, tile)):
        end = start + tile
        probs, probs_vjp = saved[i]
        g_BKXE = g_BKGLE[:, :, :, start:end].reshape(B, K, G * tile, E)
        d_probs = _cotangent(functools.partial(_values, v_BKSE=v_BKSE[:, :, :end]), probs, g_BKXE)
        (d_scores,) = probs_vjp(d_probs)
        q_BKXE = q_BKGLE[:, :, :, start:end].reshape(B, K, G * tile, E)
        dqs.append(_cotangent(functools.partial(_scores, k_BKSE=k_BKSE[:, :, :end]), q_BKXE, d_scores)
                   .reshape(B, K, G, tile, E))
        dss.append(_pad_keys(d_scores, L).reshape(B, K, G, tile, L))
        ps.append(_pad_keys(probs, L).reshape(B, K, G, tile, L))
    # dK and dV contract over the queries: the reference's full products over the zero-filled matrices
    d_scores_BKXS = jnp.concatenate(dss, axis=3).reshape(B, K, G * L, L)
    probs_BKXS = jnp.concatenate(ps, axis=3).reshape(B, K, G * L, L)
    q_BKXE = q_BKGLE.reshape(B, K, G * L, E)
    dk = _cotangent(functools.partial(_scores, q_BKXE), k_BKSE, d_scores_BKXS)
    dv = _cotangent(functools.partial(_values, probs_BKXS), v_BKSE, g_BKGLE.reshape(B, K, G * L, E))
    return jnp.concatenate(dqs, axis=3), dk, dv, None


causal_tiled.defvjp(_forward, _backward)
