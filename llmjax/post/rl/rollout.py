"""Prompts, rollouts and rewards of a policy-optimisation run (`train.objective=grpo`).

`PromptData` reads `rl.prompts` (JSON lines: a "prompt" string or "messages", plus any fields the
reward function reads), renders each prompt with the chat template and the generation prompt, and
yields per step the indices of that step's prompts (a seeded permutation per epoch: step k is a
function of k, so the iterator's state is the step). `Rollouts.next_batch` samples the responses
with the current policy on the decode engine (`llmjax.infer.engine`: prefill, then one jitted
`while_loop`), with a key per row from (seed, step, row), so a resumed run draws the same
rollouts, scores them, and builds the `RolloutBatch` of the train step.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import Config, ConfigError
from llmjax.data.post.jsonl import as_messages, read_jsonl, where
from llmjax.data.post.sft_data import post_training_tokenizer
from llmjax.data.post.step_iterator import StepIterator
from llmjax.data.stream.files import split_records
from llmjax.data.stream.stages import derive_seed
from llmjax.data.tokenizers.chat_template import ChatTemplate
from llmjax.infer.sampling import sample
from llmjax.post.rl.losses import entropy_from_logits, group_advantages

STATE_FORMAT = "rl-1"
EVAL_SHOWN = 3  # held-out responses logged per evaluation


def load_reward_fn(spec: str) -> Callable[[str, str, dict], float]:
    """The callable `module:function` names (ConfigError naming rl.reward_fn when it cannot be imported)."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        raise ConfigError(f"rl.reward_fn={spec}: cannot import it ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(f"rl.reward_fn={spec}: {name} is not callable")
    return fn


def check_processes(cfg: Config, process_count: int) -> None:
    """Several processes score with rl.reward_fn only (a reward model's scoring across processes is untested)."""
    if process_count > 1 and cfg.rl.reward_model:
        raise ConfigError(f"rl.reward_model: train.objective={cfg.train.objective} with a reward model runs in one "
                          f"process ({process_count} here); several processes take rl.reward_fn")


class PromptIterator(StepIterator):
    """The prompt indices of steps step, step+1, ... ({"prompt": [P]}); the state is the step."""

    NAME, STATE_FORMAT = "rl", STATE_FORMAT
    kl_coef: float | None = None  # PPO's adaptive KL coefficient for the next rollout (checkpointed with the step)

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        return state if self.kl_coef is None else {**state, "kl_coef": self.kl_coef}

    def rows(self, first: int) -> dict[str, np.ndarray]:
        d = self.data
        n = len(d.train)
        return {"prompt": np.array([d.train[int(d.epoch_order(r // n)[r % n])]
                                    for r in range(first, first + d.local_batch)], np.int64)}


class PromptData:
    """The prompt set of a policy-optimisation run (the trainer's data interface; module docstring)."""

    def __init__(self, cfg: Config, tokenizer: Any = None):
        rl = cfg.rl
        assert rl.prompts is not None  # config validation
        self.cfg, self.block = cfg, 0
        self.group = rl.samples_per_prompt
        self.global_batch = self.local_batch = cfg.train.batch_size // self.group  # prompts per step
        self.tokenizer = post_training_tokenizer(cfg, tokenizer)
        self.template = ChatTemplate.for_tokenizer(self.tokenizer, cfg.data.chat_template)
        self.records = read_jsonl(rl.prompts, "rl.prompts")
        self.prompt_ids: list[np.ndarray] = []
        self.prompt_text: list[str] = []
        budget = cfg.data.seq_len + 1 - rl.max_new_tokens
        for name, rec in self.records:
            if "prompt" in rec:
                messages = as_messages(rec["prompt"], "user", name, "prompt") if isinstance(
                    rec["prompt"], (str, list)) else None
            elif "messages" in rec:
                messages = as_messages(rec["messages"], "user", name, "messages")
            else:
                messages = None
            if not messages:
                raise ConfigError(f'rl.prompts: {where(name)}: expected a "prompt" string or "messages", got keys '
                                  f"{sorted(rec)}")
            text = self.template.render(messages, add_generation_prompt=True)
            ids = np.asarray(self.tokenizer.encode([text])[0], np.int32)
            if len(ids) > budget:
                raise ConfigError(f"rl.prompts: {where(name)}: the prompt is {len(ids)} tokens; with rl.max_new_tokens="
                                  f"{rl.max_new_tokens} a row of data.seq_len + 1 = {cfg.data.seq_len + 1} holds "
                                  f"{budget}: raise data.seq_len or shorten it")
            self.prompt_ids.append(ids)
            self.prompt_text.append(str(messages[-1]["content"]))
        train_idx, val_idx = split_records([n for n, _ in self.records], cfg.data.validation_fraction)
        self.train, self.validation = [int(i) for i in train_idx], [int(i) for i in val_idx]
        if len(self.train) < self.global_batch:
            raise ConfigError(f"rl.prompts: {len(self.train)} training prompts, fewer than the "
                              f"{self.global_batch} a step samples (train.batch_size / rl.samples_per_prompt)")
        self.reward_fn = load_reward_fn(rl.reward_fn) if rl.reward_fn else None
        self.reward_model = None
        if rl.reward_model:
            from llmjax.post.rl.scoring import RewardModel, reward_config

            vocab = reward_config(rl.reward_model, "rl.reward_model").model.vocab_size
            if vocab != cfg.model.vocab_size:  # before reading any weights
                raise ConfigError(f"rl.reward_model: {rl.reward_model} has another vocabulary (model.vocab_size "
                                  f"{vocab}) than the policy (model.vocab_size {cfg.model.vocab_size})")
            rm = RewardModel(rl.reward_model, key="rl.reward_model")
            if rm.tokenizer.file_hash() != self.tokenizer.file_hash():
                raise ConfigError(f"rl.reward_model: {rl.reward_model} has another vocabulary (vocab_size "
                                  f"{rm.vocab_size}, tokenizer {rm.tokenizer.path}) than the policy (vocab_size "
                                  f"{cfg.model.vocab_size}, tokenizer {self.tokenizer.path})")
            self.reward_model = rm
        self.sources, self.name, self.local_shares = [self], "rl", None
        self._engine: Any = None  # the evaluation's decode engine (built at the first evaluation)
        h = hashlib.sha256(json.dumps([STATE_FORMAT, cfg.seed, self.group, cfg.data.validation_fraction]).encode())
        for ids in self.prompt_ids:
            h.update(ids.tobytes())
        self.fingerprint = h.hexdigest()[:16]

    def epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.train)
        return np.random.default_rng(derive_seed(self.cfg.seed, "rl", epoch)).permutation(n)

    def rewards(self, prompts: list[int], responses: list[str], response_ids: list[np.ndarray]) -> np.ndarray:
        """[N] rewards of the responses to prompt indices `prompts` (ConfigError naming the function and the
        record when the reward function raises or returns no number)."""
        if self.reward_model is not None:
            seqs = [np.concatenate([self.prompt_ids[p], r]) for p, r in zip(prompts, response_ids, strict=True)]
            return np.asarray(self.reward_model.score_ids(seqs), np.float32)
        fn, spec = self.reward_fn, self.cfg.rl.reward_fn
        assert fn is not None
        out = np.zeros(len(prompts), np.float32)
        for j, (p, text) in enumerate(zip(prompts, responses, strict=True)):
            name, rec = self.records[p]
            try:
                out[j] = float(fn(self.prompt_text[p], text, rec))
            except Exception as e:  # noqa: BLE001 - the user's function
                raise ConfigError(f"rl.reward_fn={spec} raised {type(e).__name__}: {e} on the record at "
                                  f"{where(name)} (response {text!r})") from None
        return out

    # ------------------------------------------------------------------ the trainer's interface
    def describe(self) -> str:
        t, rl = self.tokenizer, self.cfg.rl
        scorer = f"reward_fn {rl.reward_fn}" if rl.reward_fn else f"reward model {rl.reward_model}"
        return (f"data: rl prompts {rl.prompts}: {len(self.train)} train / {len(self.validation)} held-out; "
                f"{self.global_batch} prompts x {self.group} samples per step, up to {rl.max_new_tokens} new tokens; "
                f"{scorer}\ndata: tokenizer {t.kind} {t.path} (vocab {t.vocab_size}); chat template "
                f"{self.template.origin}")

    def train_iterator(self, state: dict[str, Any] | None = None) -> PromptIterator:
        return PromptIterator(self, int(state["step"]) if state else 0)

    def restore_iterator(self, state: dict[str, Any] | None, step: int) -> tuple[PromptIterator, str | None]:
        it = self.train_iterator({"step": step})
        if state is not None and state.get("kl_coef") is not None:
            it.kl_coef = float(state["kl_coef"])
        if state is not None and state.get("fingerprint") not in (None, self.fingerprint):
            return it, "the prompt set changed since the checkpoint was written"
        return it, None

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(())  # held-out rewards are measured with rollouts (`evaluate`)

    def evaluate(self, setup: Any, params: Any, log: Callable[[str], None]) -> dict[str, float]:
        """The trainer's evaluation (eval.every_steps): greedy responses of `params` to the held-out prompts (all, or
        the first eval.batches x the prompts of a step), in chunks of train.batch_size rows, scored by the run's
        reward -> eval_reward (mean; experiments/scripts/rl_heldout.py's number), eval_loss (minus it: lower is
        better, as for every objective) and eval_response_length (tokens, stop included); logs the first
        `EVAL_SHOWN` (prompt, response, reward)."""
        cfg, rl = self.cfg, self.cfg.rl
        if self._engine is None:
            from llmjax.infer.engine import Engine

            self._engine = Engine(cfg.model, None, setup.mesh, setup.rules, family=setup.model_family)
        held = self.validation[:cfg.eval.batches * self.global_batch] if cfg.eval.batches > 0 else self.validation
        rows, stops = cfg.train.batch_size, stop_ids(cfg, self.tokenizer)
        responses: list[tuple[np.ndarray, bool]] = []
        for i in range(0, len(held), rows):
            chunk = held[i:i + rows]
            padded = chunk + [chunk[0]] * (rows - len(chunk))  # one shape: one compilation
            tokens = sample_responses(self._engine, params, [self.prompt_ids[p] for p in padded], rl.max_new_tokens,
                                      jax.random.PRNGKey(0), 0.0, 1.0, stops)
            responses += [cut(row, stops) for row in tokens[:len(chunk)]]
        texts = [self.tokenizer.decode([int(t) for t in (r[:-1] if stopped else r)]) for r, stopped in responses]
        rewards = self.rewards(held, texts, [r for r, _ in responses])
        for p, text, r in list(zip(held, texts, rewards, strict=True))[:EVAL_SHOWN]:
            log(f"eval: {self.prompt_text[p]!r} -> {text!r} (reward {r:g})")
        return {"eval_loss": -float(rewards.mean()), "eval_reward": float(rewards.mean()),
                "eval_response_length": float(np.mean([len(r) for r, _ in responses]))}


def stop_ids(cfg: Config, tokenizer: Any) -> tuple[int, ...]:
    """The ids that end a response: the tokenizer's end-of-turn ids (or EOS) and rl.stop_ids."""
    own = getattr(tokenizer, "stop_ids", None) or ((tokenizer.eos_id,) if tokenizer.eos_id is not None else ())
    return tuple(sorted({*map(int, own), *cfg.rl.stop_ids}))


def sample_responses(engine: Any, params: Any, prompts: list[np.ndarray], T: int, key: jax.Array,
                     temperature: float, top_p: float, stops: tuple[int, ...]) -> np.ndarray:
    """[N, T] sampled tokens of each prompt under `params` (prefill, then one jitted while_loop), row i drawn with
    fold_in(key, i) (rows with the same prompt differ). Entries after a row's stop id are unspecified."""
    engine.params = params
    logits, cache, _ = engine.prefill(prompts, engine.cache_slots(max(len(p) for p in prompts), T))
    eos = jnp.asarray(np.asarray(stops or (-1,), np.int32))

    def loop(params: Any, logits: jax.Array, cache: Any, key: jax.Array) -> jax.Array:
        B = logits.shape[0]
        row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(B))

        def draw(lg: jax.Array, k: jax.Array) -> jax.Array:
            return sample(lg[None], k, temperature, 0, top_p)[0]

        def cond(c: Any) -> jax.Array:
            return jnp.logical_and(c[0] < T, jnp.logical_not(jnp.all(c[4])))

        def body(c: Any) -> Any:
            t, logits, cache, out, done = c
            tok = jax.vmap(draw)(logits, jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys))
            out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, t))
            done = jnp.logical_or(done, jnp.isin(tok, eos))
            logits, cache = engine.family.step(engine.model, params, cache, tok)
            return t + 1, logits, cache, out, done

        init = (jnp.zeros((), jnp.int32), logits, cache, jnp.zeros((B, T), jnp.int32), jnp.zeros((B,), bool))
        return jax.lax.while_loop(cond, body, init)[3]

    fn = engine.jitted(f"rl/{T}/{stops}/{temperature}/{top_p}", loop, out_shardings=engine.replicated())
    return engine.to_host(fn(params, logits, cache, key))[:len(prompts)]


def cut(tokens: np.ndarray, stops: tuple[int, ...]) -> tuple[np.ndarray, bool]:
    """(the response up to and including its first stop id, whether it stopped)."""
    hits = np.nonzero(np.isin(tokens, np.asarray(stops or (-1,))))[0]
    return (tokens[:hits[0] + 1], True) if len(hits) else (tokens, False)


RL_KEY = 0x52_4C  # folded into the seed for the rollouts' keys


class Rollouts:
    """The batch source of a policy-optimisation run: `next_batch()` samples, scores and packs step k's rollouts
    under the current policy (`run.state`)."""

    def __init__(self, setup: Any, data: PromptData, iterator: PromptIterator, run: Any,
                 log: Callable[[str], None]):
        from llmjax.infer.engine import Engine

        self.setup, self.data, self.iterator, self.run, self.log = setup, data, iterator, run, log
        cfg = setup.cfg
        self.cfg, self.stops = cfg, stop_ids(cfg, data.tokenizer)
        self.engine = Engine(cfg.model, None, setup.mesh, setup.rules, family=setup.model_family)
        self._reference: Any = None
        self._score = jax.jit(setup._in_mesh_context(self.score_fn()))
        # the scores gathered whole onto every device (an exact copy), so each process reads the whole batch back
        self._gather = jax.jit(lambda xs: xs, out_shardings=self.engine.replicated())
        self.timing: dict[str, float] = {"rollout_s": 0.0, "scoring_s": 0.0, "rollout_tokens": 0.0}

    def score_fn(self) -> Callable[..., tuple[jax.Array, ...]]:
        """(params, reference params, batch) -> [B, L] each: the log-probabilities of the targets under the policy
        and the reference, the policy's entropy (an objective adds what else it needs, e.g. PPO's values)."""
        family, model = self.setup.model_family, self.engine.model

        def score(params: Any, ref: Any, batch: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
            out = []
            for p in (params, ref):
                logits, _ = family.logits(model, p, batch)
                logp_all = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
                out.append((jnp.take_along_axis(logp_all, batch.targets[..., None], axis=-1)[..., 0], logits))
            return out[0][0], out[1][0], entropy_from_logits(out[0][1])

        return score

    def reference(self) -> Any:
        """The reference model's parameters: LoRA's frozen base, else the starting model (train.init_from's, or the
        seed's random init), read once."""
        setup, cfg = self.setup, self.cfg
        if setup.lora is not None:
            return self.run.state.frozen
        if self._reference is None:
            if cfg.train.init_from:
                from llmjax.train.checkpoint.init_from import restore_base

                start = setup.base_params
                _, self._reference = restore_base(cfg, start.placed(setup.mesh, setup.rules), start.logical,
                                                  cfg.train.init_from)
            else:
                from llmjax.train.setup import _init_params

                self._reference = jax.jit(lambda r: _init_params(cfg, setup.family, setup.model,
                                                                 jax.random.split(r)[0]),
                                          out_shardings=setup.params.shardings(setup.mesh, setup.rules))(
                    jax.random.PRNGKey(cfg.seed))
        return self._reference

    def rollouts(self) -> dict[str, Any]:
        """Step k's rollouts under the current policy: "prompts" (index per row), "rows" (`pack`), "rewards" [N],
        and [N, L] per token "old_logp", "ref_logp" (0 off the response), "entropy" and what else `score_fn`
        returns ("scores": that tuple, on the host)."""
        cfg, rl, d = self.cfg, self.cfg.rl, self.data
        step = self.iterator.step
        prompts = [int(p) for p in next(self.iterator)["prompt"] for _ in range(d.group)]
        params = self.setup.model_params(self.run.state)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), RL_KEY), step)
        t0 = time.perf_counter()
        tokens = sample_responses(self.engine, params, [d.prompt_ids[p] for p in prompts], rl.max_new_tokens, key,
                                  rl.temperature, rl.top_p, self.stops)
        t1 = time.perf_counter()
        responses = [cut(row, self.stops) for row in tokens]
        texts = [d.tokenizer.decode([int(t) for t in (r[:-1] if stopped else r)]) for r, stopped in responses]
        rewards = d.rewards(prompts, texts, [r for r, _ in responses])
        rows = self.pack(prompts, [r for r, _ in responses])
        shapes = self.setup.family.example_shapes(cfg.data.seq_len)
        seqs = self.put_global({k: rows[k] if k in rows else np.zeros((len(prompts), *s), dt)
                                for k, (s, dt) in shapes.items()})
        scores = self.host(self._score(params, self.reference(), seqs))
        t2 = time.perf_counter()
        on = rows["weights"] > 0
        n_new = int(sum(len(r) for r, _ in responses))
        self.timing = {"rollout_s": t1 - t0, "scoring_s": t2 - t1, "rollout_tokens": float(n_new)}
        if step % cfg.train.log_every == 0:
            self.log(f"rl step {step}: {len(prompts)} rollouts, {n_new} new tokens in {t1 - t0:.2f}s "
                     f"({n_new / max(t1 - t0, 1e-9):,.0f} tokens/s), rewards + log-probabilities {t2 - t1:.2f}s; "
                     f"reward {rewards.mean():.3f}; e.g. {texts[0]!r}")
        return {"step": step, "prompts": prompts, "rows": rows, "rewards": rewards, "old_logp": scores[0] * on,
                "ref_logp": scores[1] * on, "entropy": scores[2].astype(np.float32), "scores": scores}

    def next_batch(self) -> Any:
        """GRPO's batch: the rollouts with group-normalised advantages, weighted per token or per sequence."""
        r = self.rollouts()
        rows, mask = r["rows"], r["rows"]["weights"]
        if self.cfg.rl.normalise == "sequence":
            mask = mask / np.maximum(mask.sum(1, keepdims=True), 1.0)
        adv = np.asarray(group_advantages(jnp.asarray(r["rewards"]), self.data.group))
        return self.put_global({**{k: rows[k] for k in ("inputs", "targets", "segment_ids", "positions")},
                                "weights": mask.astype(np.float32), "old_logp": r["old_logp"],
                                "ref_logp": r["ref_logp"], "entropy": r["entropy"],
                                "advantages": adv[:, None].astype(np.float32),
                                "rewards": r["rewards"][:, None].astype(np.float32)})

    def host(self, xs: tuple[jax.Array, ...]) -> tuple[np.ndarray, ...]:
        """Global arrays -> numpy, whole in every process (gathered onto every device, an exact copy, when another
        process holds some rows)."""
        if jax.process_count() > 1:
            return tuple(self.engine.to_host(x) for x in self._gather(xs))
        return tuple(np.asarray(jax.device_get(x)) for x in xs)

    def put_global(self, rows: dict[str, np.ndarray]) -> Any:
        """The whole step's rows [B, ...] (the same in every process: the rollouts are decoded on global arrays and
        read back replicated, so each process scores every row) -> the family's typed batch of global arrays
        sharded like `setup.put_batch`'s; each process places the rows its devices hold."""
        from llmjax.models.families import batch_from_dict

        if jax.process_count() == 1:
            return self.setup.put_batch(rows)
        sharding = self.setup.batch_sharding

        def place(v: np.ndarray) -> jax.Array:
            return jax.make_array_from_callback(v.shape, sharding, lambda index: v[index])

        return batch_from_dict(self.setup.family.batch_type, {k: place(np.asarray(v)) for k, v in rows.items()})

    def pack(self, prompts: list[int], responses: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Prompt + response rows of data.seq_len (`LMBatch` fields; weights 1 on the response's targets)."""
        L = self.cfg.data.seq_len
        out = {k: np.zeros((len(prompts), L), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
        out["weights"] = np.zeros((len(prompts), L), np.float32)
        for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
            seq = np.concatenate([self.data.prompt_ids[p], r])[:L + 1]
            n, start = len(seq), len(self.data.prompt_ids[p])
            out["inputs"][i, :n - 1] = seq[:-1]
            out["targets"][i, :n - 1] = seq[1:]
            out["segment_ids"][i, :n - 1] = 1
            out["positions"][i, :n - 1] = np.arange(n - 1)
            out["weights"][i, start - 1:n - 1] = 1.0
        return out
