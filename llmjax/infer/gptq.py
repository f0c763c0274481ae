"""GPTQ (Frantar et al., 2022) for `--quant int4-gptq`: int4 codes chosen to keep each layer's output on
calibration data, on the grid of `llmjax.infer.int4` (symmetric, one float32 scale per group of inputs).

For a linear map y = x W (W [n_in, n_out]) whose inputs on the calibration tokens are X [T, n_in], the
output error ||X W - X W_q||^2 is a quadratic form in the weight error with Hessian H = 2 X^T X / T.
GPTQ quantizes the inputs' rows of W in order; after rounding row i it spreads the error over the rows
not yet quantized, through the Cholesky factor of H^-1 (the optimal compensation for that quadratic).
Damping: H + damp * mean(diag H) I (default damp 0.01); inputs never seen (diag 0) get weight 0.
Lazy batch updates: rows are processed in blocks (a multiple of the group size), the rest of W updated
once per block. A group's scale is taken when its first row is reached, from the compensated weights.

Which leaves: every `Linear` kernel that int4 quantizes (attention q/k/v/o, MLP wi/wo, shared experts,
the untied output head). Embedding tables (a tied head included: the table is also the lookup) and
routed experts (their inputs differ per expert) are rounded to nearest. The stack is calibrated
sequentially, one layer unit at a time: the inputs of unit l come from units 0..l-1 already quantized
(and from the quantized embeddings), then the head from the whole quantized stack, as the reference
implementation does. The inputs are recorded with `flax.linen.intercept_methods` while the stack runs as
a Python loop (`model.scan_layers=false` for calibration only), so the model code is unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ConfigError, ModelConfig
from llmjax.infer.int4 import QMAX, Int4Weight, contraction_span, from_codes
from llmjax.infer.quantize import dequantize, quantize_int4, quantized_axes
from llmjax.models.layers import Linear

Key = tuple[int | None, tuple[str, ...]]  # (layer unit or None for the top level, module path within it)


def gptq_matrix(w: np.ndarray, h: np.ndarray, group_size: int, damp: float = 0.01, block: int = 128
                ) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ of one matrix. w [n_in, n_out], h [n_in, n_in] (2 X^T X / T) -> (codes int8 [n_in, n_out] in
    [-7, 7], scales float32 [n_in / group_size, n_out]); w ~ codes * scales repeated over each group."""
    n_in, n_out = w.shape
    W = np.array(w, np.float64)
    H = np.array(h, np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[dead] = 0.0
    H += damp * np.mean(np.diag(H)) * np.eye(n_in)
    try:
        U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: H^-1 = U^T U
    except np.linalg.LinAlgError:
        raise ConfigError(f"--quant int4-gptq: a Hessian of {n_in} inputs is not positive definite even with "
                          f"damping {damp}; give more calibration sequences") from None
    codes = np.zeros((n_in, n_out), np.int8)
    scales = np.zeros((n_in // group_size, n_out), np.float64)
    block = group_size * max(1, block // group_size)  # groups never straddle a block
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        W1, U1 = W[i1:i2].copy(), U[i1:i2, i1:i2]
        err = np.zeros_like(W1)
        for i in range(i2 - i1):
            if (i1 + i) % group_size == 0:
                s = np.max(np.abs(W1[i:i + group_size]), axis=0) / QMAX
                scales[(i1 + i) // group_size] = np.where(s == 0, 1.0, s)
            s = scales[(i1 + i) // group_size]
            q = np.clip(np.round(W1[i] / s), -QMAX, QMAX)
            codes[i1 + i] = q
            err[i] = (W1[i] - q * s) / U1[i, i]
            W1[i + 1:] -= np.outer(U1[i, i + 1:], err[i])
        W[i2:] -= U[i1:i2, i2:].T @ err
    return codes, scales.astype(np.float32)


class _Recorder:
    """A flax method interceptor: sums x^T x of the inputs of every `Linear` of layer unit `want` (or, with
    `want` None, of the top-level module), in float32. A module called with an empty path inside the model's
    own call is a layer unit (`llmjax.models.blocks.run_units` applies each unit on its own)."""

    def __init__(self, want: int | None):
        self.want, self.depth, self.units = want, 0, 0
        self.unit: int | None = None
        self.sums: dict[Key, jax.Array] = {}
        self.counts: dict[Key, int] = {}

    def __call__(self, next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
        m = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if m.path == ():
            nested = self.depth > 0
            if nested:
                self.unit, self.units = self.units, self.units + 1
            self.depth += 1
            try:
                return next_fun(*args, **kwargs)
            finally:
                self.depth -= 1
                if nested:
                    self.unit = None
        if isinstance(m, Linear) and self.unit == self.want:
            x = args[0]
            x2 = x.reshape(-1, int(np.prod(x.shape[x.ndim - m.n_in:]))).astype(jnp.float32)
            key = (self.unit, tuple(m.path))
            self.sums[key] = self.sums.get(key, 0) + x2.T @ x2
            self.counts[key] = self.counts.get(key, 0) + x2.shape[0]
        return next_fun(*args, **kwargs)


def _sub(tree: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def gptq_quantize(cfg: ModelConfig, params: Any, logical_specs: Any, batches: Iterable[Any], group_size: int,
                  damp: float = 0.01, run: Callable[[Callable], Callable] = lambda f: f,
                  log: Callable[[str], None] = lambda s: None) -> Any:
    """Float params -> the `quantize_int4` tree with GPTQ codes for every `Linear` kernel it quantizes.

    `batches`: the family's typed batches (calibration data, e.g. training rows); `run(fn)` wraps the jitted
    calibration forward (e.g. under the inference mesh's sharding rules); `log` gets one line per unit."""
    from llmjax.models.families import build_family

    batches = list(batches)
    family = build_family(dataclasses.replace(cfg, scan_layers=False, remat="none"))
    model = family.module()
    leaves, treedef = jax.tree.flatten(params)
    paths = [tuple(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    index = {p: i for i, p in enumerate(paths)}
    specs = jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    # the model calibration runs: everything int4 quantizes rounded to nearest, then each unit's Linear kernels
    # replaced by their GPTQ result in turn (unit l's inputs depend on units < l and the embeddings alone)
    work = [np.array(x, np.float32) for x in jax.tree.leaves(dequantize(quantize_int4(params, logical_specs,
                                                                                      group_size)))]
    done: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}  # leaf -> unit (-1: unstacked) -> result

    traced_units: list[int] = []

    def fn(p: Any, batch: Any, want: int | None) -> tuple[dict[Key, jax.Array], dict[Key, int]]:
        rec = _Recorder(want)
        with nn.intercept_methods(rec):
            family.logits(model, p, batch)
        traced_units.append(rec.units)
        return rec.sums, rec.counts

    jitted = jax.jit(run(fn), static_argnames="want")

    def hessians(want: int | None) -> dict[Key, np.ndarray]:
        p = jax.tree.unflatten(treedef, [jnp.asarray(x) for x in work])
        sums: dict[Key, np.ndarray] = {}
        counts: dict[Key, int] = {}
        for b in batches:
            s, c = jitted(p, b, want=want)
            for k, v in s.items():
                sums[k] = sums.get(k, 0) + np.asarray(v, np.float64)
                counts[k] = counts.get(k, 0) + int(c[k])
        return {k: 2 * v / counts[k] for k, v in sums.items()}

    unit, n_units = 0, 1
    stack: tuple[str, ...] | None = None
    while unit < n_units:
        hs = hessians(unit)
        n_units = traced_units[-1]  # known after the first trace
        n_done = 0
        for (_, rel), h in hs.items():
            if stack is None:
                found = [k for k in params if _sub(params[k], (*rel, "kernel")) is not None]
                if len(found) != 1:
                    raise ConfigError(f"--quant int4-gptq: model.family={cfg.family} has {len(found)} layer stacks "
                                      "holding the same layers; use --quant int4")
                stack = (found[0],)
            n_done += _gptq_leaf(index.get((*stack, *rel, "kernel")), unit, h, work, leaves, specs, group_size, damp,
                                 done)
        log(f"layer unit {unit + 1}/{n_units}: {n_done} matrices")
        unit += 1
    n_done = sum(_gptq_leaf(index.get((*rel, "kernel")), None, h, work, leaves, specs, group_size, damp, done)
                 for (_, rel), h in hessians(None).items())
    log(f"top level: {n_done} matrices")
    codes = {i: _assemble(leaves[i], specs[i], parts, group_size) for i, parts in done.items()}
    return quantize_int4(params, logical_specs, group_size, codes)


def _gptq_leaf(i: int | None, unit: int | None, h: np.ndarray, work: list[np.ndarray], leaves: list[Any],
               specs: list[Any], group_size: int, damp: float, done: dict) -> bool:
    """GPTQ of the float leaf i's slice `unit` (None: the unstacked leaf); the dequantized result replaces
    `work[i]`'s. False when the leaf stays as it is (not quantized, e.g. the router, or not a plain matrix)."""
    if i is None or quantized_axes(specs[i]) is None:
        return False
    w = np.asarray(leaves[i] if unit is None else leaves[i][unit], np.float32)
    n_in = h.shape[0]
    if int(np.prod(w.shape)) % n_in or int(np.prod(w.shape[:_ndim_in(w.shape, n_in)])) != n_in:
        return False  # its inputs are not its leading dimensions (never for Linear kernels): keep round-to-nearest
    codes, scales = gptq_matrix(w.reshape(n_in, -1), h, group_size, damp)
    deq = (codes.reshape(-1, group_size, codes.shape[1]) * scales[:, None, :]).reshape(w.shape)
    if unit is None:
        work[i] = deq.astype(np.float32)
    else:
        work[i][unit] = deq
    done.setdefault(i, {})[-1 if unit is None else unit] = (codes, scales)
    return True


def _ndim_in(shape: tuple[int, ...], n_in: int) -> int:
    """How many leading dimensions of `shape` multiply to `n_in` (0 if none do)."""
    size = 1
    for d, n in enumerate(shape):
        size *= n
        if size == n_in:
            return d + 1
    return 0


def _assemble(leaf: Any, spec: Any, parts: dict[int, tuple[np.ndarray, np.ndarray]], group_size: int
              ) -> Int4Weight:
    """The `Int4Weight` of a whole leaf from its GPTQ'd slices (every unit of a stacked leaf, or -1)."""
    reduce = quantized_axes(spec)
    assert reduce is not None
    start, stop = contraction_span(reduce)
    shape = tuple(leaf.shape)
    post = shape[stop:]
    units = sorted(parts)
    codes = np.stack([parts[u][0].reshape(-1, group_size, *post) for u in units])
    scales = np.stack([parts[u][1].reshape(-1, 1, *post) for u in units])
    if units == [-1]:
        codes, scales = codes[0], scales[0]
    elif units != list(range(shape[0])):
        raise ConfigError(f"--quant int4-gptq: calibrated {len(units)} of the {shape[0]} stacked layers")
    return from_codes(codes, scales, shape, start, stop)
