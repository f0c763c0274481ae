"""Starting a run from another run's parameters (`train.init_from`), and LoRA's pointer to its frozen base.

`train.init_from` names a workdir (a training run, or one `llmjax convert from-hf` wrote); the
parameters of its newest good checkpoint start the run (full fine-tuning: they are trained; LoRA:
they are the frozen base). Its model section must describe the same architecture (checked as for a
resume, `train.compat`). The run records where its base came from in WORKDIR/base.json and in
every checkpoint's data metadata ({"init_from": absolute path or null, "step": k, "seed": s});
a LoRA checkpoint holds only the adapters, so a resume, `llmjax eval`/`generate` and
`convert to-hf` read the base again from that pointer (null: the random base of the seed), and
refuse when its newest checkpoint is no longer the recorded step.
"""

from __future__ import annotations

import json
from typing import Any

import jax

from llmjax.config import Config, ConfigError
from llmjax.storage import as_path

BASE_FILE = "base.json"


def restore_base(cfg: Config, abstract: Any, logical: Any, init_from: str, want_step: int | None = None
                 ) -> tuple[int, Any]:
    """(step, parameters) of `init_from`'s newest good checkpoint, read into `abstract`'s shardings.
    ConfigError when it is not a workdir with checkpoints, holds another model, or (with `want_step`) its
    newest checkpoint is another step than the one recorded."""
    from llmjax.train.checkpoint.compat import check_matches
    from llmjax.train.checkpoint.manager import Checkpointer

    src = as_path(init_from)
    ckpts = src / "checkpoints"
    if not ckpts.is_dir() or not any(c.name.isdigit() for c in ckpts.iterdir()):
        raise ConfigError(f"train.init_from: no checkpoint in {ckpts} (a training run or `llmjax convert from-hf` "
                          "workdir)")
    ckpt = Checkpointer(ckpts, async_save=False, primary=False)
    try:
        step, params = ckpt.restore_params(abstract, check=lambda step_dir: check_matches(
            cfg.model, step_dir, abstract, logical, f"train.init_from={init_from}"))
    finally:
        ckpt.close()
    if want_step is not None and step != want_step:
        raise ConfigError(f"train.init_from: {src} now has checkpoint {step} where this run's base is its checkpoint "
                          f"{want_step} ({BASE_FILE}); the adapters were trained on that one: restore it or start "
                          "another run")
    return step, params


def _newest_step(ckpts: Any) -> Any | None:
    steps = [c for c in ckpts.iterdir() if c.name.isdigit() and c.is_dir()] if ckpts.is_dir() else []
    return max(steps, key=lambda c: int(c.name)) if steps else None


def check_base(cfg: Config, setup: Any, workdir: Any) -> None:
    """What `load_base` will need, checked read-only before the run writes anything (and by `train --check`):
    `train.init_from` names a workdir with a checkpoint of this model (its newest checkpoint's recorded
    architecture and parameter shapes). Skipped when the base is not read (a resumed full fine-tune)."""
    from llmjax.train.checkpoint.compat import check_matches

    if not cfg.train.init_from:
        return
    resuming = _newest_step(as_path(workdir) / "checkpoints") is not None
    if resuming and setup.lora is None:
        return
    ckpts = as_path(cfg.train.init_from) / "checkpoints"
    try:
        newest = _newest_step(ckpts)
    except OSError as e:
        raise ConfigError(f"train.init_from: cannot read {ckpts}: {e.strerror or e}") from None
    if newest is None:
        raise ConfigError(f"train.init_from: no checkpoint in {ckpts} (a training run or `llmjax convert from-hf` "
                          "workdir)")
    base = setup.base_params or setup.params  # what load_base restores (an objective's head starts from the seed)
    check_matches(cfg.model, newest, base.shapes, base.logical, f"train.init_from={cfg.train.init_from}")


def pointer(cfg: Config, step: int | None) -> dict[str, Any]:
    """The base record: where the starting parameters came from."""
    path = str(as_path(cfg.train.init_from).absolute()) if cfg.train.init_from else None
    return {"init_from": path, "step": step, "seed": cfg.seed}


def read_pointer(workdir: Any) -> dict[str, Any] | None:
    f = as_path(workdir) / BASE_FILE
    return json.loads(f.read_text()) if f.exists() else None


def load_base(cfg: Config, setup: Any, workdir: Any, resuming: bool) -> tuple[Any, dict[str, Any]]:
    """(the base parameters or None for the seed's random init, the base record) for a run in `workdir`.
    A resumed run must find the base it recorded; a new one records it (process 0)."""
    recorded = read_pointer(workdir)
    if recorded is not None and recorded.get("init_from") != pointer(cfg, None)["init_from"]:
        raise ConfigError(f"train.init_from={cfg.train.init_from!r}: {workdir} was started from "
                          f"{recorded.get('init_from')!r} ({BASE_FILE}); use the same train.init_from or another "
                          "--workdir")
    base, step = None, None
    if cfg.train.init_from and (not resuming or setup.lora is not None):
        want = recorded.get("step") if (resuming and recorded) else None
        start = setup.base_params  # the model family's parameters (an objective's head starts from the seed)
        step, base = restore_base(cfg, start.placed(setup.mesh, setup.rules), start.logical, cfg.train.init_from,
                                  want)
    elif recorded is not None:
        step = recorded.get("step")
    record = pointer(cfg, step)
    if recorded is None and jax.process_index() == 0 and (cfg.train.init_from or setup.lora is not None):
        (as_path(workdir) / BASE_FILE).write_text(json.dumps(record) + "\n")
    return base, record


def restore_lora_model(cfg: Config, workdir: Any, mesh: Any, rules: Any, abstract: Any, check: Any
                       ) -> tuple[int, Any, Any, Any]:
    """A LoRA workdir's (step, merged parameters, adapters, plan): adapters from its newest checkpoint, the base
    from its pointer, merged as in training (without dropout). `abstract`: the model's `AbstractParams`."""
    import numpy as np

    from llmjax.models.families import build_family
    from llmjax.parallel.rules import tree_shardings, use_sharding
    from llmjax.post.lora import LoraPlan
    from llmjax.train.checkpoint.manager import Checkpointer
    from llmjax.train.setup import _init_params

    plan = LoraPlan(cfg.lora, abstract.shapes, abstract.logical, abstract.roles)
    shardings = tree_shardings(plan.logical(), mesh, rules)
    adapters_abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                     plan.abstract(np.dtype(cfg.model.param_dtype)), shardings)
    ckpt = Checkpointer(as_path(workdir) / "checkpoints", async_save=False, primary=False)
    try:
        step, adapters = ckpt.restore_params(adapters_abstract, check=lambda step_dir: check(
            step_dir, adapters_abstract, plan.logical()))
    finally:
        ckpt.close()
    record = read_pointer(workdir) or {}
    base_shardings = abstract.shardings(mesh, rules)
    if record.get("init_from"):
        _, base = restore_base(cfg, abstract.placed(mesh, rules), abstract.logical, record["init_from"],
                               record.get("step"))
    else:
        family = build_family(cfg.model)
        model = family.module()
        base = jax.jit(lambda r: _init_params(cfg, family, model, jax.random.split(r)[0]),
                       out_shardings=base_shardings)(jax.random.PRNGKey(int(record.get("seed", cfg.seed))))

    def merge(b: Any, a: Any) -> Any:
        with use_sharding(mesh, rules):
            return plan.merge(b, a)

    merged = jax.jit(merge, out_shardings=base_shardings)(base, adapters)
    return step, merged, adapters, plan
