"""Put a config on a mesh: family, model, optimizer, shardings, sharded init, jitted steps.

`Setup` is the one place where the pure pieces (the model family, `train.step`, the optimizer)
meet the mesh. Parameters are created under `jit` with output shardings computed from
`eval_shape` and the logical rules (`abstract_params`), so no host ever materialises the
whole model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from llmjax.config import Config, ModelConfig
from llmjax.models import mup
from llmjax.models.families import ModelFamily, batch_from_dict, build_family
from llmjax.models.roles import boxed_roles, param_roles
from llmjax.parallel import context
from llmjax.parallel.mesh import build_mesh, replicated
from llmjax.parallel.pipeline import Schedule
from llmjax.parallel.rules import Rules, logical_to_spec, make_rules, tree_shardings, use_sharding
from llmjax.post.lora import LoraPlan
from llmjax.train.objectives import TrainingObjective, objective_for
from llmjax.train.optim import make_optimizer, opt_state_shardings
from llmjax.train.step import Batch, TrainState, batch_gradients, make_eval_step, make_train_step

BATCH_AXES = ("act_batch", "act_length")


class ReferenceFamily(Protocol):
    """A family that scores a batch under reference parameters (`llmjax.post.dpo.PreferenceObjective`)."""

    def reference_logprobs(self, model: Any, params: Any, batch: Any) -> jax.Array: ...


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
    length = seq_len or family.cfg.max_seq_len
    # the key and the example inputs are made inside the trace: no jax backend is started (`sweep collect`)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *family.init_args(length))["params"])
    logical = nn.get_partition_spec(boxed)
    return AbstractParams(nn.meta.unbox(boxed), logical, param_roles(logical))


def model_abstract_params(cfg: ModelConfig, family: ModelFamily | None = None) -> AbstractParams:
    """`abstract_params` of the family a model config names (`family`: that family, already built)."""
    return abstract_params(family if family is not None else build_family(cfg))


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
    params: AbstractParams  # the model's
    model_family: ModelFamily  # the family `family` wraps (built once per process; the objective's loss over it)
    objective: TrainingObjective  # train.objective's data opener and loss wrapper, resolved once per process
    lora: LoraPlan | None = None  # lora.rank > 0: the optimizer trains adapters, the model's params are frozen
    trained: AbstractParams | None = None  # what TrainState.params holds (the adapters' with LoRA)
    base_params: AbstractParams | None = None  # what `train.init_from` fills: the model family's parameters (the
    # objective's wrapper may add a head, e.g. a reward model's `score`, which starts from the seed)

    def __post_init__(self) -> None:
        if self.trained is None:
            self.trained = self.params
        if self.base_params is None:
            self.base_params = self.params

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

    def init_state(self, base: Any = None) -> TrainState:
        """Fresh, sharded train state from `cfg.seed` (same values whatever the mesh). `base`: the model's
        parameters to start from (`train.init_from`, sharded like `params`) instead of a random init."""
        if base is None:
            init = jax.jit(self._init_fn, out_shardings=self.state_shardings)
            return init(jax.random.PRNGKey(self.cfg.seed))
        init = jax.jit(self._init_from_fn, out_shardings=self.state_shardings, donate_argnums=(1,))
        return init(jax.random.PRNGKey(self.cfg.seed), base)

    def _init_fn(self, rng: jax.Array) -> TrainState:
        return _fresh_state(self.cfg, self.family, self.model, self.tx, rng, self.lora)

    def _init_from_fn(self, rng: jax.Array, base: Any) -> TrainState:
        return _fresh_state(self.cfg, self.family, self.model, self.tx, rng, self.lora, base)

    # ------------------------------------------------------------------ LoRA (frozen base) helpers
    @property
    def checkpoint_abstract_state(self) -> TrainState:
        """What a checkpoint holds: the train state without the frozen parameters."""
        return self.abstract_state.replace(frozen=None)

    def checkpoint_state(self, state: TrainState) -> TrainState:
        return state.replace(frozen=None)

    def attach_frozen(self, state: TrainState, base: Any = None) -> TrainState:
        """A restored checkpoint's state with the frozen base put back: `base` (train.init_from), else the
        random base of `cfg.seed` (as `init_state` drew it). Without LoRA: `state` unchanged."""
        if self.lora is None:
            return state
        if base is None:
            base = jax.jit(lambda r: _init_params(self.cfg, self.family, self.model, jax.random.split(r)[0]),
                           out_shardings=self.state_shardings.frozen)(jax.random.PRNGKey(self.cfg.seed))
        return state.replace(frozen=base)

    def merge_fn(self) -> Callable[[Any, Any, jax.Array | None], Any] | None:
        """(frozen, trained, rng) -> the model's parameters (LoRA's merge), or None without LoRA."""
        lora = self.lora
        return None if lora is None else (lambda base, adapters, rng: lora.merge(base, adapters, rng))

    def model_params(self, state: TrainState) -> Any:
        """The model's parameters of a train state (LoRA: base + adapters merged, sharded like the base)."""
        if self.lora is None:
            return state.params
        return self._jit_merge(state.frozen, state.params)

    def reference_logprobs(self, state: TrainState) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        """This process's rows of a batch -> [B, 2] reference log-probabilities of the global batch under the
        model parameters of `state` (train.objective=dpo, `llmjax.post.dpo`)."""
        params = self.model_params(state)
        family = cast(ReferenceFamily, self.family)  # train.objective=dpo: the family is the preference wrapper
        fn = jax.jit(self._in_mesh_context(lambda p, b: family.reference_logprobs(self.model, p, b)),
                     out_shardings=replicated(self.mesh))
        return lambda rows: np.asarray(jax.device_get(fn(params, self.put_batch(rows))))

    @functools.cached_property
    def _jit_merge(self) -> Callable[[Any, Any], Any]:
        lora = self.lora
        assert lora is not None, "only a LoRA run merges adapters into its base"
        return jax.jit(self._in_mesh_context(lambda f, p: lora.merge(f, p)),
                       out_shardings=self.state_shardings.frozen)

    def _in_mesh_context(self, fn: Callable) -> Callable:
        def wrapped(*args):
            with use_sharding(self.mesh, self.rules):
                return fn(*args)

        return wrapped

    def jit_train_step(self) -> jax.stages.Wrapped:
        """Jitted train step (state, batch) -> (state, metrics): state donated, batch sharded over (data, fsdp),
        metrics replicated."""
        o = self.cfg.optim
        # an objective whose step is more than one update (PPO: epochs of minibatches) brings its own
        make = getattr(self.family, "make_train_step", functools.partial(make_train_step, self.family))
        step = make(self.model, self.tx, self.cfg.train.z_loss, o.grad_accum_steps, self.merge_fn())
        return jax.jit(
            self._in_mesh_context(step),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated(self.mesh)),
            donate_argnums=(0,),
        )

    def jit_gradients(self) -> Callable[..., tuple[Any, dict]]:
        """(params, batch[, frozen]) -> (gradient of the mean token loss, metrics), sharded like the trained
        params. With LoRA `params` are the adapters and `frozen` the base (`TrainState.frozen`); no dropout."""
        o = self.cfg.optim

        def gradients(params: Any, batch: Batch, frozen: Any = None) -> tuple[Any, dict]:
            return batch_gradients(self.family, self.model, params, batch, self.cfg.train.z_loss, o.grad_accum_steps,
                                   frozen=frozen, model_params=self.merge_fn())

        shardings: tuple[Any, ...] = (self.state_shardings.params, self.batch_sharding)
        if self.lora is not None:
            shardings = (*shardings, self.state_shardings.frozen)
        return jax.jit(
            self._in_mesh_context(gradients),
            in_shardings=shardings,
            out_shardings=(self.state_shardings.params, replicated(self.mesh)),
        )

    def jit_eval_step(self) -> jax.stages.Wrapped:
        """eval_step(the model's parameters (`model_params`), batch) -> the family's evaluation sums."""
        return jax.jit(
            self._in_mesh_context(make_eval_step(self.family, self.model)),
            in_shardings=(self.params.shardings(self.mesh, self.rules), self.batch_sharding),
            out_shardings=replicated(self.mesh),
        )

    @functools.cached_property
    def batch_layout(self) -> tuple[type, int]:
        """(the batch type the step takes, C): C > 1 where `put_batch` puts every row in context parallelism's
        balanced order over C devices (`llmjax.parallel.context.balance_rows`): the family's batch type has a
        balanced form (`BALANCED`, e.g. `LMBatch`), the sequence splits over C > 1 devices and data.seq_len into
        2C chunks. Otherwise (C = 1) rows stay in natural order (the model balances them on device if needed)."""
        batch_type = self.family.batch_type
        balanced = getattr(batch_type, "BALANCED", None)
        size = context.context_size(self.mesh, self.rules)
        if balanced is None or not issubclass(balanced, batch_type) or size == 1 or self.cfg.data.seq_len % (2 * size):
            return batch_type, 1
        return balanced, size

    def put_batch(self, local: dict[str, np.ndarray]) -> Batch:
        """This process's rows of the global batch (numpy, the family's field names, natural order) -> the
        step's typed batch of global arrays sharded over the batch axes (rows balanced: `batch_layout`)."""
        batch_type, size = self.batch_layout
        arrays = {k: jax.make_array_from_process_local_data(
            self.batch_sharding, context.balance_rows(np.asarray(v), size) if size > 1 else np.asarray(v))
            for k, v in local.items()}
        return batch_from_dict(batch_type, arrays)

    def abstract_batch(self) -> Batch:
        """ShapeDtypeStructs of one global batch (for lowering without data)."""
        B = self.cfg.train.batch_size
        shapes = self.family.example_shapes(self.cfg.data.seq_len)
        return batch_from_dict(self.batch_layout[0], {
            k: jax.ShapeDtypeStruct((B, *s), np.dtype(d), sharding=self.batch_sharding)
            for k, (s, d) in shapes.items()})


def _init_params(cfg: Config, family: ModelFamily, model: nn.Module, rng: jax.Array) -> Any:
    """Freshly initialised, unboxed parameters (μP's init multipliers applied under model.parametrization=mup)."""
    boxed = model.init(rng, *family.init_args(cfg.data.seq_len))["params"]
    return mup.scale_init(cfg.model, nn.meta.unbox(boxed), boxed_roles(boxed))


LORA_INIT_KEY = 0x10A0  # folded into the parameter key for the adapters' initialisation


def _fresh_state(cfg: Config, family: ModelFamily, model: nn.Module, tx: optax.GradientTransformation,
                 rng: jax.Array, lora: LoraPlan | None = None, base: Any = None) -> TrainState:
    params_rng, state_rng = jax.random.split(rng)
    if base is None:
        base = _init_params(cfg, family, model, params_rng)
    else:  # parameters the objective adds to the model (a head) and `train.init_from` lacks: the seed's init
        fresh = jax.eval_shape(lambda r: _init_params(cfg, family, model, r), params_rng)
        if set(fresh) - set(base):
            fresh = _init_params(cfg, family, model, params_rng)  # what is not used is not computed (jit)
            base = {**{k: v for k, v in fresh.items() if k not in base}, **base}
    params, frozen = base, None
    if lora is not None:
        params = lora.init(jax.random.fold_in(params_rng, LORA_INIT_KEY), jax.numpy.dtype(cfg.model.param_dtype),
                           base)
        frozen = base
    return TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params),
                      rng=state_rng, frozen=frozen)


def pipeline_schedule(cfg: Config, stages: int) -> Schedule | None:
    """The pipeline schedule for `stages` devices on the pipeline axis (None for one stage)."""
    if stages <= 1:
        return None
    return Schedule(stages, cfg.pipeline.microbatches, cfg.pipeline.repeats)


def build_setup(cfg: Config, devices: Sequence[jax.Device] | None = None) -> Setup:
    """Mesh, rules, family, model, optimizer and every sharding for `cfg` (validated beforehand)."""
    mesh = build_mesh(cfg.mesh, devices)
    rules = make_rules(cfg.mesh.rules, dict(mesh.shape), cfg.model.n_kv_heads)
    objective = objective_for(cfg)
    objective.check(cfg)
    model_family = build_family(cfg.model)  # built once per process: the data and the samples get it from here
    family = objective.wrap_family(model_family, cfg)  # the objective's loss over it (identity but for dpo)
    model = family.module(pipeline_schedule(cfg, mesh.shape["pipeline"]))
    params = abstract_params(family, cfg.data.seq_len)
    base_params = params if family is model_family else abstract_params(model_family, cfg.data.seq_len)
    lora, trained = None, params
    if cfg.lora.rank > 0:
        lora = LoraPlan(cfg.lora, params.shapes, params.logical, params.roles)
        trained = AbstractParams(lora.abstract(np.dtype(cfg.model.param_dtype)), lora.logical(), lora.roles())
    updates = cfg.train.steps * getattr(family, "updates_per_step", 1)  # PPO: epochs x minibatches per step
    tx = make_optimizer(cfg.optim, updates, trained.roles, mup.lr_multipliers(cfg.model, trained.roles))
    repl = replicated(mesh)
    param_shardings = trained.shardings(mesh, rules)
    state_shape = jax.eval_shape(lambda r: _fresh_state(cfg, family, model, tx, r, lora), jax.random.PRNGKey(0))
    # a TrainState of shardings: the state's tree with a NamedSharding where each array goes
    state_shardings = TrainState(
        step=cast(jax.Array, repl),
        params=param_shardings,
        opt_state=opt_state_shardings(state_shape.opt_state, param_shardings, state_shape.params, repl),
        rng=cast(jax.Array, repl),
        frozen=None if lora is None else params.shardings(mesh, rules),
    )
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shape, state_shardings
    )
    batch_sharding = NamedSharding(mesh, logical_to_spec(BATCH_AXES, rules))
    return Setup(cfg, mesh, rules, family, model, tx, abstract_state, state_shardings, batch_sharding, params,
                 model_family, objective, lora, trained, base_params)
