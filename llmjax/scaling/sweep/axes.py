"""Hyperparameter axes of a sweep spec: `hyperparameters: {config.key: axis, ...}`.

Every point of a sweep (a model shape at a budget or token count) is trained once per
combination of the axes' values (their cross product). An axis is one of::

    optim.lr: [1.0e-3, 3.0e-3, 1.0e-2]      # a grid: the same values at every size
    optim.b2: 0.99                          # one value
    optim.lr:                               # a rule per model size: value * (x / at)^exponent
      rule: {of: d_model, at: 64, value: 3.0e-3, exponent: -1}     # lr ∝ width^-1, 3e-3 at d_model 64
      times: [0.5, 1, 2]                    # optional: a grid of multipliers around the rule
    optim.lr:                               # ... or coef * x^exponent
      rule: {of: non_embedding_params, coef: 0.3, exponent: -0.35}
    optim.lr:                               # a law fitted by `llmjax fit` (fit.json, hyperparameters)
      law: experiments/results/cpu_lr_grid/fit.json                # relative to the cwd, else the spec
      vs: N                                 # N (the fit's --params column) or C (training FLOPs)
      times: [1]
    warmup_fraction: [0.02, 0.05]           # the spec's warmup_fraction, as an axis

Names are dotted config keys (checked against the schema: a name that is not one is an error,
and so are the keys the sweep sets itself: the shape, train.steps, eval.every_steps), plus
`warmup_fraction`. Values for integer keys (train.batch_size, optim.warmup_steps) are rounded.
`of` is one of `OF_CHOICES`: the shape's d_model or n_layers, its parameter counts (`params`
total, `non_embedding_params`, `active_params`), the point's target `tokens` or `flops` (the
IsoFLOP budget). A point's name gets one `_<tag><value>` suffix per axis (`TAGS`), e.g.
`C1e12_d64_L2_lr0.003`; without axes names are as before.

Categorical keys work as grids of strings (a future `model.parametrization: [standard, mup]`);
points that differ only in their hyperparameters share a shape and a step count, which is what
packing several of them into one program needs (`Point.hyperparameters`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmjax.scaling import ScalingError

PARAMS_OF = ("params", "non_embedding_params", "active_params")  # parameter counts a rule may scale with
OF_CHOICES = ("d_model", "n_layers", *PARAMS_OF, "tokens", "flops")
SPEC_AXES = ("warmup_fraction",)  # axes that are spec keys, not config keys
# Keys the sweep sets per point: an axis may not set them.
RESERVED = ("model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.d_ff", "train.steps",
            "eval.every_steps", "train.stop_after")
TAGS = {"optim.lr": "lr", "train.batch_size": "bs", "optim.warmup_steps": "wu", "optim.b1": "b1", "optim.b2": "b2",
        "optim.weight_decay": "wd", "warmup_fraction": "wf", "seed": "seed", "model.parametrization": "param"}
LAW_VS = {"N": "vs_N", "C": "vs_C"}


def config_key_type(key: str) -> Any:
    """The annotated type of the dotted config key `key`, or ScalingError naming it and its section's keys."""
    from llmjax.config import Config

    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(parts[:i]) or "the config root"
            known = ", ".join(sorted(hints))
            raise ScalingError(f"hyperparameter axis '{key}' is not a config key ({where} has: {known})")
        cls = hints[part]
        if i < len(parts) - 1 and not dataclasses.is_dataclass(cls):
            raise ScalingError(f"hyperparameter axis '{key}' is not a config key ({'.'.join(parts[:i + 1])} is a "
                               "value, not a section)")
    if dataclasses.is_dataclass(cls):
        raise ScalingError(f"hyperparameter axis '{key}' is a config section, not a key")
    return cls


@dataclass
class Axis:
    """One hyperparameter axis. `kind`: grid (`values`), rule (`rule`, `times`) or law (`law`, `times`)."""

    key: str
    kind: str
    values: list[Any]
    rule: dict[str, float | str] | None = None
    times: list[float] = dataclasses.field(default_factory=lambda: [1.0])
    integer: bool = False
    source: str | None = None  # a law's fit.json

    @property
    def tag(self) -> str:
        return TAGS.get(self.key, self.key.rsplit(".", 1)[-1])

    def values_at(self, context: dict[str, float]) -> list[Any]:
        """The axis' values at a point whose sizes are `context` (keys `OF_CHOICES`)."""
        if self.kind == "grid":
            out = list(self.values)
        else:
            assert self.rule is not None
            x = float(context[str(self.rule["of"])])
            centre = float(self.rule["coef"]) * x ** float(self.rule["exponent"])
            out = [centre * t for t in self.times]
        if self.integer:  # a grid's values as given (seed 0 is a seed); a rule's rounded, at least 1
            out = [int(round(float(v))) if self.kind == "grid" else max(1, int(round(float(v)))) for v in out]
        return out


def _number_list(value: Any, what: str) -> list[float]:
    values = value if isinstance(value, list) else [value]
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ScalingError(f"sweep spec: {what} must be a number or a list of numbers, got {value!r}") from None
    if not out or any(not math.isfinite(v) or v <= 0 for v in out):
        raise ScalingError(f"sweep spec: {what} must be positive numbers, got {value!r}")
    return out


def _rule(key: str, rule: Any) -> dict[str, float | str]:
    if not isinstance(rule, dict):
        raise ScalingError(f"sweep spec: hyperparameters.{key}.rule must be a mapping {{of, exponent, coef | at + "
                           "value}}")
    unknown = set(rule) - {"of", "exponent", "coef", "at", "value"}
    if unknown:
        raise ScalingError(f"sweep spec: hyperparameters.{key}.rule: unknown keys {sorted(unknown)}")
    of = rule.get("of")
    if of not in OF_CHOICES:
        raise ScalingError(f"sweep spec: hyperparameters.{key}.rule.of must be one of {', '.join(OF_CHOICES)}, "
                           f"got {of!r}")
    if "exponent" not in rule:
        raise ScalingError(f"sweep spec: hyperparameters.{key}.rule needs an 'exponent'")
    try:
        exponent = float(rule["exponent"])
    except (TypeError, ValueError):
        exponent = math.nan
    if not math.isfinite(exponent):
        raise ScalingError(f"sweep spec: hyperparameters.{key}.rule.exponent must be a number, got "
                           f"{rule['exponent']!r}")
    if ("coef" in rule) == ("at" in rule or "value" in rule):
        raise ScalingError(f"sweep spec: hyperparameters.{key}.rule needs either 'coef' or both 'at' and 'value'")
    if "coef" in rule:
        (coef,) = _number_list(rule["coef"], f"hyperparameters.{key}.rule.coef")
    else:
        if "at" not in rule or "value" not in rule:
            raise ScalingError(f"sweep spec: hyperparameters.{key}.rule needs both 'at' and 'value'")
        (at,) = _number_list(rule["at"], f"hyperparameters.{key}.rule.at")
        (value,) = _number_list(rule["value"], f"hyperparameters.{key}.rule.value")
        coef = value / at**exponent
    return {"of": str(of), "coef": float(coef), "exponent": exponent}


def _law(key: str, source: Any, vs: Any, spec_path: Path) -> tuple[dict[str, float | str], str]:
    """The rule of a law fitted by `llmjax fit` (its fit.json's hyperparameters.<key>.vs_N / vs_C)."""
    if vs not in LAW_VS:
        raise ScalingError(f"sweep spec: hyperparameters.{key}.vs must be N or C, got {vs!r}")
    path = Path(str(source))
    if not path.is_file() and not path.is_absolute() and (spec_path.parent / path).is_file():
        path = spec_path.parent / path
    try:
        fit = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ScalingError(f"sweep spec: hyperparameters.{key}.law: cannot read the fit {path}: {e}") from None
    law = ((fit.get("hyperparameters") or {}).get(key) or {}).get(LAW_VS[vs]) or {}
    if "coef" not in law or "exponent" not in law:
        raise ScalingError(f"sweep spec: hyperparameters.{key}.law: {path} has no fitted law "
                           f"hyperparameters.{key}.{LAW_VS[vs]} (fit a sweep that varies {key} first)")
    of = law.get("of", "params")
    if of not in OF_CHOICES:
        raise ScalingError(f"sweep spec: hyperparameters.{key}.law: {path}: the law is against {of!r}, which a "
                           "spec cannot evaluate before training (fit with --flops formula)")
    return {"of": str(of), "coef": float(law["coef"]), "exponent": float(law["exponent"])}, str(path)


def parse_axes(value: Any, spec_path: Path) -> list[Axis]:
    """The `hyperparameters` mapping of a spec -> its axes, every name checked against the config schema."""
    if value is None:
        return []
    if not isinstance(value, dict):
        raise ScalingError(f"sweep spec {spec_path}: 'hyperparameters' must be a mapping of config keys to values, "
                           "lists of values, rules or laws")
    axes = []
    for key, body in value.items():
        key = str(key)
        if key in RESERVED:
            raise ScalingError(f"sweep spec {spec_path}: hyperparameter axis '{key}' is set by the sweep itself "
                               "(sizes, steps, evals)")
        try:
            tp = float if key in SPEC_AXES else config_key_type(key)
        except ScalingError as e:
            raise ScalingError(f"sweep spec {spec_path}: {e}") from None
        integer = tp is int
        if isinstance(body, dict):
            unknown = set(body) - {"values", "rule", "law", "vs", "times"}
            if unknown:
                raise ScalingError(f"sweep spec {spec_path}: hyperparameters.{key}: unknown keys {sorted(unknown)} "
                                   "(known: values, rule, law, vs, times)")
            forms = [f for f in ("values", "rule", "law") if f in body]
            if len(forms) != 1:
                raise ScalingError(f"sweep spec {spec_path}: hyperparameters.{key}: give exactly one of 'values', "
                                   "'rule' or 'law'")
            times = _number_list(body.get("times", 1.0), f"hyperparameters.{key}.times")
            if forms[0] == "values":
                axes.append(Axis(key, "grid", _grid_values(key, body["values"], tp), integer=integer))
            elif forms[0] == "rule":
                axes.append(Axis(key, "rule", [], _rule(key, body["rule"]), times, integer))
            else:
                rule, source = _law(key, body["law"], body.get("vs", "N"), spec_path)
                axes.append(Axis(key, "law", [], rule, times, integer, source))
        else:
            axes.append(Axis(key, "grid", _grid_values(key, body, tp), integer=integer))
    return axes


def _grid_values(key: str, body: Any, tp: Any) -> list[Any]:
    values = body if isinstance(body, list) else [body]
    if not values:
        raise ScalingError(f"sweep spec: hyperparameters.{key}: an empty list of values")
    if tp in (int, float):  # the config's own checks (e.g. optim.lr > 0) run on every point's config
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ScalingError(f"sweep spec: hyperparameters.{key} must be numbers, got {body!r}") from None
        if not all(math.isfinite(v) for v in numbers) or (tp is int and not all(v.is_integer() for v in numbers)):
            raise ScalingError(f"sweep spec: hyperparameters.{key} must be finite {tp.__name__}s, got {body!r}")
        return [int(v) for v in numbers] if tp is int else numbers
    return list(values)


def combinations(axes: list[Axis], context: dict[str, float]) -> list[dict[str, Any]]:
    """Every combination of the axes' values at a point (the cross product, in axis order)."""
    if not axes:
        return [{}]
    per_axis = [ax.values_at(context) for ax in axes]
    return [dict(zip([ax.key for ax in axes], combo, strict=True)) for combo in itertools.product(*per_axis)]


def _format(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"-{value}"
    from llmjax.scaling.sweep.spec import format_number

    return format_number(value)


def name_suffix(axes: list[Axis], hyperparameters: dict[str, Any]) -> str:
    """`_lr0.003_bs16_b2-0.99`: one tag per axis (a one-value axis too: specs that extend another and
    train into its directory keep distinct names), empty without axes."""
    parts = []
    for ax in axes:
        sep = "-" if ax.tag[-1].isdigit() else ""
        parts.append(f"_{ax.tag}{sep}{_format(hyperparameters[ax.key])}")
    return "".join(parts)


def axis_overrides(hyperparameters: dict[str, Any]) -> list[str]:
    """The config overrides of a combination (spec axes such as warmup_fraction are not overrides)."""
    return [f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}" for k, v in hyperparameters.items()
            if k not in SPEC_AXES]


def describe(axes: list[Axis]) -> list[dict[str, Any]]:
    """JSON-able description of the axes (sweep.json)."""
    return [{"key": ax.key, "kind": ax.kind, "values": ax.values, "rule": ax.rule, "times": ax.times,
             "source": ax.source} for ax in axes]
