"""Building a `Config`: YAML files, dotted `section.key=value` overrides, type checks, validation at load.

Every key and type is checked against the schema (`config.schema`), then the rules that depend on
the config alone (`config.rules.validate.validate_config`); a problem raises `ConfigError` naming the
key, which the CLI turns into exit status 2.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import yaml

from llmjax.config.family_spec import model_config_class
from llmjax.config.rules.validate import validate_config
from llmjax.config.schema import Config, ModelConfig
from llmjax.errors import ConfigError

# Presets ship inside the package (so a wheel install finds them); experiments/configs links here.
PRESETS_DIR = Path(str(resources.files("llmjax") / "configs"))
DEFAULT_CONFIG = PRESETS_DIR / "default.yaml"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; allow int->float. Raise naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):  # e.g. the items of data.sources
        return _build(tp, value if value is not None else {}, f"{key}.")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float) and isinstance(value, str):
        value = _parse_number(value, key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):  # nan/inf would pass every range check below
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return number
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _parse_number(text: str, key: str) -> float | int:
    """YAML 1.1 reads `3e-4` (no dot) as a string; accept any numeric spelling."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{key}: expected a number, got {text!r}") from None


T = TypeVar("T")


def _build(cls: type[T], data: dict[str, Any], prefix: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    # the family decides which keys the model section has (a subclass of ModelConfig)
    built: Any = model_config_class(data.get("family", "decoder")) if cls is ModelConfig else cls
    hints = typing.get_type_hints(built)
    fields = {f.name: f for f in dataclasses.fields(built)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = [n for n in fields if n.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cast(T, built(**kwargs))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "rules":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a mapping with the same key twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges are not duplicates
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {seen[key]})", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: the base class reports it
                break
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """An integer, or a YAML error at its line for one too long to convert (Python refuses integer strings
        of more than `sys.get_int_max_str_digits()` digits with a ValueError)."""
        try:
            return super().construct_yaml_int(node)
        except ValueError:
            digits = sum(c.isdigit() for c in str(node.value))
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {digits:,} digits is too long (at most {sys.get_int_max_str_digits():,})",
                node.start_mark) from None


UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", UniqueKeyLoader.construct_yaml_int)


def parse_yaml(text: str) -> Any:
    """`yaml.safe_load` that rejects duplicate keys (yaml.YAMLError)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = parse_yaml(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': cannot parse the value: {_one_line(e)}") from None
    except RecursionError:
        raise ConfigError(f"override '{item}': the value is nested too deeply") from None
    return key.split("."), value


def load_yaml(path: str | Path) -> dict[str, Any]:
    if not str(path).strip():
        raise ConfigError("--config: empty path")
    if "://" in str(path):  # gs://... : through etils.epath (imported only for URLs)
        from llmjax.storage import as_path

        file: Any = as_path(path)  # an etils.epath.Path
    else:
        file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file not found: {file}")
    try:
        data = parse_yaml(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {file}: invalid YAML: {_one_line(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except RecursionError:
        raise ConfigError(f"config file {path}: nested too deeply") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read: {e.strerror or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def _one_line(e: yaml.YAMLError) -> str:
    """A YAML error as one line: the problem and where ('line 3, column 5')."""
    problem = getattr(e, "problem", None) or getattr(e, "context", None)
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if problem is None:
        return " ".join(str(e).split())
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{problem}{where}"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                check: bool = True) -> Config:
    """Load `path` (default: experiments/configs/default.yaml), apply overrides, check types, then every rule
    that depends on the config alone (`validate_config`). ConfigError naming the key.

    `check=False` skips the rules, for a config that is a part to be completed in code and validated then
    (`validate`; e.g. a base whose model section comes from a Hugging Face config). The rules that need the
    device count are checked by `validate_mesh` (the trainer's preflight) or `validate`.
    """
    data = load_yaml(path if path is not None else DEFAULT_CONFIG)
    model_overrides: list[tuple[list[str], Any]] = []
    for item in overrides:
        keys, value = parse_override(item)
        if keys[0] == "model":
            model_overrides.append((keys, value))
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    data = _inherit_init_from(data, data.get("model") if path is not None else None, model_overrides)
    cfg = _build(Config, data, "")
    if check:
        validate_config(cfg)
    return cfg


INIT_FROM_CONFIG = "config.yaml"  # a workdir's resolved config (`llmjax.train.workdir.save_config`)
INIT_FROM_TOKENIZER = "tokenizer"  # a workdir's tokenizer copy (`llmjax.data.tokenizers.run_tokenizer`)


def _inherit_init_from(data: dict[str, Any], file_model: Any, model_overrides: list[tuple[list[str], Any]]
                       ) -> dict[str, Any]:
    """With `train.init_from=WORKDIR`: the model section of WORKDIR/config.yaml (then the model keys of an
    explicit --config file and of the overrides on top), and `data.tokenizer` defaulting to WORKDIR/tokenizer/
    (the tokenizer and its chat template), before anything is validated against them. A WORKDIR without a
    config.yaml leaves `data` as it is (the trainer then reports the missing checkpoint)."""
    train, section = data.get("train"), data.get("data")
    init = train.get("init_from") if isinstance(train, dict) else None
    if not isinstance(init, str) or not init.strip():
        return data
    root: Any
    if "://" in init:
        from llmjax.storage import as_path

        root = as_path(init)
    else:
        root = Path(init).expanduser()
    if not (root / INIT_FROM_CONFIG).is_file():
        return data
    saved = load_yaml(root / INIT_FROM_CONFIG)
    model = saved.get("model")
    if not isinstance(model, dict):
        raise ConfigError(f"train.init_from: {root / INIT_FROM_CONFIG} has no model section")
    if isinstance(file_model, dict):
        model = deep_merge(model, file_model)
    tree: dict[str, Any] = {"model": model}
    for keys, value in model_overrides:  # as load_config applies them
        node = tree
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    out = dict(data, model=tree["model"])
    if (section is None or isinstance(section, dict)) and not (section or {}).get("tokenizer") \
            and (root / INIT_FROM_TOKENIZER).is_dir():
        out["data"] = dict(section or {}, tokenizer=str(root / INIT_FROM_TOKENIZER))
    return out


def from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


