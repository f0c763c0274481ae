"""Does a checkpoint belong to the model a config describes? Checked before anything is restored.

`eval`, `generate`, `convert to-hf` and a resumed `train` read `WORKDIR/config.yaml` and build
the parameter shapes from it; if that file was edited to another shape, orbax would fail with
pages of tracebacks, or (a partial restore) silently load a different model. `check_matches`
compares first the architecture keys the checkpoint recorded (`data_state["model"]`, written
at save) and then the parameter shapes in the checkpoint's metadata against the config, and
raises ConfigError naming the key: each parameter dimension carries a logical axis name, and
`AXIS_KEYS` maps those names to the config keys that size them.
"""

from __future__ import annotations

from typing import Any

import jax

from llmjax.config import ConfigError, ModelConfig, to_dict

# logical axis name of a parameter dimension -> the config key that sets its size
AXIS_KEYS = {
    "vocab": "model.vocab_size",
    "embed": "model.d_model",
    "norm": "model.d_model",
    "heads": "model.n_heads",
    "kv_heads": "model.n_kv_heads",
    "head_dim": "model.head_dim",
    "mlp": "model.d_ff",
    "layers": "model.n_layers",
    "expert": "model.moe.num_experts",
}
# keys that change the function a checkpoint computes (besides shapes); numerics and layout keys are free
ARCHITECTURE_KEYS = (
    "family", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "norm", "norm_eps",
    "position", "rope_theta", "mlp", "use_bias", "tie_embeddings", "moe.num_experts", "moe.top_k", "moe.every",
    "moe.shared_experts", "moe.score", "moe.renormalize", "qkv_bias", "qk_norm", "norm_scale_offset", "post_norms",
    "scale_embeddings", "attention_scale_dim", "attn_softcap", "logit_softcap", "parametrization",
    "mup_base_width", "mup_base_head_dim",
)


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def architecture_diff(saved: dict[str, Any], model: ModelConfig) -> list[str]:
    """'model.KEY: CHECKPOINT -> CONFIG' for every architecture key that differs from the saved model section."""
    now = to_dict(model)
    return [f"model.{k}: {_lookup(saved, k)!r} in the checkpoint, {_lookup(now, k)!r} in the config"
            for k in ARCHITECTURE_KEYS if _lookup(saved, k) is not None and _lookup(saved, k) != _lookup(now, k)]


def _flat(tree: Any) -> dict[str, Any]:
    return {jax.tree_util.keystr(p, simple=True, separator="/"): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]}


# Parameters an objective adds on top of the model (a reward model's scalar head, `llmjax.post.rl.reward`): a
# reader of the model alone (generate, eval, `train.init_from`) ignores them in a checkpoint.
HEAD_PARAMS = ("score",)


def shape_diff(saved_shapes: dict[str, tuple[int, ...]], expected: Any, logical: Any) -> list[str]:
    """Differences between the checkpoint's parameter shapes and the config's, each naming the key (a head of
    `HEAD_PARAMS` that only the checkpoint has is not one)."""
    want = {k: tuple(v.shape) for k, v in _flat(expected).items()}
    names = {k: tuple(spec) for k, spec in _flat_specs(logical).items()}
    problems = []
    for leaf in sorted(set(want) | set(saved_shapes)):
        if leaf not in saved_shapes:
            problems.append(f"the config has a parameter {leaf} that the checkpoint lacks")
        elif leaf not in want:
            if leaf not in HEAD_PARAMS:
                problems.append(f"the checkpoint has a parameter {leaf} that the config lacks")
        elif saved_shapes[leaf] != want[leaf]:
            problems.append(_dim_problem(leaf, saved_shapes[leaf], want[leaf], names.get(leaf, ())))
    return problems


def _flat_specs(logical: Any) -> dict[str, Any]:
    from jax.sharding import PartitionSpec

    flat = jax.tree_util.tree_flatten_with_path(logical, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): s for p, s in flat}


def _dim_problem(leaf: str, saved: tuple[int, ...], want: tuple[int, ...], axes: tuple[Any, ...]) -> str:
    if len(saved) == len(want):
        for i, (a, b) in enumerate(zip(saved, want, strict=True)):
            if a != b:
                axis = axes[i] if i < len(axes) else None
                key = AXIS_KEYS.get(axis) if isinstance(axis, str) else None
                what = f"{key} (axis '{axis}')" if key else f"dimension {i}"
                return f"{what}: the checkpoint has {a}, the config gives {b} (parameter {leaf}: {saved} vs {want})"
    return f"parameter {leaf}: shape {saved} in the checkpoint, {want} from the config"


def saved_param_shapes(step_dir: Any) -> dict[str, tuple[int, ...]] | None:
    """{parameter path: shape} from a checkpoint's metadata (no array is read), or None if unreadable."""
    import orbax.checkpoint as ocp

    try:
        meta = ocp.PyTreeCheckpointHandler().metadata(step_dir / "state")
        tree = meta.tree if hasattr(meta, "tree") else meta
        return {k: tuple(v.shape) for k, v in _flat(tree["params"]).items()}
    except Exception:  # noqa: BLE001 - an unreadable checkpoint is the restore's business (fallback)
        return None


def saved_model_section(step_dir: Any) -> dict[str, Any] | None:
    """The `model` section recorded with a checkpoint (llmjax writes it into the data item's meta.json,
    `train.data_state`), or None."""
    import json

    from llmjax.train.checkpoint.data_state import LEGACY, META

    data = None
    for name in (META, LEGACY):
        try:
            data = json.loads((step_dir / "data" / name).read_text())
            break
        except Exception:  # noqa: BLE001 - older checkpoints, unreadable files: fall back to the shapes
            continue
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, dict) else None


def check_matches(model: ModelConfig, step_dir: Any, expected_params: Any, logical: Any, where: str) -> None:
    """ConfigError when the checkpoint in `step_dir` was written for another model than `model`.

    `expected_params`: the config's parameter tree (ShapeDtypeStructs); `logical`: its logical
    PartitionSpecs (same structure); `where`: the config's file, for the message."""
    problems = []
    saved = saved_model_section(step_dir)
    if saved is not None:
        problems = architecture_diff(saved, model)
    shapes = saved_param_shapes(step_dir)
    if not problems and shapes is not None:
        problems = shape_diff(shapes, expected_params, logical)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(f"{where} does not match checkpoint {step_dir}: {problems[0]}{more}; restore the "
                          "original value, or use another workdir")
