"""`llmjax mup-check`: the μP coordinate check (Yang et al. 2022, app. D.1), with the real train step.

For each parametrization and each width, the config's model is rebuilt at that width (d_model
and d_ff scaled together; with `model.head_dim` 0 the heads grow wider, otherwise their count
grows), trained for a few steps at a constant learning rate on a fixed synthetic stream (a
sparse random Markov chain over the vocabulary, the same at every width), and after each step
every module's output on a fixed probe batch is measured: its RMS (`act`) and the RMS of its
change since initialisation (`delta`, the update's effect on that coordinate). Under a correct
μP both stay roughly constant in width; under standard parametrisation with Adam they grow.

Module outputs are caught with `flax.linen.intercept_methods`, so the check works for any
model built of linen modules, whatever its stack: an output is named by its module path, and a
unit of the layer stack (applied functionally, `models.blocks.run_units`) by `layer<i>`
(`layer0/attn/q`, `layer1/mlp`, `layer1` the residual stream after the block, `lm_head` the logits).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import Config, ConfigError, validate
from llmjax.models.families import LMBatch

PARAMETRIZATIONS = ("standard", "mup")


def width_config(cfg: Config, width: int, parametrization: str) -> Config:
    """`cfg` at model width `width`: d_ff keeps its ratio to d_model; heads grow wider (head_dim 0) or more
    numerous (head_dim set, n_kv_heads keeping its ratio); a constant learning rate without warmup (the
    check measures the first steps), a Python loop over the layers, no remat."""
    m = cfg.model
    if width * m.d_ff % m.d_model:
        raise ConfigError(f"--widths: {width} x model.d_ff={m.d_ff} / model.d_model={m.d_model} is not a whole "
                          "MLP width")
    n_heads, n_kv_heads = m.n_heads, m.n_kv_heads
    if m.head_dim:
        if width % m.head_dim or (width // m.head_dim) % (m.n_heads // m.n_kv_heads):
            raise ConfigError(f"--widths: {width} is not a multiple of model.head_dim={m.head_dim} with whole "
                              "key/value groups")
        n = width // m.head_dim
        n_heads, n_kv_heads = n, n // (m.n_heads // m.n_kv_heads)
    # the name is checked against the schema's choices by `validate` (coordinate_check)
    param = cast(Literal["standard", "mup"], parametrization)
    model = dataclasses.replace(m, d_model=width, d_ff=width * m.d_ff // m.d_model, parametrization=param,
                                scan_layers=False, remat="none", n_heads=n_heads, n_kv_heads=n_kv_heads)
    optim = dataclasses.replace(cfg.optim, schedule="constant", warmup_steps=0)
    return dataclasses.replace(cfg, model=model, optim=optim)


def markov_batches(vocab: int, batch: int, seq_len: int, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """`count` batches of a fixed random Markov chain (each token has 4 successors, probabilities .6 .2 .1
    .1), [batch, seq_len] each: learnable structure, identical at every width."""
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab, size=(vocab, 4))
    probs = np.array([0.6, 0.2, 0.1, 0.1])
    out = []
    for _ in range(count):
        seq = np.empty((batch, seq_len + 1), np.int64)
        seq[:, 0] = rng.integers(0, vocab, size=batch)
        for t in range(seq_len):
            seq[:, t + 1] = successors[seq[:, t], rng.choice(4, size=batch, p=probs)]
        ones = np.ones((batch, seq_len), np.int32)
        out.append({"inputs": seq[:, :-1].astype(np.int32), "targets": seq[:, 1:].astype(np.int32),
                    "segment_ids": ones, "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                                                      (batch, seq_len)).copy(),
                    "weights": ones.astype(np.float32)})
    return out


def capture_outputs(fn: Any) -> Any:
    """`fn(*args)` -> (its result, {module output name: array}) for every linen `__call__` made inside,
    nested functional applies included (each root-level apply inside another call is a stack unit)."""

    def wrapped(*args: Any) -> tuple[Any, dict[str, jax.Array]]:
        outputs: dict[str, jax.Array] = {}
        prefixes: list[str] = []
        units = [0]

        def interceptor(next_fun: Any, f_args: Any, f_kwargs: Any, context: Any) -> Any:
            if context.method_name != "__call__":
                return next_fun(*f_args, **f_kwargs)
            path = tuple(context.module.path)
            if path:
                prefix = prefixes[-1] if prefixes else ""
                out = next_fun(*f_args, **f_kwargs)
            else:  # a root module: the model itself (outermost), or a unit of its stack applied inside it
                prefix = f"layer{units[0]}" if prefixes else ""
                units[0] += bool(prefixes)
                prefixes.append(prefix)
                try:
                    out = next_fun(*f_args, **f_kwargs)
                finally:
                    prefixes.pop()
            name = "/".join(p for p in (prefix, *path) if p)
            first = out[0] if isinstance(out, tuple) else out
            if name and isinstance(first, jax.Array) and first.ndim >= 2:
                outputs.setdefault(name, first.astype(jnp.float32))
            return out

        with nn.intercept_methods(interceptor):
            result = fn(*args)
        return result, outputs

    return wrapped


def check_devices(cfg: Config) -> list[jax.Device]:
    """The devices the config's mesh takes: all of them when an axis is -1 (the rest), else the first
    data x fsdp x ... of them."""
    from llmjax.config import mesh_axis_names

    sizes = [getattr(cfg.mesh, n) * getattr(cfg.mesh, f"dcn_{n}") for n in mesh_axis_names()]
    devices = jax.devices()
    return devices if any(s < 0 for s in sizes) else devices[: math.prod(sizes)]


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def check_width(cfg: Config, batches: list[dict[str, np.ndarray]], probe: dict[str, np.ndarray]
                ) -> dict[str, Any]:
    """Train `cfg` on `batches` (one step each) -> {"loss": [per step], "act": {name: [RMS after step t, t = 0
    .. steps]}, "delta": {name: [RMS of the change since step 0]}} on `probe`."""
    from llmjax.train.setup import build_setup

    devices = check_devices(cfg)
    validate(cfg, len(devices))
    setup = build_setup(cfg, devices)
    family, model = setup.family, setup.model
    forward = jax.jit(capture_outputs(lambda p, b: family.logits(model, p, b)[0]))
    step_fn = setup.jit_train_step()
    probe_batch = setup.put_batch(probe)
    state = setup.init_state()
    first = {k: np.asarray(v) for k, v in jax.device_get(forward(state.params, probe_batch)[1]).items()}
    act = {k: [_rms(v)] for k, v in first.items()}
    delta = {k: [0.0] for k in first}
    losses = []
    for arrays in batches:
        state, metrics = step_fn(state, setup.put_batch(arrays))
        losses.append(float(metrics["loss"]))
        now = jax.device_get(forward(state.params, probe_batch)[1])
        for k, v in now.items():
            act[k].append(_rms(np.asarray(v)))
            delta[k].append(_rms(np.asarray(v) - first[k]))
    return {"loss": losses, "act": act, "delta": delta}


def coordinate_check(cfg: Config, widths: Sequence[int], steps: int,
                     parametrizations: Sequence[str] = PARAMETRIZATIONS) -> dict[str, Any]:
    """{"widths", "steps", "base_width", "lr", "results": {parametrization: {width: `check_width`}}}: the same
    data and seed at every width. ConfigError for a width or parametrization the config cannot take."""
    if not widths or any(w <= 0 for w in widths) or steps < 1:
        raise ConfigError(f"mup-check: widths must be positive and steps >= 1 (got {list(widths)}, {steps})")
    configs = {p: {w: width_config(cfg, w, p) for w in widths} for p in parametrizations}
    for p in parametrizations:
        for c in configs[p].values():
            validate(c, len(check_devices(c)))
    from llmjax.models.families import build_family

    if build_family(cfg.model).batch_type is not LMBatch:
        raise ConfigError(f"mup-check: model.family={cfg.model.family} does not train on language-modelling "
                          "batches (inputs/targets); use a decoder or encoder config")
    B, L = cfg.train.batch_size, cfg.data.seq_len
    stream = markov_batches(cfg.model.vocab_size, B, L, steps + 1, cfg.seed)
    probe = stream[-1]  # a batch no step trains on, as many rows as a step's (they shard alike)
    results = {p: {w: check_width(configs[p][w], stream[:steps], probe) for w in widths} for p in parametrizations}
    return {"widths": list(widths), "steps": steps, "base_width": cfg.model.mup_base_width, "lr": cfg.optim.lr,
            "optimizer": cfg.optim.name, "results": results}


def spread(check: dict[str, Any], parametrization: str, kind: str = "act", step: int = -1) -> dict[str, float]:
    """{module output: max / min over the widths of its `kind` RMS after `step`}: ~1 when width-independent."""
    per_width = check["results"][parametrization]
    names = next(iter(per_width.values()))[kind]
    out = {}
    for name in names:
        values = [per_width[w][kind][name][step] for w in check["widths"]]
        lo = min(values)
        out[name] = max(values) / lo if lo > 0 else math.inf
    return out


def growth(check: dict[str, Any], parametrization: str, kind: str = "act", step: int = -1) -> dict[str, float]:
    """{module output: its RMS at the largest width / at the smallest} after `step`."""
    per_width = check["results"][parametrization]
    lo, hi = min(check["widths"]), max(check["widths"])
    names = per_width[lo][kind]
    return {n: per_width[hi][kind][n][step] / max(per_width[lo][kind][n][step], 1e-30) for n in names}
