"""Deviceless H100 compile of the train step with bf16 and with fp8 matmuls (`model.matmul_dtype=fp8`):
the float8 GEMMs XLA emitted, and XLA's per-device memory for each.

    JAX_PLATFORMS=cpu python3 benchmarks/fp8_hlo.py [--topology h100-1] [--config FILE] [section.key=value ...]

Needs jax's CUDA plugin (`pip install 'llmjax[gpu-compile]'`, or `pip install --target DIR
jax-cuda12-plugin==<jax version> jax-cuda12-pjrt==<jax version>` and DIR on PYTHONPATH); no GPU,
driver or CUDA libraries. The compiled HLO is searched for dots whose operands are f8e4m3fn / f8e5m2
(cuBLASLt `__cublas$lt$matmul$f8` custom calls or Triton GEMM fusions, whichever XLA picks without
autotuning) and for the dots left in bf16/f32 (attention scores, LM head, router), and every dot is
summed by its operands' dtypes (with bf16 compute: the backward dots are bf16 x bf16, `llmjax.kernels.matmul`).
Exits 1 when the fp8 step has no float8 dot (`--only compute`: the bf16 step alone).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time

import jax

from llmjax.config import load_config, validate
from llmjax.planner import analysis
from llmjax.planner.command import compile_train_step
from llmjax.planner.topology import load_target

DEF = re.compile(r"%([\w.-]+) = (\w+)\[")  # an instruction: its name and element type
DOT = re.compile(r"= (\w+)\[[^=]*? (dot|custom-call)\(%([\w.-]+), %([\w.-]+)")
CUBLAS_F8 = "__cublas$lt$matmul$f8"


def dots(hlo: str) -> collections.Counter[str]:
    """'lhs x rhs -> out (dot | cublas custom call)' -> count, over the compiled module (fusion bodies included).

    Compiled HLO names a dot's operands without their types: they are looked up from the instructions
    (and fusion parameters) that define them; names are unique within a module."""
    types = dict(DEF.findall(hlo))
    found: collections.Counter[str] = collections.Counter()
    for line in hlo.splitlines():
        m = DOT.search(line)
        if not m or (m.group(2) == "custom-call" and "matmul" not in line):
            continue
        kind = "cuBLASLt f8" if CUBLAS_F8 in line else m.group(2)
        op = line.split('op_name="', 1)[1].split('"', 1)[0].rsplit("/", 2)[-2] if 'op_name="' in line else "?"
        found[f"{types.get(m.group(3), '?')} x {types.get(m.group(4), '?')} -> {m.group(1)} ({kind}, {op})"] += 1
    return found


def operand_types(found: collections.Counter[str]) -> collections.Counter[str]:
    """`dots` summed by operand dtypes ('bf16 x bf16' -> count): a bfloat16 step's backward dots show here as
    bf16 x bf16 (`llmjax.kernels.matmul`), not f32 x f32."""
    out: collections.Counter[str] = collections.Counter()
    for op, n in found.items():
        out[op.split(" ->", 1)[0]] += n
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="h100-1")
    p.add_argument("--config", default=None)
    p.add_argument("--dump", default=None, help="write each compiled HLO to DUMP.<matmul_dtype>.txt")
    p.add_argument("--only", choices=("compute", "fp8"), default=None, help="compile this matmul_dtype only")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    jax.config.update("jax_threefry_partitionable", True)
    target = load_target(args.topology)
    print(f"target: {target.describe()}; jax {jax.__version__}")
    fp8_dots = 0
    for matmul in (args.only,) if args.only else ("compute", "fp8"):
        cfg = load_config(args.config, [*args.overrides, "model.compute_dtype=bfloat16",
                                        f"model.matmul_dtype={matmul}"])
        validate(cfg, len(target.devices))
        t0 = time.perf_counter()
        _, compiled = compile_train_step(cfg, target)
        hlo = compiled.as_text()
        if args.dump:
            with open(f"{args.dump}.{matmul}.txt", "w") as f:
                f.write(hlo)
        mem = analysis.memory(compiled)
        cost = analysis.cost(compiled)
        print(f"\n== model.matmul_dtype={matmul} (compute bfloat16): compiled in {time.perf_counter() - t0:.1f} s")
        if mem is not None:
            print(f"memory per device: arguments {analysis.gib(mem.arguments)}, "
                  f"temporaries {analysis.gib(mem.temporaries)}, total {analysis.gib(mem.total)}")
        cost_text = "none from this backend" if cost is None else f"{cost[0]:.3g} FLOPs, {cost[1]:.3g} bytes"
        print(f"cost analysis: {cost_text}")
        for op, n in sorted(dots(hlo).items()):
            print(f"  {n:4d} x {op}")
        print("dots by operand dtypes: " + ", ".join(f"{k}: {n}" for k, n in sorted(operand_types(dots(hlo)).items())))
        if matmul == "fp8":
            fp8_dots = sum(n for op, n in dots(hlo).items() if "f8" in op.split("->")[0])
            print(f"float8 dots: {fp8_dots}")
    return 0 if fp8_dots or args.only == "compute" else 1


if __name__ == "__main__":
    sys.exit(main())
