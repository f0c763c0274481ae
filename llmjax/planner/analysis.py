"""Figures from a compiled train step: XLA's memory and cost analyses, the largest per-device
arguments, estimates of the largest activations, and a roofline.

XLA's caveats, measured on TPU (see FIELD_NOTES): `cost_analysis()` counts the body of a loop
once, so with `model.scan_layers=true` its FLOPs and bytes cover about one layer; it is shown
beside our FLOPs formula (`train.metrics.flops_per_token`), never instead of it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax

from llmjax.config import Config
from llmjax.planner.chips import GIB, Chip


@dataclasses.dataclass
class Memory:
    """Per-device bytes from `Compiled.memory_analysis()`; total = arguments + outputs + temporaries +
    generated code - aliased (donated inputs reused as outputs)."""

    arguments: int
    outputs: int
    temporaries: int
    generated_code: int
    aliased: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries + self.generated_code - self.aliased

    def describe(self) -> str:
        parts = [f"arguments {gib(self.arguments)}", f"outputs {gib(self.outputs)}",
                 f"temporaries {gib(self.temporaries)}", f"generated code {gib(self.generated_code)}"]
        if self.aliased:
            parts.append(f"aliased -{gib(self.aliased)}")
        return f"{', '.join(parts)}; total {gib(self.total)}"


def gib(n: float) -> str:
    """Bytes as GiB (MiB below 1 GiB)."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 1024**2:.1f} MiB"


def memory(compiled: Any) -> Memory | None:
    """XLA's per-device memory analysis of `compiled`, or None when the backend gives none."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    if isinstance(stats, (list, tuple)):
        stats = stats[0] if stats else None
    if stats is None:
        return None
    field = lambda name: int(getattr(stats, name, 0) or 0)  # noqa: E731
    return Memory(field("argument_size_in_bytes"), field("output_size_in_bytes"), field("temp_size_in_bytes"),
                  field("generated_code_size_in_bytes"), field("alias_size_in_bytes"))


def cost(compiled: Any) -> tuple[float, float] | None:
    """(FLOPs, bytes accessed) per device from XLA's cost analysis, or None."""
    try:
        stats = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(stats, (list, tuple)):
        stats = stats[0] if stats else None
    if not stats or "flops" not in stats:
        return None
    return float(stats["flops"]), float(stats.get("bytes accessed", 0.0))


def hbm_oom(error: BaseException) -> float | None:
    """The temporaries (bytes) a compile-time out-of-HBM error reports, or None if it is another error."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "memory" not in text.lower():
        return None
    m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", text)
    if not m:
        return float("nan") if "Ran out of memory" in text else None
    return float(m.group(1)) * 1024.0 ** ("KMGT".index(m.group(2)) + 1)


def _shard_bytes(leaf: Any) -> int:
    sharding = getattr(leaf, "sharding", None)
    shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
    return math.prod(shape) * leaf.dtype.itemsize


def largest_arguments(abstract_state: Any, top: int = 5) -> list[tuple[str, int]]:
    """The `top` largest groups of train-state arrays per device: parameters by module and optimizer
    state by kind (e.g. "opt_state mu", "params layers/mlp"), largest first."""
    groups: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", "")))) for k in path]
        if keys[0] == "params":
            label = "params " + "/".join(keys[1:3])
        elif keys[0] == "opt_state":
            kind = next((k for k in keys[1:] if k in ("mu", "nu", "v_row", "v_col", "v", "m")), "other")
            label = f"opt_state {kind}"
        else:
            label = keys[0]
        groups[label] = groups.get(label, 0) + _shard_bytes(leaf)
    return sorted(groups.items(), key=lambda kv: -kv[1])[:top]


def activation_estimates(cfg: Config, mesh_shape: dict[str, int]) -> list[tuple[str, int, str]]:
    """(what, bytes per device, how to shrink it) for the activations that usually dominate: the
    float32 logits (dense loss) and, for the reference attention, one layer's float32 scores."""
    m, B, L = cfg.model, cfg.train.batch_size // cfg.optim.grad_accum_steps, cfg.data.seq_len
    batch_split = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1) * mesh_shape.get("expert", 1)
    tensor = mesh_shape.get("tensor", 1)
    b = max(1, B // batch_split)
    out = []
    if m.loss_chunk == 0:
        out.append((f"float32 logits [{b}, {L}, {m.vocab_size // tensor}] and their gradient",
                    2 * b * L * (m.vocab_size // tensor) * 4, "set model.loss_chunk"))
    if m.attention in ("xla", "einsum", "dot_product_attention"):
        out.append((f"float32 attention scores of one layer [{b}, {m.n_heads // tensor}, {L}, {L}]",
                    b * (m.n_heads // tensor) * L * L * 4, "model.attention=chunked or splash (TPU) / cudnn (GPU)"))
    return sorted(out, key=lambda x: -x[1])


@dataclasses.dataclass
class Roofline:
    """Step-time bounds per device: compute at the chip's peak, HBM traffic at its bandwidth."""

    compute_s: float
    memory_s: float | None

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.memory_s or 0.0)


def roofline(model_flops_per_device: float, bytes_per_device: float | None, chip: Chip) -> Roofline:
    memory_s = None if not bytes_per_device else bytes_per_device / chip.hbm_bytes_per_s
    return Roofline(model_flops_per_device / chip.peak_flops, memory_s)
