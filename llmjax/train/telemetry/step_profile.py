"""Where a compiled train step's time goes: XLA's per-op times from a `jax.profiler` trace, grouped by what
the ops compute (`llmjax bench --profile`).

Each op of the compiled step (a fusion, a dot, a copy) is named in the optimised HLO, and its metadata
carries the JAX name stack it came from: the flax module path (`Block_0/attn/q/dot_general`), the
transform (`transpose(jvp(...))` is the backward pass) and the name scopes the code sets (`loss`,
`rope`, `optimizer`, `metrics`). `categorise` maps that name to a row of the breakdown; `profile_step`
traces a few steps and adds up the per-op durations the trace records on the host's XLA threads.

The durations are CPU time summed over threads (independent ops run concurrently, and one op may use
several threads), so the table gives each row's share of the summed op time and scales it to the
measured wall-clock step time; a row's milliseconds are its share of the step, not a sequential span.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax

# (key, label) in the order the table prints them
CATEGORIES: tuple[tuple[str, str], ...] = (
    ("matmul", "model matmuls (q, k, v, o, MLP)"),
    ("attention", "attention (scores, mask, softmax, x values)"),
    ("rope", "RoPE"),
    ("norm_act", "norms, activations, residuals"),
    ("embed", "embedding lookup"),
    ("lm_head", "LM head matmul"),
    ("loss", "loss (log-softmax over the vocab, z-loss)"),
    ("optimizer", "optimizer update (incl. clipping)"),
    ("metrics", "per-step metrics (grad/param norms)"),
    ("other", "other (copies, layouts, unnamed ops)"),
)

_SCOPE = re.compile(r"(?:^|[/(])({})(?:[/)]|$)")
_PROJECTION = re.compile(r"/(?:attn|mlp|moe|experts)/\w+/dot_general")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*?op_name=\"([^\"]*)\"")


def _scoped(name: str, scope: str) -> bool:
    return re.search(_SCOPE.pattern.format(re.escape(scope)), name) is not None


def categorise(op_name: str) -> tuple[str, bool]:
    """A JAX op name (HLO metadata `op_name`) -> (category key of `CATEGORIES`, whether it is backward)."""
    name = op_name.split(";")[0]
    backward = "transpose(" in name
    for scope in ("optimizer", "metrics", "loss", "rope"):
        if _scoped(name, scope):
            return scope, backward and scope in ("loss", "rope")
    if "lm_head" in name:
        return "lm_head", backward
    if "/embed" in name:
        return "embed", backward
    if _PROJECTION.search(name):
        return "matmul", backward
    if "/attn/" in name:
        return "attention", backward
    if "Transformer" in name or "Block_" in name:
        return "norm_act", backward
    return "other", backward


def op_names(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its `op_name` metadata, from a compiled module's text (`Compiled.as_text()`)."""
    return {m.group(1): m.group(2) for m in map(_INSTRUCTION.match, hlo_text.splitlines()) if m}


def op_times(trace_dir: str, names: dict[str, str]) -> dict[str, float]:
    """Instruction name -> total seconds over every thread, from the newest `*.xplane.pb` under `trace_dir`
    (events whose name is not an instruction of `names` are left out: Python frames, executor waits)."""
    from jax._src.lib import _profile_data  # jax's reader of xplane protos (no TensorBoard needed)

    files = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
    if not files:
        return {}
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in _profile_data.ProfileData.from_file(files[-1]).planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in names:
                    totals[event.name] += event.duration_ns * 1e-9
    return dict(totals)


def breakdown(times: dict[str, float], names: dict[str, str], step_s: float) -> list[dict[str, Any]]:
    """Rows {category, label, forward_ms, backward_ms, share}: each category's share of the summed op time
    (over however many traced steps), scaled to the wall-clock step time `step_s`."""
    sums: dict[tuple[str, bool], float] = collections.defaultdict(float)
    for op, seconds in times.items():
        sums[categorise(names[op])] += seconds
    total = sum(sums.values()) or 1.0
    rows = []
    for key, label in CATEGORIES:
        fwd, bwd = sums.get((key, False), 0.0), sums.get((key, True), 0.0)
        rows.append({"category": key, "label": label, "share": (fwd + bwd) / total,
                     "forward_ms": fwd / total * step_s * 1e3, "backward_ms": bwd / total * step_s * 1e3})
    return rows


def profile_step(compiled: Any, run: Callable[[], Any], step_s: float, steps: int = 3) -> list[dict[str, Any]]:
    """Trace `steps` calls of `run` (which runs the compiled step once and returns its outputs) and return
    `breakdown`'s rows; `compiled` is the `jax.stages.Compiled` step whose HLO names the ops."""
    names = op_names(compiled.as_text())
    with tempfile.TemporaryDirectory(prefix="llmjax-profile-") as trace_dir:
        with jax.profiler.trace(trace_dir):
            out = None
            for _ in range(steps):
                out = run()
            jax.block_until_ready(out)
        times = op_times(trace_dir, names)
    return breakdown(times, names, step_s)


def format_rows(rows: Sequence[dict[str, Any]], host: dict[str, float]) -> list[str]:
    """The breakdown as text lines: one per category (forward, backward, share), then the host's work."""
    out = [f"{'where the step time goes':46s} {'forward':>9s} {'backward':>9s} {'share':>6s}"]
    for r in rows:
        bwd = f"{r['backward_ms']:7.1f}ms" if r["backward_ms"] else f"{'-':>9s}"
        out.append(f"{r['label']:46s} {r['forward_ms']:7.1f}ms {bwd} {r['share'] * 100:5.1f}%")
    out += [f"{'host: ' + k:46s} {v * 1e3:7.2f}ms" for k, v in host.items()]
    return out
