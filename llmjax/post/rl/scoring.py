"""A reward-model workdir as a scorer (`llmjax reward`, PPO's reward model, the Hugging Face export).

`RewardModel(workdir)` reads a `train.objective=reward` run: its config, the newest checkpoint's
parameters (the decoder and the `score` head; with LoRA the adapters merged into the base the
run points at), its tokenizer and chat template. `score(records)` renders each record's prompt and
response as in training (`{"prompt", "response"}`: strings, one user / one assistant message, or
lists of messages) and returns the reward read at the last token. `score_ids` scores token ids
directly (PPO's rollouts). Errors in the input raise ConfigError naming the record.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import Config, ConfigError, load_config
from llmjax.data.post.jsonl import as_messages, where
from llmjax.data.post.preference_data import encode_response
from llmjax.models.families import build_family
from llmjax.post.rl.reward import RewardFamily, sequence_rewards
from llmjax.storage import as_path


def reward_config(workdir: str | Path, key: str = "--workdir") -> Config:
    """The config of a reward-model workdir (ConfigError naming `key` when it is not one)."""
    w = as_path(workdir)
    cfg_path = w / "config.yaml"
    if not cfg_path.is_file():
        raise ConfigError(f"{key}: {cfg_path} not found (is {w} a training run directory?)")
    cfg = load_config(str(cfg_path))
    if cfg.train.objective != "reward":
        raise ConfigError(f"{key}: {w} was trained with train.objective={cfg.train.objective}, not a reward model "
                          "(train.objective=reward)")
    ckpts = w / "checkpoints"
    if not ckpts.is_dir() or not any(d.name.isdigit() for d in ckpts.iterdir()):
        raise ConfigError(f"{key}: no checkpoint in {ckpts}")
    return cfg


class RewardModel:
    """A reward-model workdir loaded for scoring (module docstring); parameters replicated on `mesh` (default: all
    local devices) or as `mesh`/`rules` shard them."""

    def __init__(self, workdir: str | Path, key: str = "--workdir", batch: int = 16):
        from llmjax.data.tokenizers.chat_template import ChatTemplate
        from llmjax.data.tokenizers.run_tokenizer import run_tokenizer
        from llmjax.infer.workdir_model import inference_mesh
        from llmjax.runtime import setup_jax
        from llmjax.train.checkpoint.compat import check_matches
        from llmjax.train.checkpoint.manager import Checkpointer
        from llmjax.train.setup import abstract_params

        self.workdir = as_path(workdir)
        self.cfg = reward_config(workdir, key)
        setup_jax(self.cfg)
        self.batch = batch
        self.mesh, self.rules = inference_mesh(self.cfg)
        self.family = RewardFamily(build_family(self.cfg.model), self.cfg.reward.margin)
        self.model = self.family.module()
        self.abstract = abstract_params(self.family, self.cfg.data.seq_len)  # type: ignore[arg-type]  # contract
        placed = self.abstract.placed(self.mesh, self.rules)
        if self.cfg.lora.rank > 0:
            from llmjax.train.checkpoint.init_from import restore_lora_model

            self.step, self.params, _, _ = restore_lora_model(
                self.cfg, self.workdir, self.mesh, self.rules, self.abstract,
                lambda step_dir, shapes, logical: check_matches(self.cfg.model, step_dir, shapes, logical, key))
        else:
            ckpt = Checkpointer(self.workdir / "checkpoints", async_save=False, primary=False)
            try:
                self.step, self.params = ckpt.restore_params(placed, check=lambda step_dir: check_matches(
                    self.cfg.model, step_dir, placed, self.abstract.logical, key))
            finally:
                ckpt.close()
        tok = run_tokenizer(self.cfg, self.workdir)
        if tok is None:
            raise ConfigError(f"{key}: {self.workdir} has no tokenizer copy (WORKDIR/tokenizer)")
        self.tokenizer = tok
        self.template = ChatTemplate.for_tokenizer(tok, self.cfg.data.chat_template)
        self._fn = jax.jit(lambda p, ids, seg, pos: sequence_rewards(self.model, p, ids, seg, pos)[0])

    @property
    def vocab_size(self) -> int:
        return int(self.cfg.model.vocab_size)

    def encode(self, name: str, rec: dict[str, Any]) -> np.ndarray:
        """Token ids [n] of one {"prompt", "response"} record rendered with the chat template."""
        try:
            if not isinstance(rec, dict) or "prompt" not in rec or "response" not in rec:
                raise ValueError(f"{where(name)}: expected {{\"prompt\", \"response\"}}, got "
                                 f"{sorted(rec) if isinstance(rec, dict) else type(rec).__name__}")
            prompt = as_messages(rec["prompt"], "user", name, "prompt")
            ids, _ = encode_response(self.template, self.tokenizer, prompt,
                                     as_messages(rec["response"], "assistant", name, "response"))
        except ValueError as e:
            msg = str(e)
            raise ConfigError(f"--data: {msg if msg.startswith(where(name)) else f'{where(name)}: {msg}'}") from None
        if len(ids) > self.cfg.model.max_seq_len:
            raise ConfigError(f"--data: {where(name)}: {len(ids)} tokens, longer than model.max_seq_len="
                              f"{self.cfg.model.max_seq_len}")
        return ids

    def score_ids(self, sequences: Sequence[np.ndarray]) -> np.ndarray:
        """[N] float32 rewards of token-id sequences (each read at its last token), in batches of `batch`, each
        padded to a power of two of its longest sequence (few compilations)."""
        out = []
        for i in range(0, len(sequences), self.batch):
            chunk = sequences[i:i + self.batch]
            n = max(len(s) for s in chunk)
            L = min(1 << max(n - 1, 1).bit_length(), max(self.cfg.model.max_seq_len, n))
            ids = np.zeros((self.batch, L), np.int32)
            seg = np.zeros((self.batch, L), np.int32)
            for j, s in enumerate(chunk):
                ids[j, :len(s)], seg[j, :len(s)] = s, 1
            pos = np.where(seg > 0, np.arange(L)[None], 0).astype(np.int32)
            r = self._fn(self.params, jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(pos))
            out.append(np.asarray(jax.device_get(r))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def score(self, records: Sequence[tuple[str, dict[str, Any]]]) -> np.ndarray:
        """[N] rewards of (name, record) pairs (`llmjax.data.post.jsonl.read_jsonl`'s output)."""
        return self.score_ids([self.encode(name, rec) for name, rec in records])
