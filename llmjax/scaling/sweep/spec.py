"""Sweep specs: a YAML file -> the list of training runs (`Point`s) of a sweep.

A spec (see `experiments/sweeps/*.yaml`)::

    name: cpu_isoflop                          # default: the file's stem
    base: experiments/configs/default.yaml     # the config every point starts from (relative
                                               # to the working directory, else to the spec)
    overrides: [train.progress=false]          # applied to every point (list or mapping)
    sizes:                                     # the width/depth rule ...
      d_model: [64, 96, 128]
      width_per_layer: 64   # n_layers = max(min_layers, round(d_model / width_per_layer))
      min_layers: 1
      head_dim: 64          # n_heads = n_kv_heads = max(1, d_model // head_dim)
      ff_mult: 4            # d_ff = ff_mult * d_model rounded up to a multiple of ff_multiple_of
      ff_multiple_of: 64
    # shapes: [{d_model: 64, n_layers: 2, n_heads: 1, d_ff: 256}, ...]   # ... or explicit shapes
    isoflop:                                   # either IsoFLOP budgets ...
      budgets: [1e12, 3e12]                    # C, training FLOPs per run
      min_steps: 20                            # points with fewer steps are left out ...
      max_steps: 2000                          # ... and with more (optional): a window of sizes per budget
    # grid: {tokens: [1e6, 4e6]}               # ... or a grid of sizes x token budgets
    hyperparameters:                           # axes: every point at every combination (optional)
      optim.lr: [1.0e-3, 3.0e-3]               # grids, rules per size or fitted laws: see scaling/sweep/axes.py
    warmup_fraction: 0.05                      # optim.warmup_steps = round(fraction * steps)
    cooldown_branches: false                   # true (needs optim.schedule=wsd): see below
    # extends: other.yaml                      # start from another spec's keys; each key given here
                                               # replaces its value whole
    evals: 1                                   # eval.every_steps = ceil(steps / evals)

Tokens. A point trains for `steps = round(D / (batch_size * seq_len))` steps, so it sees
`tokens = steps * batch_size * seq_len` (with a `train.batch_size` axis, its own batch size: D is
the same for every batch size of a point). For an IsoFLOP budget C the target is
`D = C / flops_per_token(model, seq_len)`, the project's own training-FLOPs formula
(`llmjax.train.telemetry.metrics.flops_per_token`: 6 x matmul parameters + the attention term), so that
the run's `flops = flops_per_token * tokens` equals C up to the rounding to whole steps
(at most 0.5 / steps relative, i.e. <= 1% when min_steps >= 50; `llmjax fit` groups rows
whose flops agree within 1%, or by the `budget` column that `sweep collect` writes).

WSD cooldown branches (`cooldown_branches: true`, Hägele et al. 2024). With the warmup-stable-decay
schedule the learning rate before the decay does not depend on the run's length, so the points of
one model shape share a trunk: the longest point's run. Every shorter point (S steps) is a branch
copied from the trunk's checkpoint at step S - round(decay_fraction * S) and trained from there,
so it only pays for its own decay. All points of a shape then use one warmup, warmup_fraction
times the shortest point's steps. A branch's result equals an independent run of that point.
"""

from __future__ import annotations

import math
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmjax.config import Config, ConfigError, load_config, load_yaml
from llmjax.scaling import ScalingError
from llmjax.scaling.sweep.axes import PARAMS_OF, Axis, axis_overrides, combinations, name_suffix, parse_axes
from llmjax.scaling.sweep.replicates import parse_replicates, replicate_name, replicate_overrides, seed_keys

SIZE_RULE_DEFAULTS = {"width_per_layer": 64, "min_layers": 1, "head_dim": 64, "ff_mult": 4, "ff_multiple_of": 64}
SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "d_ff")
SPEC_KEYS = {"name", "base", "overrides", "sizes", "shapes", "isoflop", "grid", "warmup_fraction", "evals",
             "description", "cooldown_branches", "hyperparameters", "extends", "replicates"}


@dataclass
class Point:
    """One training run of a sweep."""

    name: str
    shape: dict[str, int]
    steps: int
    tokens: int
    flops: float  # flops_per_token * tokens
    budget: float | None  # the IsoFLOP budget C it belongs to (None in a grid)
    overrides: list[str] = field(default_factory=list)  # every override, spec-wide ones first
    trunk: str | None = None  # cooldown branches: the point whose run this one branches from ...
    branch_at: int = 0  # ... at this step
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # the axes' values (scaling/sweep/axes.py)
    replicate: int = 0  # which of the spec's `replicates` seeds (scaling/sweep/replicates.py) ...
    replicate_of: str | None = None  # ... of this point (the name its replicates share; None: one replicate)


@dataclass
class Sweep:
    name: str
    base: str | None
    points: list[Point]
    path: Path
    axes: list[Axis] = field(default_factory=list)


def format_number(x: float) -> str:
    """3e13 -> '3e13', 1.5e12 -> '1.5e12', 64 -> '64': short, file-name safe."""
    text = f"{x:.3g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")
    return text


def rule_shape(d_model: int, rule: dict[str, Any]) -> dict[str, int]:
    """The documented width/depth rule (see the module docstring)."""
    r = {**SIZE_RULE_DEFAULTS, **rule}
    d = int(d_model)
    n_layers = max(int(r["min_layers"]), int(round(d / r["width_per_layer"])))
    n_heads = max(1, d // int(r["head_dim"]))
    mult = int(r["ff_multiple_of"])
    d_ff = int(math.ceil(r["ff_mult"] * d / mult) * mult)
    return {"d_model": d, "n_layers": n_layers, "n_heads": n_heads, "d_ff": d_ff}


def _shapes(spec: dict[str, Any]) -> list[dict[str, int]]:
    if ("sizes" in spec) == ("shapes" in spec):
        raise ScalingError("sweep spec: give exactly one of 'sizes' (width/depth rule) or 'shapes' (explicit list)")
    if "sizes" in spec:
        sizes = dict(spec["sizes"] or {})
        widths = sizes.pop("d_model", None)
        unknown = set(sizes) - set(SIZE_RULE_DEFAULTS)
        if unknown:
            raise ScalingError(f"sweep spec: unknown keys in 'sizes': {sorted(unknown)}")
        if not widths or not isinstance(widths, list):
            raise ScalingError("sweep spec: 'sizes.d_model' must be a non-empty list of widths")
        return [rule_shape(int(d), sizes) for d in widths]
    shapes = spec["shapes"]
    if not isinstance(shapes, list) or not shapes:
        raise ScalingError("sweep spec: 'shapes' must be a non-empty list of {d_model, n_layers, n_heads, d_ff}")
    out = []
    for i, s in enumerate(shapes):
        missing = [k for k in SHAPE_KEYS if k not in (s or {})]
        if missing:
            raise ScalingError(f"sweep spec: shapes[{i}] lacks {missing}")
        out.append({k: int(s[k]) for k in SHAPE_KEYS} | {k: int(v) for k, v in s.items() if k not in SHAPE_KEYS})
    return out


def _overrides(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}={v}" for k, v in value.items()]
    if isinstance(value, list):
        return [str(v) for v in value]
    raise ScalingError("sweep spec: 'overrides' must be a list of section.key=value or a mapping")


def _resolve_base(base: Any, spec_path: Path) -> str | None:
    if base is None:
        return None
    p = Path(str(base))
    if p.is_file() or p.is_absolute():
        return str(p)
    alt = spec_path.parent / p
    return str(alt) if alt.is_file() else str(p)


def _numbers(value: Any, what: str) -> list[float]:
    if not isinstance(value, list) or not value:
        raise ScalingError(f"sweep spec: '{what}' must be a non-empty list of numbers")
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        raise ScalingError(f"sweep spec: '{what}' must be a list of numbers, got {value}") from None
    if any(not (0 < v < math.inf) for v in out):  # NaN fails this too
        raise ScalingError(f"sweep spec: '{what}' must be positive and finite, got {value}")
    return out


def shape_overrides(shape: dict[str, int]) -> list[str]:
    out = [f"model.{k}={v}" for k, v in shape.items()]
    if "n_kv_heads" not in shape:
        out.append(f"model.n_kv_heads={shape['n_heads']}")
    return out


def _validate_point(cfg: Config) -> None:
    """The cross-field checks of `llmjax train`, on as many devices as the fixed mesh sizes need."""
    from llmjax.config import mesh_axis_names, validate

    sizes = [getattr(cfg.mesh, n) * getattr(cfg.mesh, f"dcn_{n}") for n in mesh_axis_names()]
    validate(cfg, math.prod(abs(s) for s in sizes))


def read_spec(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A spec's YAML, with `extends: other.yaml` resolved: the other spec's keys (relative to the working
    directory, else to this spec), each replaced whole by this spec's own."""
    spec = load_yaml(path)
    parent = spec.pop("extends", None)
    if parent is None:
        return spec
    parent_path = Path(str(parent))
    if not parent_path.is_file() and not parent_path.is_absolute():
        parent_path = path.parent / parent_path
    if not parent_path.is_file():
        raise ScalingError(f"sweep spec {path}: extends {parent!r}: no such file")
    if parent_path.resolve() in seen:
        raise ScalingError(f"sweep spec {path}: 'extends' loops back to {parent_path}")
    return {**read_spec(parent_path, (*seen, path.resolve())), **spec}


def model_param_counts(cfg: Config) -> dict[str, int]:
    """`total`, `non_embedding` and `active` parameters of `cfg.model` (from abstract shapes: nothing is
    allocated)."""
    from llmjax.train.setup import model_abstract_params
    from llmjax.train.telemetry.metrics import param_counts

    params = model_abstract_params(cfg.model)
    return param_counts(params.shapes, params.logical, cfg.model)


def _context(cfg: Config, shape: dict[str, int], tokens: float, flops: float, axes: list[Axis]) -> dict[str, float]:
    """What an axis rule may scale with (`axes.OF_CHOICES`); parameter counts only when a rule needs them."""
    out = {"d_model": float(shape["d_model"]), "n_layers": float(shape["n_layers"]), "tokens": tokens,
           "flops": flops}
    if any(ax.rule and ax.rule["of"] in PARAMS_OF for ax in axes):
        counts = model_param_counts(cfg)
        out.update(params=counts["total"], non_embedding_params=counts["non_embedding"],
                   active_params=counts["active"])
    return out


MAX_POINTS = 10_000  # a spec that expands to more is refused before its points are validated one by one


def sweep_name(value: Any, path: Path) -> str:
    """The spec's `name` (default: the file's stem): one plain path component, since the sweep's directory is
    runs/sweeps/<name> (ScalingError for '../x', 'a/b', '.', an absolute path)."""
    name = path.stem if value is None or value == "" else value
    if not isinstance(name, (str, int, float)) or isinstance(name, bool):
        raise ScalingError(f"sweep spec {path}: 'name' must be a string, got {name!r}")
    name = str(name)
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name or not name.strip():
        raise ScalingError(f"sweep spec {path}: name {name!r} must be a plain directory name (no '/', not '..'): "
                           "the sweep is written to runs/sweeps/<name>")
    return name


def _count_points(spec: dict[str, Any], shapes: list[dict[str, int]], axes: list[Axis], path: Path,
                  replicates: int = 1) -> None:
    """Refuse a spec whose grid expands to more than MAX_POINTS points (counting the axes with fixed values
    and the replicates)."""
    targets = (spec.get("isoflop") or {}).get("budgets") if "isoflop" in spec else (spec.get("grid") or {}).get(
        "tokens")
    n = len(shapes) * (len(targets) if isinstance(targets, list) else 1) * replicates
    for ax in axes:
        n *= max(1, len(ax.values) if ax.kind == "grid" else len(ax.times))
    if n > MAX_POINTS:
        raise ScalingError(f"sweep spec {path}: {n:,} points (shapes x budgets x hyperparameter values x "
                           f"replicates), more than {MAX_POINTS:,}; split it into smaller sweeps")
    if n > 1000:  # about a millisecond each: say so rather than print nothing for seconds
        print(f"sweep spec {path}: validating up to {n:,} points ...", file=sys.stderr, flush=True)


def load_sweep(path: str | Path) -> Sweep:
    """Read and expand a sweep spec. Every point's config is validated (ConfigError otherwise)."""
    from llmjax.train.telemetry.metrics import flops_per_token  # imports jax: only when a spec is expanded

    path = Path(path)
    spec = read_spec(path)
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ScalingError(f"sweep spec {path}: unknown keys {sorted(unknown)} (known: {sorted(SPEC_KEYS)})")
    if ("isoflop" in spec) == ("grid" in spec):
        raise ScalingError(f"sweep spec {path}: give exactly one of 'isoflop' (budgets) or 'grid' (tokens)")
    name = sweep_name(spec.get("name"), path)
    base = _resolve_base(spec.get("base"), path)
    common = _overrides(spec.get("overrides"))
    warmup_fraction = float(spec.get("warmup_fraction", 0.05))
    evals = max(1, int(spec.get("evals", 1)))
    shapes = _shapes(spec)
    axes = parse_axes(spec.get("hyperparameters"), path)
    replicates = parse_replicates(spec.get("replicates"), str(path))
    _count_points(spec, shapes, axes, path, replicates)

    def make(shape: dict[str, int], target_tokens: float, budget: float | None, name_: str) -> list[Point]:
        """The point of `shape` at `target_tokens`, once per combination of the hyperparameter axes."""
        shape_cfg = load_config(base, common + shape_overrides(shape), check=False)  # the point is validated below
        target_flops = budget or flops_per_token(shape_cfg.model, shape_cfg.data.seq_len) * target_tokens
        out = []
        for hp in combinations(axes, _context(shape_cfg, shape, target_tokens, target_flops, axes)):
            cfg = load_config(base, common + shape_overrides(shape) + axis_overrides(hp), check=False)
            row_tokens = cfg.train.batch_size * cfg.data.seq_len
            steps = max(1, int(round(target_tokens / row_tokens)))
            fraction = float(hp.get("warmup_fraction", warmup_fraction))
            per_point = [f"train.steps={steps}", f"optim.warmup_steps={max(1, round(fraction * steps))}",
                         f"eval.every_steps={math.ceil(steps / evals)}"]
            # the axes come last: an optim.warmup_steps axis wins over warmup_fraction
            overrides = common + shape_overrides(shape) + per_point + axis_overrides(hp)
            cfg = load_config(base, overrides)
            _validate_point(cfg)
            tokens = steps * row_tokens
            fpt = flops_per_token(cfg.model, cfg.data.seq_len)
            point_name = name_ + name_suffix(axes, hp)
            if replicates > 1 and set(hp) & set(seed_keys(cfg)):
                raise ScalingError(f"sweep spec {path}: 'replicates' and a seed axis in 'hyperparameters' "
                                   f"({sorted(set(hp) & set(seed_keys(cfg)))}): give one or the other")
            for r in range(replicates):
                seeds = replicate_overrides(cfg, r)
                if r:
                    load_config(base, overrides + seeds)  # the raised seeds are checked like any value
                out.append(Point(replicate_name(point_name, r), shape, steps, tokens, fpt * tokens,
                                 budget, overrides + seeds, hyperparameters=hp, replicate=r,
                                 replicate_of=point_name if replicates > 1 else None))
        return out

    points: list[Point] = []
    if "isoflop" in spec:
        iso = dict(spec["isoflop"] or {})
        budgets = _numbers(iso.get("budgets"), "isoflop.budgets")
        min_steps = int(iso.get("min_steps", 1))
        max_steps = int(iso.get("max_steps", 0)) or None
        unknown = set(iso) - {"budgets", "min_steps", "max_steps"}
        if unknown:
            raise ScalingError(f"sweep spec {path}: unknown keys in 'isoflop': {sorted(unknown)}")
        for c in budgets:
            for shape in shapes:
                cfg = load_config(base, common + shape_overrides(shape), check=False)
                d = c / flops_per_token(cfg.model, cfg.data.seq_len)
                for point in make(shape, d, c, f"C{format_number(c)}_d{shape['d_model']}_L{shape['n_layers']}"):
                    if point.steps >= min_steps and (max_steps is None or point.steps <= max_steps):
                        points.append(point)
    else:
        grid = dict(spec["grid"] or {})
        tokens = _numbers(grid.get("tokens"), "grid.tokens")
        for shape in shapes:
            for d in tokens:
                points += make(shape, d, None, f"d{shape['d_model']}_L{shape['n_layers']}_T{format_number(d)}")
    if spec.get("cooldown_branches"):
        _make_branches(points, base, warmup_fraction, path)
    if not points:
        raise ScalingError(f"sweep spec {path}: no points (every point outside isoflop.min_steps..max_steps?)")
    names = [p.name for p in points]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ScalingError(f"sweep spec {path}: two points share a name: {dupes} (repeated sizes or budgets?)")
    return Sweep(name, base, points, path, axes)


def _make_branches(points: list[Point], base: str | None, warmup_fraction: float, path: Path) -> None:
    """Turn every shape's shorter points into cooldown branches of its longest point (module docstring).
    Points with different hyperparameters, or different replicates, have different trunks."""
    groups: dict[tuple, list[Point]] = {}
    for p in points:
        key = (tuple(sorted(p.shape.items())), tuple(sorted((k, str(v)) for k, v in p.hyperparameters.items())),
               p.replicate)
        groups.setdefault(key, []).append(p)
    for group in groups.values():
        group.sort(key=lambda p: p.steps)
        fraction = float(group[0].hyperparameters.get("warmup_fraction", warmup_fraction))
        warmup = max(1, round(fraction * group[0].steps))
        for p in group:
            if "optim.warmup_steps" not in p.hyperparameters:
                p.overrides = [o for o in p.overrides if not o.startswith("optim.warmup_steps=")]
                p.overrides.append(f"optim.warmup_steps={warmup}")
            cfg = load_config(base, p.overrides)
            if cfg.optim.schedule != "wsd":
                raise ScalingError(f"sweep spec {path}: cooldown_branches needs optim.schedule=wsd, "
                                   f"got {cfg.optim.schedule!r} for {p.name}")
            _validate_point(cfg)
            if p is not group[-1]:
                p.trunk = group[-1].name
                p.branch_at = p.steps - int(round(cfg.optim.decay_fraction * p.steps))
                if p.branch_at < warmup:
                    raise ScalingError(f"sweep spec {path}: {p.name} would branch at step {p.branch_at}, inside "
                                       f"the warmup ({warmup} steps); lower warmup_fraction or drop the point")


def point_config(sweep: Sweep, point: Point) -> Config:
    return load_config(sweep.base, point.overrides)


def launch_command(sweep: Sweep, point: Point, workdir: str | Path, prefix: str = "") -> str:
    """The shell command that trains `point` in `workdir/point.name` (one line)."""
    args = ["llmjax", "train"]
    if sweep.base:
        args += ["--config", sweep.base]
    args += ["--workdir", str(Path(workdir) / point.name), *point.overrides]
    cmd = shlex.join(args)
    return f"{prefix.strip()} {cmd}" if prefix.strip() else cmd


__all__ = ["ConfigError", "Point", "Sweep", "launch_command", "load_sweep", "model_param_counts", "point_config",
           "rule_shape"]
