"""A trained workdir as a model: its config, parameters (newest checkpoint), tokenizer, inference mesh and the
prompt helpers that `llmjax generate`, `llmjax eval`, the lm-eval harness and HF export share.

A workdir gives everything: the model (WORKDIR/config.yaml), the parameters (the newest
checkpoint; only the parameters are read) and the tokenizer (the run's copy in
WORKDIR/tokenizer/, so the corpus is not needed; workdirs from before that copy existed
fall back to re-deriving it from the config's data section). Errors in the input (no checkpoint,
empty or too long prompt) raise ConfigError: exit status 2. This is a library module: the
command-line verbs live in `llmjax.infer.commands`.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from llmjax.config import Config, ConfigError, MeshConfig, load_config
from llmjax.infer.engine import Engine
from llmjax.infer.quantize import QuantOptions, dequantize, quantize, quantize_int4
from llmjax.models.families import build_family
from llmjax.parallel.mesh import build_mesh
from llmjax.parallel.rules import logical_to_spec, make_rules, use_sharding
from llmjax.train.setup import model_abstract_params


class Loaded:
    """A workdir's config, mesh, rules, parameters (sharded) and checkpoint step."""

    def __init__(self, workdir: str | Path):
        from llmjax.runtime import setup_jax
        from llmjax.storage import as_path, check_backend
        from llmjax.train.checkpoint.compat import check_matches
        from llmjax.train.checkpoint.manager import Checkpointer

        check_backend(workdir)
        self.workdir = as_path(workdir)
        cfg_path = self.workdir / "config.yaml"
        if not self.workdir.is_dir():
            raise ConfigError(f"--workdir: {self.workdir} is not a directory")
        if not cfg_path.is_file():
            raise ConfigError(f"--workdir: {cfg_path} not found (is {self.workdir} a training run directory?)")
        ckpt_dir = self.workdir / "checkpoints"
        if not ckpt_dir.is_dir() or not any(d.name.isdigit() for d in ckpt_dir.iterdir()):
            raise ConfigError(f"--workdir: no checkpoint in {ckpt_dir} (train first: llmjax train --workdir "
                              f"{self.workdir})")
        self.cfg: Config = load_config(str(cfg_path))
        setup_jax(self.cfg)
        self.mesh, self.rules = inference_mesh(self.cfg)
        self.family = build_family(self.cfg.model)
        self.abstract = model_abstract_params(self.cfg.model, self.family)
        abstract = self.abstract.placed(self.mesh, self.rules)
        self.adapters = self.lora = None
        if self.cfg.lora.rank > 0:  # adapters in the checkpoint, the base behind its pointer: merged
            from llmjax.train.checkpoint.init_from import restore_lora_model

            self.step, self.params, self.adapters, self.lora = restore_lora_model(
                self.cfg, self.workdir, self.mesh, self.rules, self.abstract,
                lambda step_dir, shapes, logical: check_matches(self.cfg.model, step_dir, shapes, logical,
                                                                str(cfg_path)))
        else:
            ckpt = Checkpointer(ckpt_dir, async_save=False, primary=False)
            try:
                self.step, self.params = ckpt.restore_params(abstract, check=lambda step_dir: check_matches(
                    self.cfg.model, step_dir, abstract, self.abstract.logical, str(cfg_path)))
            finally:
                ckpt.close()
        print(f"llmjax: restored step {self.step} from {ckpt_dir / str(self.step)}", file=sys.stderr)

    def tokenizer(self) -> Any:
        """The run's copy of its tokenizer (never retrained); older workdirs: re-derived from the config."""
        from llmjax.data.tokenizers.run_tokenizer import run_tokenizer

        tok = run_tokenizer(self.cfg, self.workdir)
        if tok is not None:
            return tok
        from llmjax.data.stream.sources import resolve_sources
        from llmjax.data.tokenizers.tokenizer import resolve_tokenizer

        print(f"llmjax: note: {self.workdir} has no tokenizer copy (trained by an older llmjax): re-deriving it from "
              "the config's data section", file=sys.stderr)
        return resolve_tokenizer(self.cfg, resolve_sources(self.cfg))

    def check_quant(self, opts: QuantOptions) -> None:
        """ConfigError (exit 2) when `opts` cannot quantize this model (a group size not dividing a width);
        from shapes alone, before anything is compiled."""
        opts.check_widths(self.abstract.shapes, self.abstract.logical, self.cfg.model)

    def quantized(self, opts: QuantOptions | None = None) -> Any:
        """The parameters quantized by `opts` (default int8; `llmjax.infer.quantize`: matrices, experts and
        embeddings): int8 per channel, int4 group-wise rounded to nearest, or int4 by GPTQ calibrated on
        `opts.calib_sequences` rows of the run's training data."""
        opts = opts or QuantOptions("int8")
        self.check_quant(opts)
        logical = self.abstract.logical
        if opts.method == "int8":
            return jax.jit(lambda p: quantize(p, logical))(self.params)
        if opts.method == "int4":
            return jax.jit(lambda p: quantize_int4(p, logical, opts.group_size))(self.params)
        assert opts.method == "int4-gptq", opts.method
        from llmjax.infer.gptq import gptq_quantize

        batches = self.calibration_batches(opts.calib_sequences)
        print(f"llmjax: int4-gptq: calibrating on {len(batches)} training batches "
              f"({len(batches) * self.cfg.train.batch_size} sequences)", file=sys.stderr)
        return gptq_quantize(self.cfg.model, jax.device_get(self.params), logical, batches, opts.group_size,
                             opts.damp, run=self.under_rules,
                             log=lambda line: print(f"llmjax: int4-gptq: {line}", file=sys.stderr))

    def calibration_batches(self, sequences: int) -> list[Any]:
        """The first ceil(sequences / train.batch_size) batches of the run's training data (the family's typed
        batches, as numpy), read through the run's data pipeline."""
        from llmjax.models.families import batch_from_dict
        from llmjax.train.checkpoint.data_state import latest_saved_shares
        from llmjax.train.objectives import objective_for

        objective = objective_for(self.cfg)
        data = objective.open_data(self.cfg, self.family, tokenizer=self.tokenizer(),
                                   shares=latest_saved_shares(self.workdir / "checkpoints"))
        it = data.train_iterator()
        try:
            rows = [next(it) for _ in range(math.ceil(sequences / self.cfg.train.batch_size))]
        finally:
            it.close()
        return [batch_from_dict(self.family.batch_type, b) for b in rows]

    def under_rules(self, fn: Callable) -> Callable:
        """`fn` run under the inference mesh's sharding rules (what the model's `constrain` calls read)."""
        @functools.wraps(fn)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with use_sharding(self.mesh, self.rules):
                return fn(*args, **kwargs)

        return wrapped

    def engine(self, quant: bool | str | QuantOptions = False) -> Engine:
        """The decoding engine on the float parameters, or on quantized ones (`quant`: True / "int8" or
        `QuantOptions`), dequantized inside each jitted step."""
        opts = quant if isinstance(quant, QuantOptions) else QuantOptions("int8" if quant is True else
                                                                          (quant or "none"))
        params, transform = self.params, None
        if opts.method != "none":
            params = self.quantized(opts)
            dt = jnp.dtype(self.cfg.model.param_dtype)
            transform = lambda p: dequantize(p, dt)  # noqa: E731
        return Engine(self.cfg.model, params, self.mesh, self.rules, transform, family=self.family)

    def eval_step(self, params: Any, transform: Callable[[Any], Any] | None = None
                  ) -> Callable[[dict[str, np.ndarray]], dict[str, jax.Array]]:
        """host batch (numpy [B, L] fields) -> the family's evaluation sums under `params` (`transform`: e.g.
        int8 dequantization inside the jitted step). The batch is sharded over the batch axes when its rows
        divide them, else replicated. For `llmjax.train.evaluation.evaluate`."""
        from llmjax.models.families import batch_from_dict
        from llmjax.train.step import make_eval_step

        step = make_eval_step(self.family, self.family.module())

        def fn(p: Any, batch: Any) -> Any:
            with use_sharding(self.mesh, self.rules):
                return step(transform(p) if transform else p, batch)

        jitted = jax.jit(fn)
        spec = logical_to_spec(("act_batch", "act_length"), self.rules)
        data_ways = int(np.prod([self.mesh.shape[a] for a in (spec[0] or ())] or [1]))

        def run(b: dict[str, np.ndarray]) -> dict[str, jax.Array]:
            rows = next(iter(b.values())).shape[0]
            put = (lambda x: jax.device_put(x, NamedSharding(self.mesh, spec))) if rows % data_ways == 0 \
                else jnp.asarray
            return jitted(params, batch_from_dict(self.family.batch_type, {k: put(v) for k, v in b.items()}))

        return run


def inference_mesh(cfg: Config) -> tuple[Any, Any]:
    """Batch over `data` (all devices not used by `tensor`), heads over the run's `tensor` size when it fits."""
    n = jax.device_count()
    tensor = cfg.mesh.tensor if cfg.mesh.tensor > 0 and n % cfg.mesh.tensor == 0 else 1
    mesh_cfg = MeshConfig(data=-1, fsdp=1, tensor=tensor, rules=cfg.mesh.rules)
    mesh = build_mesh(mesh_cfg)
    return mesh, make_rules(mesh_cfg.rules, dict(mesh.shape), cfg.model.n_kv_heads)


def bos_prefix(cfg: Config, tokenizer: Any) -> list[int]:
    """[BOS] when documents start with it (`data.add_bos`, else the tokenizer's own convention), else []:
    a prompt is the start of a document."""
    from llmjax.data.tokenizers.tokenizer import document_start

    return document_start(tokenizer, cfg.data.add_bos)


def chat_prompts(cfg: Config, tokenizer: Any, prompts: list[str], system: str | None
                 ) -> tuple[list[list[int]], tuple[int, ...]]:
    """(each prompt as a one-turn conversation rendered with the model's chat template
    (`llmjax.data.tokenizers.chat_template`,
    as transformers' apply_chat_template) and encoded without added special tokens, as transformers does;
    the ids that end the model's turn). ConfigError when there is no chat template or it refuses the turn."""
    from llmjax.data.tokenizers.chat_template import ChatTemplate

    template = ChatTemplate.for_tokenizer(tokenizer, getattr(cfg.data, "chat_template", None))
    head = [{"role": "system", "content": system}] if system else []
    try:
        texts = [template.render(head + [{"role": "user", "content": p}], add_generation_prompt=True)
                 for p in prompts]
    except ValueError as e:
        raise ConfigError(f"--chat: {e}") from None
    stops = getattr(tokenizer, "stop_ids", None) or ((tokenizer.eos_id,) if tokenizer.eos_id is not None else ())
    return tokenizer.encode(texts), tuple(stops)
