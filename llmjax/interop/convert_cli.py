"""Arguments of `llmjax convert from-hf | to-hf` (no JAX import: `llmjax --help` stays fast)."""

from __future__ import annotations

import argparse

from llmjax.config import DTYPES

CONVERT_VERBS = ("convert",)


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """Register `convert` and its two sub-verbs on the CLI's subparsers."""
    c = sub.add_parser("convert", help="import or export Hugging Face checkpoints (Llama, Mistral, Mixtral, "
                                       "Qwen2/3, Gemma, Gemma 2)")
    csub = c.add_subparsers(dest="convert_verb", required=True)
    f = csub.add_parser("from-hf", help="a Hugging Face model directory -> a workdir that train/eval/generate use")
    f.add_argument("hf_dir", metavar="HF_DIR", help="directory with config.json and *.safetensors")
    f.add_argument("workdir", metavar="WORKDIR", help="new run directory (config.yaml + checkpoints/0)")
    f.add_argument("--config", help="YAML config for everything but the model (default: "
                                    "experiments/configs/default.yaml)")
    f.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides (data, train, optim, mesh, model dtypes, ...; not the architecture)")
    t = csub.add_parser("to-hf", help="a workdir's newest checkpoint -> a Hugging Face model directory")
    t.add_argument("workdir", metavar="WORKDIR", help="a training run directory")
    t.add_argument("hf_dir", metavar="HF_DIR", help="output directory (created; must be empty)")
    t.add_argument("--dtype", choices=DTYPES, help="dtype of the written weights (default: model.param_dtype)")
    t.add_argument("--merge-lora", action="store_true",
                   help="LoRA workdir: write the merged weights (base + adapters) as a plain model; without it the "
                        "adapters alone are written in the PEFT layout")
    t.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors file, e.g. 5GB, 500MB, 2GiB or bytes (default: 5GB)")
