"""The run directory: creating it, saving and comparing its config.yaml.

A workdir is a local path or an object-store URL (`gs://bucket/run`, through
`storage.as_path`). `prepare(cfg, workdir)` refuses a workdir that holds another model's
checkpoints (ConfigError), creates it, and writes the resolved config; a storage problem
(read-only, full, forbidden) raises StorageError naming the path.
"""

from __future__ import annotations

from typing import Any

import yaml

from llmjax.config import Config, ConfigError, deep_merge, parse_yaml, to_dict
from llmjax.storage import StorageError, as_path, check_backend, reraise_storage, writable_ancestor

# Keys of a saved config that must match to resume from its checkpoints.
RESUME_KEYS = ("model", "optim.name")


def _lookup(tree: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def read_saved_config(workdir: Any) -> dict[str, Any] | None:
    """The workdir's config.yaml as a dict (None when absent). ConfigError when it cannot be parsed."""
    path = as_path(workdir) / "config.yaml"
    if not path.exists():
        return None
    try:
        data = parse_yaml(path.read_bytes().decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: cannot read the saved config ({type(e).__name__}); restore it or use another "
                          "--workdir") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the saved config is not a mapping; restore it or use another --workdir")
    return data


def check_resumable(cfg: Config, workdir: Any) -> None:
    """Refuse to resume a workdir whose checkpoints belong to a different model or optimizer."""
    workdir = as_path(workdir)
    if not (workdir / "checkpoints").exists():
        return
    saved = read_saved_config(workdir)
    if saved is None:
        return
    # Keys the saved file lacks (added to the config since, e.g. model.moe) take today's defaults,
    # which by convention keep the old behaviour.
    saved, now = deep_merge(to_dict(Config()), saved), to_dict(cfg)
    for key in RESUME_KEYS:
        a, b = _lookup(saved, key), _lookup(now, key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs = [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}"
                     for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            diffs = [f"{key}: {a!r} -> {b!r}"] if a != b else []
        if diffs:
            raise ConfigError(
                f"{workdir} holds checkpoints of a different configuration ({'; '.join(diffs)}); "
                "use another --workdir, or restore the original values"
            )


def check_writable(workdir: Any) -> None:
    """ConfigError when `workdir` is a file; StorageError when it cannot be created or written (local paths;
    URLs are not probed)."""
    check_backend(workdir)
    workdir = as_path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir: {workdir} exists and is not a directory")
    problem = writable_ancestor(workdir)
    if problem is not None:
        raise StorageError("create or write the workdir", workdir, problem)


def create(workdir: Any) -> Any:
    """mkdir -p `workdir`; returns it as an epath. StorageError when the storage refuses."""
    workdir = as_path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir: {workdir} exists and is not a directory")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reraise_storage(e, "create the workdir", workdir)
        raise StorageError("create the workdir", workdir, e.strerror or str(e)) from e
    return workdir


def save_config(cfg: Config, workdir: Any) -> None:
    """Write the resolved config to `workdir/config.yaml` (via a temporary file, so it is never half written)."""
    path = as_path(workdir) / "config.yaml"
    tmp = path.parent / ".config.yaml.tmp"
    try:
        tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        tmp.replace(path)
    except OSError as e:
        reraise_storage(e, "write the config to", path)
        raise
