"""`llmjax <verb>`: the command line.

  llmjax train [--config FILE] [--workdir DIR] [section.key=value ...]
  llmjax bench [--config FILE] [--steps N] [section.key=value ...]
  llmjax compile --topology v5p-64 [--slices N] [--config FILE] [section.key=value ...]
  llmjax generate --workdir DIR --prompt TEXT [--temperature T --top-k K --top-p P --beams B ...]
  llmjax eval --workdir DIR [--split validation|train] [--int8]
  llmjax bench-generate --workdir DIR [--batch B --prompt-len P --new-tokens N]
  llmjax sweep run SPEC [--workdir DIR] [--dry-run] | llmjax sweep collect DIR
  llmjax fit --csv runs.csv --out DIR [--budgets 1e18,1e19] [--holdout largest]
  llmjax plot --csv runs.csv --fit DIR/fit.json --out DIR
  llmjax convert from-hf HF_DIR WORKDIR [--config FILE] [section.key=value ...]
  llmjax convert to-hf WORKDIR HF_DIR [--dtype bfloat16] [--max-shard-size 5GB]

Multi-process runs (one process per host, GPU or CPU-device group) add
`--coordinator HOST:PORT --num-processes N --process-id I` (or the LLMJAX_* variables
that launch/local.sh sets); TPU pods and Slurm job steps are detected automatically.

Exit status: 0 success, 2 usage or configuration error (reported before anything is
compiled), 1 a run that failed (e.g. a non-finite loss), 128+N after signal N (the run
saved a checkpoint and can be resumed with the same command).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmjax.config import ConfigError, load_config
from llmjax.infer.cli_args import INFER_VERBS, add_arguments
from llmjax.interop import cli_args as convert_cli
from llmjax.planner import cli_args as planner_cli
from llmjax.scaling import cli_args as scaling_cli

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmjax", description="Train and benchmark LLMs with JAX.")
    sub = p.add_subparsers(dest="verb", required=True)

    def add_config_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="YAML config (default: experiments/configs/default.yaml)")
        sp.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
        g = sp.add_argument_group("multi-process (default: auto-detect a TPU pod or Slurm step, else one process)")
        g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator")
        g.add_argument("--num-processes", type=int, metavar="N", help="number of processes in the run")
        g.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. N-1")

    t = sub.add_parser("train", help="train a model (resumes from the workdir's newest checkpoint)")
    add_config_args(t)
    t.add_argument("--workdir", help="run directory (default: runs/<config name>)")
    b = sub.add_parser("bench", help="print tokens/s, step time, MFU, compile time and memory for a config")
    add_config_args(b)
    b.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    add_arguments(sub)
    scaling_cli.add_arguments(sub)
    convert_cli.add_arguments(sub)
    planner_cli.add_arguments(sub)
    return p


def _checkpoint_error() -> type[Exception]:
    # Imported only when an exception reaches its `except` clause: `llmjax --help` and config
    # errors stay fast (the checkpoint module imports orbax).
    from llmjax.train.checkpoint import CheckpointError

    return CheckpointError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.verb in INFER_VERBS:
            from llmjax.infer.commands import run

            return run(args)
        if args.verb in scaling_cli.SCALING_VERBS:
            return scaling_cli.run(args)
        if args.verb in convert_cli.CONVERT_VERBS:
            from llmjax.interop.convert import run as convert

            return convert(args)
        if args.verb in planner_cli.PLANNER_VERBS:
            from llmjax.planner.command import run as compile_for_topology

            return compile_for_topology(args)
        if args.verb == "bench" and args.steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {args.steps}")
        cfg = load_config(args.config, args.overrides)
        from llmjax.parallel.distributed import initialize

        initialize(cfg, args.coordinator, args.num_processes, args.process_id)  # before any device use
        from llmjax.runtime import setup_jax

        setup_jax(cfg)
        if args.verb == "train":
            from llmjax.train.loop import train

            workdir = Path(args.workdir) if args.workdir else Path("runs") / Path(args.config or "default").stem
            if workdir.exists() and not workdir.is_dir():
                raise ConfigError(f"--workdir: {workdir} exists and is not a directory")
            return train(cfg, workdir)
        if args.verb == "bench":
            from llmjax.bench import bench

            return bench(cfg, args.steps)
    except ConfigError as e:
        print(f"llmjax: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("llmjax: interrupted", file=sys.stderr)
        return 130
    except _checkpoint_error() as e:
        print(f"llmjax: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
