"""Put a config on a mesh: family, model, optimizer, shardings, sharded init, jitted steps.

`Setup` is the one place where the pure pieces (the model family, `train.step`, the optimizer)
meet the mesh. Parameters are created under `jit` with output shardings computed from
`eval_shape` and the logical rules (`abstract_params`), so no host ever materialises the
whole model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from llmjax.config import Config, ModelConfig
from llmjax.models import mup
from llmjax.models.families import ModelFamily, batch_from_dict, build_family
from llmjax.models.roles import boxed_roles, param_roles
from llmjax.parallel.mesh import build_mesh, replicated
from llmjax.parallel.pipeline import Schedule
from llmjax.parallel.rules import Rules, logical_to_spec, make_rules, tree_shardings, use_sharding
from llmjax.train.optim import make_optimizer, opt_state_shardings
from llmjax.train.step import Batch, TrainState, batch_gradients, make_eval_step, make_train_step

BATCH_AXES = ("act_batch", "act_length")


@dataclasses.dataclass(frozen=True)
class AbstractParams:
    """A model's parameters without values: shapes/dtypes, logical PartitionSpecs and roles (same trees)."""

    shapes: Any  # jax.ShapeDtypeStruct leaves
    logical: Any  # PartitionSpec of logical names per leaf
    roles: Any  # `llmjax.models.roles` role per leaf

    def shardings(self, mesh: Mesh, rules: Rules) -> Any:
        """NamedShardings of every parameter under `rules` on `mesh`."""
        return tree_shardings(self.logical, mesh, rules)

    def placed(self, mesh: Mesh, rules: Rules) -> Any:
        """ShapeDtypeStructs carrying their shardings (for restoring or lowering without values)."""
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), self.shapes,
                            self.shardings(mesh, rules))


def abstract_params(family: ModelFamily, seq_len: int | None = None) -> AbstractParams:
    """Shapes, logical axes and roles of `family.module()`'s parameters, from `jax.eval_shape` (no values)."""
    model = family.module()
    args = family.init_args(seq_len or family.cfg.max_seq_len)
    boxed = jax.eval_shape(lambda r: model.init(r, *args)["params"], jax.random.PRNGKey(0))
    logical = nn.get_partition_spec(boxed)
    return AbstractParams(nn.meta.unbox(boxed), logical, param_roles(logical))


def model_abstract_params(cfg: ModelConfig) -> AbstractParams:
    """`abstract_params` of the family a model config names."""
    return abstract_params(build_family(cfg))


@dataclasses.dataclass
class Setup:
    """Family, model, optimizer and shardings for one config on one mesh."""

    cfg: Config
    mesh: Mesh
    rules: Rules
    family: ModelFamily
    model: nn.Module
    tx: optax.GradientTransformation
    abstract_state: TrainState  # ShapeDtypeStructs carrying their shardings
    state_shardings: TrainState
    batch_sharding: NamedSharding
    params: AbstractParams

    @property
    def param_logical_specs(self) -> Any:
        return self.params.logical

    @property
    def schedule(self) -> Schedule | None:
        """The pipeline schedule of the training forward pass (None: unpipelined)."""
        return getattr(self.model, "pipeline", None)

    @property
    def decode_model(self) -> nn.Module:
        """The model without a pipeline schedule (same parameters), for decoding."""
        return self.family.module()

    def init_state(self) -> TrainState:
        """Fresh, sharded train state from `cfg.seed` (same values whatever the mesh)."""
        init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
        return init(jax.random.PRNGKey(self.cfg.seed))

    def _init_fn(self, rng: jax.Array) -> TrainState:
        return _fresh_state(self.cfg, self.family, self.model, self.tx, rng)

    def _in_mesh_context(self, fn: Callable) -> Callable:
        def wrapped(*args):
            with use_sharding(self.mesh, self.rules):
                return fn(*args)

        return wrapped

    def jit_train_step(self) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
        """Jitted train step: state donated, batch sharded over (data, fsdp), metrics replicated."""
        o = self.cfg.optim
        step = make_train_step(self.family, self.model, self.tx, self.cfg.train.z_loss, o.grad_accum_steps)
        return jax.jit(
            self._in_mesh_context(step),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated(self.mesh)),
            donate_argnums=(0,),
        )

    def jit_gradients(self) -> Callable[[Any, Batch], tuple[Any, dict]]:
        """params, batch -> (gradient of the mean token loss, metrics), sharded like the params."""
        o = self.cfg.optim

        def gradients(params: Any, batch: Batch) -> tuple[Any, dict]:
            return batch_gradients(self.family, self.model, params, batch, self.cfg.train.z_loss, o.grad_accum_steps)

        return jax.jit(
            self._in_mesh_context(gradients),
            in_shardings=(self.state_shardings.params, self.batch_sharding),
            out_shardings=(self.state_shardings.params, replicated(self.mesh)),
        )

    def jit_eval_step(self) -> Callable[[Any, Batch], dict]:
        return jax.jit(
            self._in_mesh_context(make_eval_step(self.family, self.model)),
            in_shardings=(self.state_shardings.params, self.batch_sharding),
            out_shardings=replicated(self.mesh),
        )

    def put_batch(self, local: dict[str, np.ndarray]) -> Batch:
        """This process's rows of the global batch (numpy, the family's field names) -> the family's typed
        batch of global arrays sharded over the batch axes."""
        arrays = {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                  for k, v in local.items()}
        return batch_from_dict(self.family.batch_type, arrays)

    def abstract_batch(self) -> Batch:
        """ShapeDtypeStructs of one global batch (for lowering without data)."""
        B = self.cfg.train.batch_size
        shapes = self.family.example_shapes(self.cfg.data.seq_len)
        return batch_from_dict(self.family.batch_type, {
            k: jax.ShapeDtypeStruct((B, *s), np.dtype(d), sharding=self.batch_sharding)
            for k, (s, d) in shapes.items()})


def _fresh_state(cfg: Config, family: ModelFamily, model: nn.Module, tx: optax.GradientTransformation,
                 rng: jax.Array) -> TrainState:
    params_rng, state_rng = jax.random.split(rng)
    boxed = model.init(params_rng, *family.init_args(cfg.data.seq_len))["params"]
    params = mup.scale_init(cfg.model, nn.meta.unbox(boxed), boxed_roles(boxed))
    return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params),
                      rng=state_rng)


def pipeline_schedule(cfg: Config, stages: int) -> Schedule | None:
    """The pipeline schedule for `stages` devices on the pipeline axis (None for one stage)."""
    if stages <= 1:
        return None
    return Schedule(stages, cfg.pipeline.microbatches, cfg.pipeline.repeats)


def build_setup(cfg: Config, devices: Sequence[jax.Device] | None = None) -> Setup:
    """Mesh, rules, family, model, optimizer and every sharding for `cfg` (validated beforehand)."""
    mesh = build_mesh(cfg.mesh, devices)
    rules = make_rules(cfg.mesh.rules, dict(mesh.shape), cfg.model.n_kv_heads)
    family = build_family(cfg.model)
    model = family.module(pipeline_schedule(cfg, mesh.shape["pipeline"]))
    params = abstract_params(family, cfg.data.seq_len)
    tx = make_optimizer(cfg.optim, cfg.train.steps, params.roles, mup.lr_multipliers(cfg.model, params.roles))
    repl = replicated(mesh)
    param_shardings = params.shardings(mesh, rules)
    state_shape = jax.eval_shape(lambda r: _fresh_state(cfg, family, model, tx, r), jax.random.PRNGKey(0))
    state_shardings = TrainState(
        step=repl,
        params=param_shardings,
        opt_state=opt_state_shardings(state_shape.opt_state, param_shardings, state_shape.params, repl),
        rng=repl,
    )
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shape, state_shardings
    )
    batch_sharding = NamedSharding(mesh, logical_to_spec(BATCH_AXES, rules))
    return Setup(cfg, mesh, rules, family, model, tx, abstract_state, state_shardings, batch_sharding, params)
