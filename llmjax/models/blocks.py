"""Residual blocks and the one runner for a stack of them (scan, Python loop or pipeline).

Every block has one signature in training, prefill and decode:

    block(x [B, L, D], inputs: StackInputs, cache: dict | None) -> (x, (new cache or None, aux))

`inputs` is what every layer shares (positions, the self-attention `MaskSpec`, and for a
decoder with cross-attention the encoder output and its mask); `cache` is this layer's
slice of the KV cache ({"k", "v"} [B, S, K, E], plus "cross_k"/"cross_v" with
cross-attention); aux is {feed-forward kind name: its per-layer statistics} (empty for a
dense MLP). A stack is n identical *units* (a `Block`, or a `BlockGroup` of k blocks when
the feed-forward kind repeats every k layers) whose parameters are stacked along a leading
`layers` dimension. `layer_stack` creates them (with `nn.scan`, at init) and runs them
(`run_units`: `lax.scan` or a Python loop; or the pipeline schedule) from the same
stacked parameters, so checkpoints do not depend on how the stack is run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from llmjax.config import ModelConfig
from llmjax.models.attention import Attention, MaskSpec
from llmjax.models.feedforward import ffn_kinds, layer_kinds
from llmjax.models.layers import make_norm
from llmjax.parallel.pipeline import Schedule
from llmjax.parallel.pipeline import run as run_pipeline
from llmjax.parallel.rules import constrain

REMAT_POLICIES: dict[str, Any] = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "minimal": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
ACT = ("act_batch", "act_length", "act_embed")


@struct.dataclass
class StackInputs:
    """What every layer of a stack shares. Shapes: [B, L] queries, [B, S, D] encoder output."""

    positions: jax.Array  # [B, L] int32: each token's position in its document (RoPE, learned positions)
    mask: MaskSpec  # self-attention
    cross_x: jax.Array | None = None  # [B, S, D] encoder output (cross-attention); None: read the cache
    cross_mask: MaskSpec | None = None  # decoder queries over encoder tokens


def layer_windows(cfg: ModelConfig, n_layers: int | None = None) -> tuple[int, ...]:
    """The self-attention window of each of `n_layers` (default `model.n_layers`) layers: `model.sliding_window`
    (0: none), except layers global_every-1, 2*global_every-1, ... which attend globally (`model.global_every`)."""
    n, w, every = cfg.n_layers if n_layers is None else n_layers, cfg.sliding_window, cfg.global_every
    return tuple(0 if w == 0 or (every and (i + 1) % every == 0) else w for i in range(n))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)) [+ cross_attn(norm(x))], then + ffn(norm(x)).

    `ffn` is the feed-forward kind (`feedforward.ffn_kinds`), `cross` adds cross-attention over
    `inputs.cross_x` (an encoder-decoder's decoder), `window` > 0 makes the self-attention local (the
    last `window` keys; `inputs.mask` is otherwise shared by every layer). With `model.post_norms` each
    sublayer's output is normalised again before its residual add (`post_attn_norm`, `post_mlp_norm`)."""

    cfg: ModelConfig
    ffn: str = "mlp"
    cross: bool = False
    window: int = 0

    @nn.compact
    def __call__(self, x_BLD: jax.Array, inputs: StackInputs, cache: dict | None = None) -> tuple[jax.Array, Any]:
        cfg = self.cfg
        h = make_norm(cfg, "attn_norm")(x_BLD)
        self_cache = None if cache is None else {"k": cache["k"], "v": cache["v"]}
        mask = inputs.mask
        if mask.window != self.window:  # struct.dataclass's (untyped) `replace` is this dataclasses.replace
            mask = dataclasses.replace(mask, window=self.window)
        attn, self_cache = Attention(cfg, name="attn")(h, inputs.positions, mask, self_cache)
        if cfg.post_norms:
            attn = make_norm(cfg, "post_attn_norm")(attn)
        x_BLD = x_BLD + attn
        new_cache = None if self_cache is None else dict(self_cache)  # Attention returns a cache iff given one
        if self.cross:
            assert inputs.cross_mask is not None, "a cross-attention block needs inputs.cross_mask"
            h = make_norm(cfg, "cross_norm")(x_BLD)
            cross_cache = None if cache is None else {"k": cache["cross_k"], "v": cache["cross_v"]}
            out, cross_cache = Attention(cfg, cross=True, name="cross_attn")(
                h, inputs.positions, inputs.cross_mask, cross_cache, inputs.cross_x)
            x_BLD = x_BLD + out
            if new_cache is not None and cross_cache is not None:
                new_cache.update(cross_k=cross_cache["k"], cross_v=cross_cache["v"])
        h = make_norm(cfg, "mlp_norm")(x_BLD)
        y, aux = ffn_kinds()[self.ffn].apply(cfg, h)
        if cfg.post_norms:
            y = make_norm(cfg, "post_mlp_norm")(y)
        x_BLD = constrain(x_BLD + y, ACT)
        return x_BLD, (new_cache, {} if aux is None else {self.ffn: aux})


class BlockGroup(nn.Module):
    """Consecutive blocks with the feed-forward kinds `ffns` (e.g. ("mlp", "mlp", "moe")) and attention
    windows `windows` (() : none), scanned as one unit when (kind, window) repeat every len(ffns) layers.
    Parameters are `block_{j}/...`; the cache entries carry a leading [len(ffns)] dimension (block j reads
    entry j)."""

    cfg: ModelConfig
    ffns: tuple[str, ...]
    cross: bool = False
    windows: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, x_BLD: jax.Array, inputs: StackInputs, cache: dict | None = None) -> tuple[jax.Array, Any]:
        caches, aux = [], {}
        windows = self.windows or (0,) * len(self.ffns)
        for j, (ffn, window) in enumerate(zip(self.ffns, windows, strict=True)):
            c = None if cache is None else jax.tree.map(lambda a, j=j: a[j], cache)
            x_BLD, (c, a) = Block(self.cfg, ffn, self.cross, window, name=f"block_{j}")(x_BLD, inputs, c)
            caches.append(c)
            aux.update(a)
        new_cache = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *caches)
        return x_BLD, (new_cache, aux)


def stack_unit(cfg: ModelConfig, cross: bool = False, n_layers: int | None = None) -> tuple[nn.Module, int]:
    """(the repeated unit, how many) for a stack of `n_layers` (default `model.n_layers`): a `Block` per layer
    when every layer has the same feed-forward kind and attention window, else a `BlockGroup` of the
    repeating pattern (MoE every k-th layer: k - 1 dense blocks, then MoE; local/global attention)."""
    n = cfg.n_layers if n_layers is None else n_layers
    kinds = tuple(zip(layer_kinds(cfg, n), layer_windows(cfg, n), strict=True))
    period = next(p for p in range(1, n + 1) if n % p == 0 and kinds == kinds[:p] * (n // p))
    if period == 1:
        return Block(cfg, kinds[0][0], cross, kinds[0][1]), n
    ffns, windows = zip(*kinds[:period], strict=True)
    return BlockGroup(cfg, tuple(ffns), cross, tuple(windows) if any(windows) else ()), n // period


def _unit_fields(unit: nn.Module) -> dict[str, Any]:
    return {f: getattr(unit, f) for f in ("cfg", "ffn", "ffns", "cross", "window", "windows") if hasattr(unit, f)}


def run_units(unit: nn.Module, stacked_params: Any, x_BLD: jax.Array, inputs: StackInputs, cache: dict | None = None,
              *, scan: bool, remat: str = "none", router_rng: jax.Array | None = None,
              first_unit: jax.Array | int = 0) -> tuple[jax.Array, dict | None, dict]:
    """Apply the units whose stacked parameters (leaves [n, ...]) are given, in order, functionally.

    x [B, L, D] ("act_batch", "act_length", "act_embed"); `cache` leaves [n, ...] (one slice per unit) ->
    (x, the new cache stacked over units or None, aux stacked over units). `scan`: a `lax.scan` over the
    units, else a Python loop (straight-line code: no loop-carried buffers, faster for small models on
    CPU, compile time grows with depth). `remat`: a `model.remat` policy per unit (not with a cache).
    `router_rng`: the MoE router-jitter key; unit i of the whole stack uses fold_in(router_rng, i),
    i = `first_unit` + its index here."""
    n_units = jax.tree.leaves(stacked_params)[0].shape[0]

    def one(params: Any, x: jax.Array, c: dict | None, i: jax.Array | int) -> tuple[jax.Array, Any]:
        rngs = None if router_rng is None else {"router": jax.random.fold_in(router_rng, i)}
        return unit.apply({"params": params}, x, inputs, c, rngs=rngs)

    if remat != "none" and cache is None:
        one = jax.checkpoint(one, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if scan:
        def body(x: jax.Array, xs: tuple[Any, Any, jax.Array]) -> tuple[jax.Array, Any]:
            return one(xs[0], x, xs[1], xs[2])

        index = first_unit + jnp.arange(n_units, dtype=jnp.int32)
        x_BLD, (new_cache, aux) = jax.lax.scan(body, x_BLD, (stacked_params, cache, index))
        return x_BLD, new_cache, aux
    caches, auxes = [], []
    for i in range(n_units):
        c = None if cache is None else jax.tree.map(lambda a, i=i: a[i], cache)
        x_BLD, (c, a) = one(jax.tree.map(lambda p, i=i: p[i], stacked_params), x_BLD, c, first_unit + i)
        caches.append(c)
        auxes.append(a)
    stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)  # noqa: E731
    return x_BLD, (None if cache is None else stack(caches)), stack(auxes)


def pipelined_units(unit: nn.Module, schedule: Schedule, stacked_params: Any, x_BLD: jax.Array,
                    side: tuple[jax.Array, ...], make_inputs: Callable[..., StackInputs], *, remat: str = "none",
                    router_rng: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """The stack run by the pipeline `schedule` (`llmjax.parallel.pipeline.run`) from the same stacked
    parameters (their `layers` dimension split over `pipeline`). No KV cache.

    `side`: per-token arrays [B, L] cut into microbatches with x (e.g. segment ids and positions);
    `make_inputs(*side_microbatch)` builds the `StackInputs` of one microbatch. -> (x, aux stacked over
    units, merged over microbatches by each feed-forward kind: routing is per token and capacity groups
    are sequences, so the statistics equal the unpipelined ones). `remat` applies to each stage's units
    per schedule iteration (one remat region per stage and iteration). Router jitter: unit i on
    microbatch m uses fold_in(fold_in(router_rng, m), i)."""

    def stage(params_U: Any, x: jax.Array, side_mb: tuple[jax.Array, ...], first_unit: jax.Array,
              microbatch: jax.Array) -> tuple[jax.Array, Any]:
        rng = None if router_rng is None else jax.random.fold_in(router_rng, microbatch)
        x, _, aux = run_units(unit, params_U, x, make_inputs(*side_mb), scan=unit.cfg.scan_layers,
                              router_rng=rng, first_unit=first_unit)
        return x, aux

    side_axes = (("act_batch", "act_length"),) * len(side)
    x_BLD, aux = run_pipeline(schedule, stage, stacked_params, x_BLD, side, ACT, side_axes,
                              remat_policy=REMAT_POLICIES.get(remat))
    return x_BLD, {k: ffn_kinds()[k].merge_microbatches(v) for k, v in aux.items()}


def layer_stack(module: nn.Module, name: str, unit: nn.Module, n_units: int, x_BLD: jax.Array, inputs: StackInputs,
                cache: dict | None = None, *, pipeline: Schedule | None = None, side: tuple[jax.Array, ...] = (),
                make_inputs: Callable[..., StackInputs] | None = None) -> tuple[jax.Array, dict | None, dict]:
    """Inside `module`'s compact method: the stack `name` of `n_units` units -> (x, new cache, aux).

    At init the parameters are created by `nn.scan` (leading `layers` dimension, split rngs per unit);
    afterwards they are read from `module.variables` and run by `run_units` (`cfg.scan_layers`: lax.scan,
    else a Python loop) or, with `pipeline` (training, no cache), by `pipelined_units` over `side`."""
    cfg = unit.cfg
    if module.is_initializing():
        scanned = nn.scan(type(unit), variable_axes={"params": 0}, split_rngs={"params": True, "router": True},
                          in_axes=(nn.broadcast, 0 if cache is not None else nn.broadcast), length=n_units,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        x_BLD, (new_cache, aux) = scanned(**_unit_fields(unit), name=name)(x_BLD, inputs, cache)
        return x_BLD, new_cache, aux
    params = module.variables["params"][name]
    jitter = cfg.moe.enabled and cfg.moe.router_jitter > 0 and module.has_rng("router") and cache is None
    rng = module.make_rng("router") if jitter else None
    if pipeline is not None and cache is None:
        assert make_inputs is not None, "a pipelined stack needs make_inputs"
        x_BLD, aux = pipelined_units(unit, pipeline, params, x_BLD, side, make_inputs, remat=cfg.remat,
                                     router_rng=rng)
        return x_BLD, None, aux
    return run_units(unit, params, x_BLD, inputs, cache, scan=cfg.scan_layers, remat=cfg.remat, router_rng=rng)
