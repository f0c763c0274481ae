"""Training metrics: parameter counts, FLOPs per token, accelerator peaks / MFU, logging sinks.

- `param_counts`, `matmul_params`, `flops_per_token`: model size and cost (see the docstrings
  for the exact formula).
- `peak_flops`, `mfu`: the MFU denominator, from a table of published bf16 dense peaks for
  TPUs and NVIDIA GPUs, or measured once (and cached) on CPU.
- `MetricsWriter`: JSON lines + TensorBoard. `ProgressBar`: tqdm or plain log lines.
- `memory_summary`: XLA's per-device memory estimate of a compiled step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import ModelConfig
from llmjax.models.layers import mlp_matrices  # noqa: F401  (re-exported)

MIB = 1024.0**2

# ----------------------------------------------------------------------------- sizes and FLOPs


def param_counts(params: Any, logical: Any, model: ModelConfig | None = None) -> dict[str, int]:
    """`total` parameters, `non_embedding` (total minus the `embedding` role) and `active`.

    `logical`: the params' logical PartitionSpecs (same tree); roles come from them
    (`llmjax.models.roles`). Embeddings are the token table and, with learned positions, the
    position table; an untied output head counts as non-embedding. `active` is what one token uses:
    the total for a dense model; for a Mixture-of-Experts `model` every leaf with an `expert`
    dimension (routed expert matrices and their biases) counts top_k / num_experts of its size,
    while routers and shared experts count whole. Works on arrays and on abstract shapes
    (`jax.ShapeDtypeStruct`, e.g. from `jax.eval_shape`).
    """
    from jax.sharding import PartitionSpec

    from llmjax.models.roles import role_of

    specs = jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
    total = embedding = experts = 0
    for leaf, spec in zip(jax.tree.leaves(params), specs, strict=True):
        n = math.prod(getattr(leaf, "shape", np.shape(leaf)))
        total += n
        axes = tuple(spec)
        if role_of(axes) == "embedding":
            embedding += n
        if "expert" in axes:
            experts += n
    active = total
    if model is not None and model.moe.enabled:
        active = total - experts + experts * model.moe.top_k // model.moe.num_experts
    return {"total": int(total), "non_embedding": int(total - embedding), "active": int(active)}


def matmul_params(model: ModelConfig) -> int:
    """Parameters that take part in a matmul for every token (biases excluded), from the model's family
    (`ModelFamily.matmul_params`): per layer q (d·H·h) + k, v (2·d·K·h) + o (H·h·d) + its feed-forward
    kind (m·d·F for a dense MLP with m = `mlp_matrices`; for MoE the top_k and shared experts plus the
    router d·X), plus the LM head V·d (the embedding table when tied)."""
    from llmjax.models.families import build_family

    return build_family(model).matmul_params()


def flops_per_token(model: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 12·L·H·h·T (the PaLM formula, Chowdhery et al. 2022, app. B).

    Derivation. A matmul with a [d_in, d_out] weight costs 2·d_in·d_out FLOPs per token forward
    (one multiply and one add per MAC) and twice that backward (gradients w.r.t. the input and
    the weight): 6 FLOPs per matmul parameter per token, hence 6·N with N = `matmul_params(model)`
    (all dense kernels of the layers + the LM head V·d, tied or not; the embedding lookup is
    not a matmul; biases, norms, softmax and RoPE are ignored).

    For Mixture-of-Experts models N counts only the active experts and the router (see
    `matmul_params`), so MFU is measured against the active FLOPs.

    Attention adds two activation-activation matmuls per layer and head: Q·K^T and A·V, each
    T·h MACs per query token, so 2·2·T·h FLOPs forward and ×3 for forward+backward:
    12·h·T per head, i.e. 12·L·H·h·T per token with L = n_layers, H = n_heads (query heads;
    grouped KV heads do not reduce this), h = head_dim, T = seq_len.

    The causal mask is NOT taken into account: the full T keys are counted for every query,
    as in PaLM's 6N + 12·L·H·Q·T, so this is the FLOPs a dense (non-skipping) implementation
    performs, not the minimum needed (which would halve the attention term).
    Remat (recomputation) is not counted either, as usual for MFU.
    """
    from llmjax.models.families import build_family

    return build_family(model).flops_per_token(seq_len)


# ----------------------------------------------------------------------------- peak FLOP/s

# (case-insensitive substring of jax.Device.device_kind, bf16 dense peak FLOP/s per device,
# name). First match wins, so more specific patterns come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float, str], ...] = (
    ("tpu v6 lite", 918e12, "TPU v6e (Trillium)"),
    ("tpu v6e", 918e12, "TPU v6e (Trillium)"),
    ("tpu v5 lite", 197e12, "TPU v5e"),
    ("tpu v5e", 197e12, "TPU v5e"),
    ("tpu v5p", 459e12, "TPU v5p"),
    ("tpu v5", 459e12, "TPU v5p"),  # v5p reports itself as "TPU v5"
    ("tpu v4", 275e12, "TPU v4"),
    ("h100 pcie", 756e12, "NVIDIA H100 PCIe"),
    ("h100", 989e12, "NVIDIA H100 SXM"),
    ("h200", 989e12, "NVIDIA H200"),
    ("a100", 312e12, "NVIDIA A100"),
)


def lookup_peak(device_kind: str) -> tuple[float, str] | None:
    """(bf16 dense peak FLOP/s, name) for a `device_kind` string, or None when unknown."""
    kind = device_kind.lower()
    for pattern, flops, name in PEAK_BF16_FLOPS:
        if pattern in kind:
            return flops, name
    return None


def default_cache_dir() -> Path:
    """`$LLMJAX_CACHE` or `~/.cache/llmjax`."""
    return Path(os.environ.get("LLMJAX_CACHE") or Path.home() / ".cache" / "llmjax")


def cpu_model_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else `platform.processor()`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_flags_digest() -> str:
    """Short hash of the CPU feature flags: VMs with the same model name can differ (e.g. AMX hidden)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                return hashlib.sha1(flags.encode()).hexdigest()[:8]
    except OSError:
        pass
    return "noflags"


def _cpu_cache_key(compute_dtype: str) -> str:
    """Cache key: CPU model, feature-flag hash, usable CPUs, dtype, jax version."""
    return f"{cpu_model_name()}|flags {_cpu_flags_digest()}|{_cpu_count()} cpus|{compute_dtype}|jax {jax.__version__}"


def measure_matmul_flops(compute_dtype: str, n: int = 2048, seconds: float = 0.6) -> float:
    """Best observed FLOP/s of a jitted n×n matmul on the default device.

    Low-precision dtypes accumulate in float32 (`preferred_element_type`), as the model does.
    Runs for about `seconds` after compilation and a warmup call and keeps the fastest call.
    """
    dtype = jnp.dtype(compute_dtype)
    acc = jnp.float32 if dtype.itemsize < 4 else None
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=acc))
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    matmul(a, b).block_until_ready()
    best, deadline = math.inf, time.perf_counter() + seconds
    for i in range(1000):
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        t1 = time.perf_counter()
        best = min(best, t1 - t0)
        if t1 > deadline and i >= 2:
            break
    return 2.0 * n**3 / best


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def cpu_peak_flops(compute_dtype: str, cache_dir: str | os.PathLike | None = None) -> tuple[float, str]:
    """The machine's matmul FLOP/s in `compute_dtype`: measured once, then read from the cache.

    Cached in `<cache_dir>/cpu_peak_flops.json`, keyed by CPU model, a hash of the CPU feature flags,
    usable CPU count, dtype and jax version.
    The measurement is only as good as the moment it was taken: on a busy shared machine it
    comes out low (and MFU high); the 1-minute load average is stored with it, and deleting
    the entry (or the file) makes the next call measure again.
    """
    path = Path(cache_dir) if cache_dir else default_cache_dir()
    path = path / "cpu_peak_flops.json"
    key = _cpu_cache_key(compute_dtype)
    cache = _read_cache(path)
    entry = cache.get(key)
    if isinstance(entry, dict) and float(entry.get("flops", 0)) > 0:
        return float(entry["flops"]), f"CPU {compute_dtype} matmul peak measured earlier (cached in {path})"
    flops = measure_matmul_flops(compute_dtype)
    cache = _read_cache(path)  # re-read: another process may have written meanwhile
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cache[key] = {"flops": flops, "measured_at": time.time(), "load_average": load}
    try:
        _write_cache(path, cache)
        where = f"cached in {path}"
    except OSError as e:
        where = f"not cached: {e}"
    return flops, f"CPU {compute_dtype} matmul peak measured now ({where})"


def peak_flops(
    devices: Sequence[Any], compute_dtype: str, cache_dir: str | os.PathLike | None = None
) -> tuple[float, str]:
    """Total peak FLOP/s of `devices` and where the figure comes from.

    Accelerators: the sum of the published bf16 dense per-chip peaks (`PEAK_BF16_FLOPS`),
    whatever `compute_dtype` is. CPU: the machine's measured matmul rate in `compute_dtype`;
    virtual CPU devices (`--xla_force_host_platform_device_count`) share the same cores, so it is
    counted once, not per device. An unknown accelerator gives (0.0, "unknown device kind ...")
    and MFU should be reported as n/a.
    """
    devices = list(devices)
    if not devices:
        return 0.0, "no devices"
    if all(getattr(d, "platform", "") == "cpu" for d in devices):
        return cpu_peak_flops(compute_dtype, cache_dir)
    total, names = 0.0, set()
    for d in devices:
        kind = str(getattr(d, "device_kind", "?"))
        hit = lookup_peak(kind)
        if hit is None:
            return 0.0, f"unknown device kind '{kind}': no peak FLOP/s known, MFU n/a"
        total += hit[0]
        names.add(hit[1])
    return total, f"{len(devices)} x {', '.join(sorted(names))} published bf16 dense peak"


def mfu(tokens_per_second: float, flops_per_token: float, peak: float) -> float | None:
    """Model FLOPs utilisation (0..1), or None when the peak is unknown (<= 0)."""
    if peak <= 0:
        return None
    return tokens_per_second * flops_per_token / peak


# ----------------------------------------------------------------------------- metrics files

REQUIRED_KEYS = {"train": "loss", "eval": "eval_loss"}


def _to_python(value: Any) -> Any:
    """Convert numpy / jax scalars to Python numbers for JSON; leave other values as they are."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (np.generic, np.ndarray, jax.Array)) and np.ndim(value) == 0:
        return np.asarray(value).item()
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _ends_mid_line(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.seek(0, os.SEEK_END) == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


class MetricsWriter:
    """Appends one JSON object per line to `workdir/metrics.jsonl` and scalars to TensorBoard.

    Never truncates an existing metrics file (resumed runs append). With `enabled=False`
    (non-zero processes) every method is a no-op and nothing is created. `sinks` (e.g.
    `tracking.WandbSink`) get every record too: `sink.log(kind, step, values)`, `sink.close()`.
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True,
                 sinks: Sequence[Any] = ()) -> None:
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._sinks = list(sinks) if enabled else []
        if not enabled:
            return
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        self.path = workdir / "metrics.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if _ends_mid_line(self.path):
            self._file.write("\n")  # a kill -9 cut the last line: keep it on a line of its own
        if tensorboard:
            from tensorboardX import SummaryWriter

            # tensorboardX names files by second and host; a unique suffix keeps a quick restart
            # from overwriting the previous writer's event file.
            suffix = f".{os.getpid()}.{time.time_ns() % 10**9}"
            self._tb = SummaryWriter(logdir=str(workdir / "tensorboard"), filename_suffix=suffix)

    def write(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
        """Append a `kind` record for `step`; adds `"time"` (unix seconds).

        Train records must contain `loss`, eval records `eval_loss` (ValueError otherwise).
        """
        if not self.enabled or self._file is None:
            return
        required = REQUIRED_KEYS.get(kind)
        if required is not None and required not in metrics:
            raise ValueError(f"{kind} metrics must contain '{required}', got {sorted(metrics)}")
        values = {k: _to_python(v) for k, v in metrics.items()}
        record = {"kind": kind, **values, "step": int(step), "time": time.time()}
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in values.items():
                if _is_number(value):
                    self._tb.add_scalar(f"{kind}/{name}", value, int(step))
            self._tb.flush()
        for sink in self._sinks:
            sink.log(kind, int(step), values)

    def write_config(self, config: dict[str, Any], hardware: dict[str, Any]) -> None:
        """The resolved config (hparams + text) and the hardware (text) in TensorBoard."""
        if self._tb is not None:
            from llmjax.train.tracking import tensorboard_config

            tensorboard_config(self._tb, config, hardware)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for sink in self._sinks:
            sink.close()
        self._sinks = []


def read_metrics(path: str | os.PathLike, kind: str = "train") -> dict[int, dict[str, Any]]:
    """Records of `kind` in a metrics.jsonl, by step. After a resume a step may appear twice;
    the later record wins. Lines cut short by a killed process are skipped."""
    records: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("kind") == kind and "step" in record:
            records[int(record["step"])] = record
    return records


# ----------------------------------------------------------------------------- progress


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _format_stats(loss: float, tokens_per_s: float, mfu_value: float | None, lr: float) -> str:
    mfu_text = "n/a" if mfu_value is None else f"{100 * mfu_value:.1f}%"
    return f"loss {loss:.4f} | {tokens_per_s:,.0f} tok/s | MFU {mfu_text} | lr {lr:.2e}"


class ProgressBar:
    """A tqdm bar on a terminal; plain log lines every `log_every` steps otherwise (CI logs).

    `tty` overrides the terminal detection (stderr.isatty()). Disabled: every call is a no-op.
    """

    def __init__(
        self,
        total_steps: int,
        initial_step: int = 0,
        enabled: bool = True,
        log_every: int = 10,
        tty: bool | None = None,
    ) -> None:
        self.total = total_steps
        self.enabled = enabled
        self.log_every = max(int(log_every), 1)
        self._start_step = initial_step
        self._start_time = time.perf_counter()
        self._bar = None
        if enabled and (sys.stderr.isatty() if tty is None else tty):
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float, mfu: float | None, lr: float) -> None:
        """Report that `step` steps are done (absolute count, not an increment)."""
        if not self.enabled:
            return
        stats = _format_stats(float(loss), float(tokens_per_s), mfu, float(lr))
        if self._bar is not None:
            self._bar.update(max(step - self._bar.n, 0))
            self._bar.set_postfix_str(stats, refresh=False)
            return
        if step % self.log_every == 0 or step >= self.total:
            print(f"step {step}/{self.total} | {stats} | ETA {_format_eta(self._eta(step))}", flush=True)

    def _eta(self, step: int) -> float:
        done = step - self._start_step
        if done <= 0:
            return math.inf
        return (time.perf_counter() - self._start_time) / done * (self.total - step)

    def write(self, msg: str) -> None:
        """Print a message without breaking the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# ----------------------------------------------------------------------------- memory

_MEMORY_FIELDS = (
    ("arguments", "argument_size_in_bytes"),
    ("outputs", "output_size_in_bytes"),
    ("temporaries", "temp_size_in_bytes"),
    ("generated code", "generated_code_size_in_bytes"),
)


def memory_summary(compiled: Any) -> str:
    """XLA's per-device memory estimate of a `jax.stages.Compiled`, in MiB.

    total = arguments + outputs + temporaries + generated code - aliased (donated) buffers.
    Returns a short "not available" message if the backend gives no analysis or fields.
    """
    try:
        stats = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - some backends raise instead of returning None
        return f"memory analysis not available ({type(e).__name__})"
    if isinstance(stats, (list, tuple)):
        stats = stats[0] if stats else None
    if stats is None:
        return "memory analysis not available"
    parts, total, found = [], 0, False
    for label, attr in _MEMORY_FIELDS:
        value = getattr(stats, attr, None)
        if value is None:
            continue
        found = True
        total += int(value)
        parts.append(f"{label} {int(value) / MIB:.1f} MiB")
    if not found:
        return "memory analysis not available"
    alias = getattr(stats, "alias_size_in_bytes", None) or 0
    total -= int(alias)
    if alias:
        parts.append(f"aliased -{int(alias) / MIB:.1f} MiB")
    return f"{', '.join(parts)}, total {total / MIB:.1f} MiB"
