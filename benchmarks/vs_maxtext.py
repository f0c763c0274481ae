"""llmjax against MaxText on the same shape, in alternating rounds on this machine (issue 27).

Each round runs `llmjax bench` and then MaxText's trainer on synthetic data, one process each, so both
sides pay the same load, and takes the same statistic of both: the median of `--steps` timed steps'
times after `--warmup` untimed ones (`llmjax bench --rounds STEPS --steps 1`: each of its one-step rounds
is one step's time; MaxText: its log's "seconds" per step). Until 2026-12-07 the llmjax figure was the
mean of one round of `--steps` steps instead, which one slow step (seen: 7.5 s among steps of 3.1 s) moves
where MaxText's median does not. MaxText runs in
its own Python 3.12 venv (`--maxtext-python`, with `pip install "maxtext[tpu]"`) with its fastest CPU
settings found so far: unscanned layers, `minimal_with_context` remat, `dot_product` attention, float32.
`llmjax bench` runs its steps with tcmalloc where the machine has it (`llmjax.runtime.exec_with_tcmalloc`);
with `--maxtext-tcmalloc` each round also runs MaxText with the same preload, which MaxText does not set up
itself, as a third column.

    PYTHONPATH=. python benchmarks/vs_maxtext.py --shape d256 --rounds 5
    PYTHONPATH=. python benchmarks/vs_maxtext.py --shape d512 --rounds 5

Prints each side's tokens/s median and range over rounds, best-vs-best and median-vs-median ratios,
and the load average before and after. Timings depend on the load: state it next to any figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from llmjax.runtime import find_tcmalloc, tcmalloc_environment

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # name: (d_model, heads, d_ff, batch, seq_len); 4 layers, vocab 8192, heads of 64
    "d256": (256, 4, 1024, 8, 256),
    "d512": (512, 8, 2048, 8, 512),
}
LAYERS, VOCAB = 4, 8192


def llmjax_round(shape: tuple[int, ...], steps: int, warmup: int) -> float:
    """Tokens/s of one `llmjax bench` process: its median step time over `steps` one-step rounds."""
    d, h, ff, b, L = shape
    cmd = [sys.executable, "-m", "llmjax.cli", "bench", "--json", "--rounds", str(steps), "--steps", "1",
           "--warmup", str(warmup), f"model.d_model={d}", f"model.n_heads={h}", f"model.n_kv_heads={h}",
           f"model.d_ff={ff}", f"model.n_layers={LAYERS}", f"model.vocab_size={VOCAB}", f"train.batch_size={b}",
           f"data.seq_len={L}", f"model.max_seq_len={max(L, 1024)}", "model.compute_dtype=float32",
           "model.param_dtype=float32", "mesh.data=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    step_s = json.loads(out[out.index("{"):])["step_s"]["rounds"]  # one step each
    return b * L / statistics.median(step_s)


def maxtext_round(python: str, shape: tuple[int, ...], steps: int, warmup: int, tcmalloc: bool = False) -> float:
    """Tokens/s of one MaxText run: the median step time of its steps after `warmup`."""
    d, h, ff, b, L = shape
    configs = subprocess.run([python, "-c", "import maxtext, os; print(os.path.dirname(maxtext.__file__))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="maxtext-") as out_dir:
        cmd = [python, "-m", "maxtext.trainers.pre_train.train", f"{configs}/configs/base.yml",
               "run_name=bench", f"base_output_directory={out_dir}", "dataset_type=synthetic",
               f"steps={steps + warmup}", f"per_device_batch_size={b}", f"max_target_length={L}",
               f"base_emb_dim={d}", f"base_num_query_heads={h}", f"base_num_kv_heads={h}", "head_dim=64",
               f"base_mlp_dim={ff}", f"base_num_decoder_layers={LAYERS}", f"vocab_size={VOCAB}",
               "scan_layers=False", "remat_policy=minimal_with_context", "attention=dot_product",
               "dtype=float32", "weight_dtype=float32", "enable_checkpointing=False",
               "skip_jax_distributed_system=True",
               "enable_goodput_recording=False", "monitor_goodput=False"]
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        env.pop("PYTHONPATH", None)
        if tcmalloc:
            env = tcmalloc_environment(env, find_tcmalloc()) or env
        log = subprocess.run(cmd, env=env, capture_output=True, text=True)
    text = log.stdout + log.stderr
    seconds = [float(s) for s in re.findall(r"completed step: \d+, seconds: ([0-9.]+)", text)]
    if len(seconds) <= warmup:
        raise RuntimeError(f"MaxText gave {len(seconds)} step times (exit {log.returncode}):\n{text[-3000:]}")
    return b * L / statistics.median(seconds[warmup:])


def describe(name: str, values: list[float]) -> str:
    return (f"{name:8s} tokens/s median {statistics.median(values):8,.0f}  range {min(values):,.0f}-"
            f"{max(values):,.0f}  rounds {', '.join(f'{v:,.0f}' for v in values)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="d256")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--maxtext-python", default="/work/venv-maxtext/bin/python")
    p.add_argument("--maxtext-tcmalloc", action="store_true",
                   help="also run MaxText with tcmalloc preloaded each round (a third column)")
    args = p.parse_args()
    shape = SHAPES[args.shape]
    ours: list[float] = []
    theirs: list[float] = []
    theirs_tcmalloc: list[float] = []
    load_before = os.getloadavg()
    for r in range(args.rounds):
        ours.append(llmjax_round(shape, args.steps, args.warmup))
        theirs.append(maxtext_round(args.maxtext_python, shape, args.steps, args.warmup))
        with_tcmalloc = ""
        if args.maxtext_tcmalloc:
            theirs_tcmalloc.append(maxtext_round(args.maxtext_python, shape, args.steps, args.warmup, tcmalloc=True))
            with_tcmalloc = f", MaxText with tcmalloc {theirs_tcmalloc[-1]:,.0f}"
        print(f"round {r + 1}: llmjax {ours[-1]:,.0f} tokens/s, MaxText {theirs[-1]:,.0f} tokens/s"
              f"{with_tcmalloc}, load {os.getloadavg()[0]:.1f}", flush=True)
    load_after = os.getloadavg()
    d, h, ff, b, L = shape
    print(f"shape {args.shape}: {LAYERS} layers, d_model {d}, {h} heads of 64, MLP {ff}, vocab {VOCAB}, batch {b}x{L}, "
          f"float32; {args.rounds} alternating rounds of {args.steps} timed steps")
    print(f"load average (1/5/15 min) before {'/'.join(f'{x:.1f}' for x in load_before)}, after "
          f"{'/'.join(f'{x:.1f}' for x in load_after)}")
    print(describe("llmjax", ours))
    print(describe("MaxText", theirs))
    print(f"best vs best {max(ours) / max(theirs):.2f}x, median vs median "
          f"{statistics.median(ours) / statistics.median(theirs):.2f}x")
    if theirs_tcmalloc:
        print(describe("MaxText*", theirs_tcmalloc) + "  (* with tcmalloc)")
        print(f"against MaxText*: best vs best {max(ours) / max(theirs_tcmalloc):.2f}x, median vs median "
              f"{statistics.median(ours) / statistics.median(theirs_tcmalloc):.2f}x")


if __name__ == "__main__":
    main()
