"""A reward model exported to Hugging Face as `<Family>ForSequenceClassification` (`score` head, num_labels 1).

`convert to-hf` of a `train.objective=reward` workdir writes the decoder as for a causal LM
(`llmjax.interop.hf.save`), then this module adds the head: `score.weight` [1, D] (the `score`
parameter [D, 1] transposed) into model.safetensors in place of `lm_head.weight` (a sharded export:
into `score.safetensors`, named in the index, the shards' `lm_head.weight` left unused), and
config.json's `architectures` switched to the sequence-classification class with `num_labels: 1`.
transformers reads the score at the last token that is not `pad_token_id` (set from the tokenizer's
pad token when it has one), as training reads it at the last token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

INDEX = "model.safetensors.index.json"
HEAD_FILE = "score.safetensors"


def add_score_head(hf_dir: str | Path, score: Any, pad_id: int | None) -> list[str]:
    """Write the head `score` [D, 1] into the export in `hf_dir` (module docstring); -> the files written."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    hf = Path(hf_dir)
    weight = np.ascontiguousarray(np.asarray(score, np.float32).T)  # [1, D], as torch's Linear(D, 1).weight
    cfg = json.loads((hf / "config.json").read_text())
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    if dtype == "bfloat16":
        import ml_dtypes

        weight = weight.astype(ml_dtypes.bfloat16)
    elif dtype == "float16":
        weight = weight.astype(np.float16)
    single = hf / "model.safetensors"
    if single.exists():  # one file: rewritten with the head (transformers reads it before any index)
        with safe_open(str(single), "numpy") as st:
            tensors = {k: st.get_tensor(k) for k in st.keys()}  # noqa: SIM118 - safe_open has no __iter__
        tensors.pop("lm_head.weight", None)  # a classifier has no output projection
        tensors["score.weight"] = weight
        save_file(tensors, str(single), metadata={"format": "pt"})
        written = []
    else:  # shards: the head in a file of its own, named in the index
        save_file({"score.weight": weight}, str(hf / HEAD_FILE), metadata={"format": "pt"})
        index_path = hf / INDEX
        index = json.loads(index_path.read_text())
        index["weight_map"]["score.weight"] = HEAD_FILE
        index_path.write_text(json.dumps(index, indent=2) + "\n")
        written = [HEAD_FILE]
    cfg["architectures"] = [a.replace("ForCausalLM", "ForSequenceClassification") for a in cfg["architectures"]]
    cfg.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if pad_id is not None:
        cfg["pad_token_id"] = int(pad_id)
    (hf / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return written


def export_reward_model(workdir: str | Path, hf_dir: str | Path, tokenizer: Any) -> list[str]:
    """The head of the reward-model workdir `workdir` added to its decoder's export in `hf_dir`."""
    import jax

    from llmjax.post.rl.scoring import RewardModel

    rm = RewardModel(workdir)
    pad = getattr(tokenizer, "pad_id", None) if tokenizer is not None else None
    return add_score_head(hf_dir, jax.device_get(rm.params["score"]), pad)
