"""Packed training: K runs of the same shape, different hyperparameters or seeds, in one program.

`train_packed(configs, workdirs)` trains K configs that differ only in `PACKABLE` keys (the seed,
the learning rate, Adam's/Lion's b1, b2 and weight decay) together: the real train step
(`train.step.make_train_step`) is mapped over a leading point axis of the train state, of the batch
and of the hyperparameters that differ (they enter the optimizer as traced values; the others
stay Python constants, as in a lone run). Two ways to map (`PACK_MODES`): `vmap` batches the K
points into every operation (wide matmuls that fill an accelerator); `map` (`lax.map`) runs the
same per-point step K times in one loop of the program, every operation with the lone run's
shapes (on XLA:CPU the batched matmuls of `vmap` measured 3x slower than K lone steps, so `auto`
picks `map` on CPU and `vmap` elsewhere). Either way the start-up, data set-up and compilation
are paid once per pack. The point axis is not sharded:
every point's arrays keep the lone run's sharding on the mesh behind it, so a pack runs under
every layout a lone run does.

Each point reads its own data stream (its config's `DataModule`, positioned exactly as a lone
run's), and writes its own run directory exactly as a lone `llmjax train` would: config.yaml,
the tokenizer copy, metrics.jsonl (a train record per step, eval records at step 0, every
`eval.every_steps` and at the end), run_info.json and orbax checkpoints (model state and data
iterator) at the same steps, so a packed point resumes alone and vice versa. Differences, by
design: `tokens_per_s` and `step_time` are a point's share of the pack's wall time (its tokens
over the step's time, the pack's throughput is K times that), `mfu` is the whole program's; XLA's
FLOPs in run_info.json are the packed step's divided by K; no samples are printed at the end. A
point whose loss turns non-finite stops (exit status 1, nothing more written for it) while the
others go on. Not supported (ConfigError): several processes, in-loop tasks (`eval.tasks`), W&B,
profiling; points resuming from different steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from llmjax.config import Config, ConfigError, to_dict
from llmjax.models import mup
from llmjax.parallel.mesh import replicated
from llmjax.train.setup import Setup, build_setup
from llmjax.train.step import TrainState, make_train_step

PACK_MODES = ("auto", "vmap", "map")  # auto: map on CPU (XLA:CPU's batched matmuls are slow), else vmap
PACKABLE = ("seed", "optim.lr", "optim.b1", "optim.b2", "optim.weight_decay")
# optimizers whose b1 / b2 / weight_decay may differ within a pack (elsewhere they select code paths)
TRACED_OPTIM = {"optim.lr": ("adamw", "adafactor", "lion", "sgd"), "optim.b1": ("adamw", "lion"),
                "optim.b2": ("adamw", "lion"), "optim.weight_decay": ("adamw", "lion")}
IGNORED = ("train.progress",)  # presentation only


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _may_differ(key: str, optimizer: str) -> bool:
    return key in PACKABLE and optimizer in TRACED_OPTIM.get(key, (optimizer,))


def pack_key(cfg: Config) -> tuple:
    """What must be equal for two configs to share a packed program: everything but the `PACKABLE` keys
    that may differ under the config's optimizer."""
    flat = _flat(to_dict(cfg))
    return tuple(sorted((k, repr(v)) for k, v in flat.items()
                        if not _may_differ(k, cfg.optim.name) and k not in IGNORED))


def differing(configs: Sequence[Config]) -> dict[str, list[Any]]:
    """{dotted key: the values of each config} for every key on which the configs differ."""
    flats = [_flat(to_dict(c)) for c in configs]
    keys = sorted(set().union(*flats))
    return {k: [f.get(k) for f in flats] for k in keys if len({repr(f.get(k)) for f in flats}) > 1}


def check_packable(configs: Sequence[Config], names: Sequence[str] | None = None) -> list[str]:
    """The `PACKABLE` keys on which the configs differ; ConfigError naming the first other key that differs
    (points of different shapes, step counts, ...) or a setting packing does not support."""
    names = list(names or [f"point {i}" for i in range(len(configs))])
    if not configs:
        raise ConfigError("--pack: no points to pack")
    diff = differing(configs)
    for key, values in diff.items():
        if key in IGNORED:
            continue
        shown = ", ".join(f"{n}: {v!r}" for n, v in zip(names, values, strict=True))
        if key not in PACKABLE:
            raise ConfigError(f"--pack: points of a pack must differ only in {', '.join(PACKABLE)}; {key} differs "
                              f"({shown})")
        if not _may_differ(key, configs[0].optim.name):
            raise ConfigError(f"--pack: {key} differs ({shown}), which optim.name={configs[0].optim.name} does not "
                              "allow in one program")
    c = configs[0]
    if jax.process_count() > 1:
        raise ConfigError("--pack: packed training runs in one process")
    if c.eval.tasks or c.log.wandb.project is not None or c.train.profile_steps:
        raise ConfigError("--pack: eval.tasks, log.wandb.project and train.profile_steps are not supported in a pack")
    if c.train.objective != "lm" or c.lora.rank > 0 or c.train.init_from is not None:
        raise ConfigError(f"--pack: train.objective={c.train.objective}, lora.rank={c.lora.rank}, train.init_from="
                          f"{c.train.init_from}: a pack trains from scratch on the lm objective without LoRA")
    return [k for k in diff if k in PACKABLE]


def _stacked(sharding: Any) -> NamedSharding:
    """A lone array's sharding with an unsharded leading point axis."""
    return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))


class PackedProgram:
    """The compiled pieces of a pack: init, train step, slicing one point out and stacking points back.

    Shapes: every state leaf [K, ...lone shape], batch fields [K, B, L], hyperparameters [K]."""

    def __init__(self, setup: Setup, configs: Sequence[Config], traced: Sequence[str], mode: str = "auto") -> None:
        if mode not in PACK_MODES:
            raise ConfigError(f"--pack-mode: {mode!r} is not one of {', '.join(PACK_MODES)}")
        platform = setup.mesh.devices.flat[0].platform
        self.mode = ("map" if platform == "cpu" else "vmap") if mode == "auto" else mode
        self.setup, self.configs, self.k = setup, list(configs), len(configs)
        self.traced = [k for k in traced if k != "seed"]
        self.state_shardings = jax.tree.map(_stacked, setup.state_shardings)
        self.batch_sharding = _stacked(setup.batch_sharding)
        self.hparams = {k.split(".", 1)[1]: jnp.asarray([_lookup(c, k) for c in configs], jnp.float32)
                        for k in self.traced}

    def init(self) -> TrainState:
        """Each point's fresh state from its own seed, stacked (the values of its lone `Setup.init_state`)."""
        keys = jnp.stack([jax.random.PRNGKey(c.seed) for c in self.configs])
        return jax.jit(jax.vmap(self.setup._init_fn), out_shardings=self.state_shardings)(keys)

    def train_step(self) -> Any:
        """Jitted (stacked state, stacked batch, hyperparameters) -> (stacked state, metrics [K] each)."""
        setup, cfg = self.setup, self.configs[0]

        def point_step(state: TrainState, batch: Any, hp: dict[str, jax.Array]) -> tuple[TrainState, Any]:
            from llmjax.train.optim import make_optimizer

            optim = dataclasses.replace(cfg.optim, **cast(dict[str, Any], hp))  # traced values for the floats
            tx = make_optimizer(optim, cfg.train.steps, setup.params.roles,
                                mup.lr_multipliers(cfg.model, setup.params.roles))
            step = make_train_step(setup.family, setup.model, tx, cfg.train.z_loss, cfg.optim.grad_accum_steps)
            return step(state, batch)

        def mapped(state: TrainState, batch: Any, hp: dict[str, jax.Array]) -> tuple[TrainState, Any]:
            return jax.lax.map(lambda args: point_step(*args), (state, batch, hp))

        packed = jax.vmap(point_step) if self.mode == "vmap" else mapped
        repl = replicated(setup.mesh)
        return jax.jit(setup._in_mesh_context(packed),
                       in_shardings=(self.state_shardings, self.batch_sharding, repl),
                       out_shardings=(self.state_shardings, repl), donate_argnums=(0,))

    def take(self) -> Any:
        """Jitted (stacked state, i) -> point i's state, sharded as a lone run's (for saving, evaluating)."""
        return jax.jit(lambda s, i: jax.tree.map(lambda x: x[i], s), out_shardings=self.setup.state_shardings)

    def stack(self, states: Sequence[TrainState]) -> TrainState:
        """Lone states (e.g. restored checkpoints) -> the stacked state."""
        return jax.jit(lambda *s: jax.tree.map(lambda *x: jnp.stack(x), *s),
                       out_shardings=self.state_shardings)(*states)

    def put_batch(self, locals_: Sequence[dict[str, np.ndarray]]) -> Any:
        """Each point's batch (numpy, the family's field names) -> the stacked typed batch on the mesh."""
        from llmjax.models.families import batch_from_dict

        arrays = {k: jax.device_put(np.stack([b[k] for b in locals_]), self.batch_sharding) for k in locals_[0]}
        return batch_from_dict(self.setup.family.batch_type, arrays)


def _lookup(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


class _PerPoint:
    """A compiled packed step seen as one point's program: XLA's FLOPs divided by K (for run_info.json)."""

    def __init__(self, compiled: Any, k: int) -> None:
        self.compiled, self.k = compiled, k

    def cost_analysis(self) -> Any:
        from llmjax.train.telemetry.run_info import xla_flops

        flops = xla_flops(self.compiled)
        return None if flops is None else {"flops": flops / self.k}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.compiled, name)


def build_pack(configs: Sequence[Config], devices: Sequence[jax.Device] | None = None,
               names: Sequence[str] | None = None, mode: str = "auto") -> tuple[Setup, PackedProgram]:
    """Check the configs can share a program (`check_packable`, naming them `names`) and build the first
    one's setup (on `devices`, default all) and the packed program (`mode`: `PACK_MODES`)."""
    if mode not in PACK_MODES:
        raise ConfigError(f"--pack-mode: {mode!r} is not one of {', '.join(PACK_MODES)}")
    traced = check_packable(configs, names)
    setup = build_setup(configs[0], devices)
    return setup, PackedProgram(setup, configs, traced, mode)
