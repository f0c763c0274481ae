"""Arguments of `llmjax compile` (no JAX import: `llmjax --help` stays fast)."""

from __future__ import annotations

from typing import Any

PLANNER_VERBS = ("compile",)


def add_arguments(sub: Any) -> None:
    """Register `compile` on the CLI's subparsers."""
    c = sub.add_parser("compile", help="compile the train step for a TPU slice or GPU node without the hardware: "
                                       "memory, FLOPs, roofline")
    c.add_argument("--topology", required=True, metavar="NAME",
                   help="TPU accelerator type (v5e-8, v5p-64, v4-128, v6e-256) or layout (v5p:2x4x4); GPUs: h100-8, "
                        "h200-16, a100-8")
    c.add_argument("--slices", type=int, default=1, help="slices joined over DCN (default 1; sets mesh.dcn_data "
                                                          "unless a mesh.dcn_* size is given)")
    c.add_argument("--config", help="YAML config (default: experiments/configs/default.yaml)")
    c.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
