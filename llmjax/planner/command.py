"""`llmjax compile --topology NAME [--slices N] [--config FILE] [key=value ...]`.

Builds the real train step (`train.setup.build_setup`, the code `llmjax train` runs) for the
target's compile-only devices, lowers and compiles it with the target's compiler, and prints
the mesh, XLA's per-device memory against the chip's HBM with a fit verdict, the largest
contributors, XLA's cost analysis beside our FLOPs formula, and a roofline estimate of the step
time and MFU. Exit status: 0 fits, 1 does not fit (or the compiler failed), 2 usage errors
(bad topology name, a mesh that does not cover the topology, no libtpu) before any compile.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Iterator
from typing import Any

from llmjax.config import Config, ConfigError, load_config, mesh_axis_names, validate
from llmjax.planner import analysis
from llmjax.planner.analysis import gib
from llmjax.planner.topology import Target, load_target

EXIT_FITS, EXIT_DOES_NOT_FIT = 0, 1


def with_slices(cfg: Config, slices: int) -> Config:
    """Multi-slice: without any mesh.dcn_* size, data parallelism goes over the slices (dcn_data = N)."""
    dcn = {n: getattr(cfg.mesh, f"dcn_{n}") for n in mesh_axis_names()}
    if slices > 1 and math.prod(dcn.values()) == 1:
        return dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, dcn_data=slices))
    if math.prod(dcn.values()) != slices:
        raise ConfigError(f"mesh.dcn_* sizes multiply to {math.prod(dcn.values())}, but --slices is {slices}")
    return cfg


def ordered_devices(cfg: Config, devices: list[Any]) -> list[Any]:
    """Single-slice devices in the physical (ICI-ring) order of `mesh_utils.create_device_mesh` for the
    configured mesh, so that `build_mesh`'s reshape lays the axes out along the links."""
    from jax.experimental import mesh_utils

    from llmjax.parallel.mesh import hybrid_mesh_shape

    ici, dcn = hybrid_mesh_shape(cfg.mesh, len(devices))
    if any(s > 1 for s in dcn.values()):
        return devices  # build_mesh lays out multi-slice meshes itself
    try:
        return list(mesh_utils.create_device_mesh([ici[n] for n in mesh_axis_names()], devices).flat)
    except (ValueError, AssertionError, NotImplementedError):
        return devices


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    target = load_target(args.topology, args.slices)
    cfg = with_slices(cfg, target.slices)
    try:
        shape = validate(cfg, len(target.devices))
    except ConfigError as e:
        raise ConfigError(f"{e} (--topology {target.name} has {len(target.devices)} devices)") from None
    if cfg.model.matmul_dtype == "fp8":
        from llmjax.kernels.fp8 import check_backend

        check_backend(target.devices)
    return compile_and_report(cfg, target, shape)


def compile_train_step(cfg: Config, target: Target) -> tuple[Any, Any]:
    """(setup, compiled train step) of `cfg` for `target`'s devices; the compiler's exceptions propagate."""
    from llmjax.models.attention import compiling_for
    from llmjax.train.setup import build_setup

    with compiling_for(target.platform):
        setup = build_setup(cfg, ordered_devices(cfg, target.devices))
    return setup, _compile(setup)


@contextlib.contextmanager
def _no_persistent_cache() -> Iterator[None]:
    """Compile-only executables cannot be read back from the persistent compilation cache: skip it."""
    import jax

    enabled = jax.config.jax_enable_compilation_cache  # type: ignore[attr-defined]  # flags are dynamic attributes
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)


def _compile(setup: Any) -> Any:
    with _no_persistent_cache():
        return setup.jit_train_step().lower(setup.abstract_state, setup.abstract_batch()).compile()


def compile_and_report(cfg: Config, target: Target, shape: dict[str, int], out: Any = None) -> int:
    """Compile `cfg`'s train step for `target` and print the report to `out` (stdout). Returns the exit status."""
    import jax

    from llmjax.models.attention import compiling_for
    from llmjax.parallel.mesh import describe as describe_mesh
    from llmjax.train.setup import build_setup
    from llmjax.train.telemetry.metrics import param_counts

    out = out or sys.stdout
    say = lambda line: print(line, file=out, flush=True)  # noqa: E731
    jax.config.update("jax_threefry_partitionable", True)
    chip = target.chip
    say(f"target: {target.describe()}")
    if chip is not None:
        say(f"chip: {chip.name}: {chip.peak_flops / 1e12:.0f} TFLOP/s bf16 peak, {gib(chip.hbm_bytes)} HBM at "
            f"{chip.hbm_bytes_per_s / 1e9:,.0f} GB/s")
    with compiling_for(target.platform):
        setup = build_setup(cfg, ordered_devices(cfg, target.devices))
    m, B, L = cfg.model, cfg.train.batch_size, cfg.data.seq_len
    counts = param_counts(setup.params.shapes, setup.params.logical, m)
    fpt = setup.family.flops_per_token(L)
    tokens = B * L
    say(describe_mesh(setup.mesh))
    say(f"model: {counts['total'] / 1e6:,.1f}M params ({counts['active'] / 1e6:,.1f}M active), "
        f"{m.compute_dtype} compute{', fp8 matmuls' if m.matmul_dtype == 'fp8' else ''}, remat {m.remat}, "
        f"attention {m.attention}, loss_chunk {m.loss_chunk}; "
        f"batch {B} x {L} = {tokens:,} tokens/step")
    say(sequence_split(cfg, shape))
    t0 = time.perf_counter()
    try:
        compiled = _compile(setup)
    except Exception as e:  # noqa: BLE001 - the compiler's verdict is the answer
        return _report_failure(e, cfg, setup, shape, chip, say)
    say(f"compile: {time.perf_counter() - t0:.1f} s")
    mem = analysis.memory(compiled)
    fits = True
    if mem is None:
        say("memory per device: not available from this backend")
    else:
        hbm = chip.hbm_bytes if chip else None
        fits = hbm is None or mem.total <= hbm
        verdict = "" if hbm is None else (f" of {gib(hbm)} HBM ({100 * mem.total / hbm:.0f}%): "
                                          + ("fits" if fits else "DOES NOT FIT"))
        say(f"memory per device (XLA): {mem.describe()}{verdict}")
    _report_contributors(cfg, setup, shape, say)
    n = len(target.devices)
    model_flops = fpt * tokens / n
    xla = analysis.cost(compiled)
    scanned = " (a scanned layer loop is counted once)" if m.scan_layers else ""
    if xla is not None:
        say(f"cost per device: XLA {xla[0]:.3e} FLOPs, {xla[1]:.3e} bytes accessed{scanned}; our formula "
            f"(6N + 12*L*H*E*T per token) {model_flops:.3e} FLOPs")
    else:
        say(f"cost per device: XLA gives no cost analysis; our formula {model_flops:.3e} FLOPs")
    if chip is not None:
        r = analysis.roofline(model_flops, xla[1] if xla else None, chip)
        hbm_part = f", HBM >= {r.memory_s * 1e3:.1f} ms at {chip.hbm_bytes_per_s / 1e9:,.0f} GB/s (XLA bytes)" \
            if r.memory_s is not None else ""
        say(f"roofline per step: compute >= {r.compute_s * 1e3:.1f} ms at peak{hbm_part} -> >= "
            f"{r.step_s * 1e3:.1f} ms/step, <= {tokens / r.step_s:,.0f} tokens/s, MFU <= "
            f"{100 * r.compute_s / r.step_s:.0f}% (an upper bound: no communication, no remat recompute)")
    return EXIT_FITS if fits else EXIT_DOES_NOT_FIT


def sequence_split(cfg: Config, shape: dict[str, int]) -> str:
    """One line: the tokens each device holds, and how the sequence is split over the context axis."""
    from llmjax.config.rules.context_rules import context_size

    B, L = cfg.train.batch_size // cfg.optim.grad_accum_steps, cfg.data.seq_len
    rows = shape["data"] * shape["fsdp"] * shape["expert"]
    C = context_size(cfg, shape)
    per_device = B * L // (rows * C)
    how = (f"the sequence split over context={C} ({L // C:,} tokens of a row per device, load-balanced chunks of "
           f"{L // (2 * C):,}; attention {cfg.model.context_parallel})" if C > 1 else
           "each row whole on a device (no context axis)")
    return f"activations: {per_device:,} tokens per device and micro-step, {how}"


def _report_contributors(cfg: Config, setup: Any, shape: dict[str, int], say: Any) -> None:
    args = ", ".join(f"{label} {gib(b)}" for label, b in analysis.largest_arguments(setup.abstract_state))
    say(f"largest arguments per device: {args}")
    acts = analysis.activation_estimates(cfg, shape)
    if acts:
        say("largest activations per device (estimates): " + "; ".join(f"{w} {gib(b)} ({hint})" for w, b, hint in acts))


def _report_failure(error: BaseException, cfg: Config, setup: Any, shape: dict[str, int], chip: Any,
                    say: Any) -> int:
    temporaries = analysis.hbm_oom(error)
    if temporaries is None:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        say(f"compile failed: {first}")
        return EXIT_DOES_NOT_FIT
    hbm = f" > {gib(chip.hbm_bytes)} HBM" if chip else ""
    need = "" if math.isnan(temporaries) else f": XLA needs {gib(temporaries)} of temporaries per device"
    say(f"memory per device: DOES NOT FIT{need}{hbm} (compile-time out of memory: {str(error).splitlines()[0]})")
    _report_contributors(cfg, setup, shape, say)
    return EXIT_DOES_NOT_FIT
