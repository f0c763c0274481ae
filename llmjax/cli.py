"""`llmjax <verb>`: the command line.

  llmjax train [--config FILE] [--workdir DIR|gs://BUCKET/DIR] [--check] [section.key=value ...]
  llmjax config show [--config FILE] [section.key=value ...]
  llmjax bench [--config FILE] [--steps N] [section.key=value ...]
  llmjax mup-check [--config FILE] [--widths 64,128,...] [--steps N] [--out DIR] [section.key=value ...]
  llmjax compile --topology v5p-64 [--slices N] [--config FILE] [section.key=value ...]
  llmjax generate --workdir DIR --prompt TEXT [--temperature T --top-k K --top-p P --beams B ...]
  llmjax eval --workdir DIR [--split validation|train] [--int8]
  llmjax harness --workdir DIR --tasks T1,T2 [--num-fewshot K --limit N --include-path DIR]
  llmjax bench-generate --workdir DIR [--batch B --prompt-len P --new-tokens N]
  llmjax sweep run SPEC [--workdir DIR] [--dry-run] [--pack K] | llmjax sweep collect DIR
  llmjax fit --csv runs.csv --out DIR [--budgets 1e18,1e19] [--holdout largest]
  llmjax plot --csv runs.csv --fit DIR/fit.json --out DIR
  llmjax convert from-hf HF_DIR WORKDIR [--config FILE] [section.key=value ...]
  llmjax convert to-hf WORKDIR HF_DIR [--dtype bfloat16] [--max-shard-size 5GB]
  llmjax data prepare OUT [--config FILE] [--workers N] [--runner local|beam] [key=value ...] [-- BEAM_ARGS]
  llmjax bench-data [--config FILE] [--batches N] [section.key=value ...]

Multi-process runs (one process per host, GPU or CPU-device group) add
`--coordinator HOST:PORT --num-processes N --process-id I` (or the LLMJAX_* variables
that launch/local.sh sets); TPU pods and Slurm job steps are detected automatically.

`llmjax --version` prints the version; `llmjax train --check` validates the config, builds
the data pipeline and the model, compiles the train and eval steps and exits, writing nothing.

Exit status: 0 success; 2 usage or configuration error (reported before anything is
compiled); 1 a run that failed (e.g. a non-finite loss, or an internal error); 3 a storage
error (disk full, quota exceeded, read-only or forbidden path: the message names the path and
its free space, and checkpoints saved before are intact); 128+N after signal N (the run saved
a checkpoint and can be resumed with the same command). Every failure prints one line; the
full detail (tracebacks, library logs) goes to WORKDIR/llmjax.log, or to a temporary file
named in the message when there is no workdir. LLMJAX_DEBUG=1 shows tracebacks instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from llmjax import runlog
from llmjax.config import ConfigError, load_config
from llmjax.data import cli_args as data_cli
from llmjax.errors import EXIT_FAILED, EXIT_STORAGE, EXIT_USAGE, CheckpointError, StorageError
from llmjax.evals import cli_args as harness_cli
from llmjax.infer.cli_args import INFER_VERBS, add_arguments
from llmjax.interop import cli_args as convert_cli
from llmjax.planner import cli_args as planner_cli
from llmjax.scaling import cli_args as scaling_cli
from llmjax.storage import storage_problem


def version() -> str:
    """'llmjax X (jax Y, Python Z)' from the installed package metadata (no jax import)."""
    from importlib import metadata

    def of(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"llmjax {of('llmjax')} (jax {of('jax')}, Python {sys.version.split()[0]})"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmjax", description="Train and benchmark LLMs with JAX.")
    p.add_argument("--version", action="version", version=version())
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
    t.add_argument("--workdir", help="run directory, a path or gs://BUCKET/PATH (default: runs/<config name>)")
    t.add_argument("--check", action="store_true", help="validate, build and compile, then exit without training "
                                                        "or writing anything")
    c = sub.add_parser("config", help="print the resolved config: every key with its value, description, range "
                                      "and default")
    csub = c.add_subparsers(dest="config_verb", required=True)
    show = csub.add_parser("show", help="the resolved config as commented YAML (usable as a config file)")
    show.add_argument("--config", help="YAML config (default: experiments/configs/default.yaml)")
    show.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    b = sub.add_parser("bench", help="print tokens/s, step time, MFU, compile time and memory for a config")
    add_config_args(b)
    b.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    m = sub.add_parser("mup-check", help="muP coordinate check: every module's output RMS and its change after a "
                                         "few steps, across widths, standard vs mup (a table and a plot)")
    add_config_args(m)
    m.add_argument("--widths", default="64,128,256,512,1024", help="comma-separated model widths (d_model; d_ff "
                                                                   "keeps its ratio)")
    m.add_argument("--steps", type=int, default=5, help="train steps at a constant learning rate")
    m.add_argument("--parametrizations", default="standard,mup", help="comma-separated: standard, mup")
    m.add_argument("--out", default="runs/mup_check", help="directory for coord_check.{json,txt,png,svg}")
    add_arguments(sub)
    harness_cli.add_arguments(sub)
    scaling_cli.add_arguments(sub)
    convert_cli.add_arguments(sub)
    data_cli.add_arguments(sub)
    planner_cli.add_arguments(sub)
    return p


def _workdir(args: argparse.Namespace) -> str:
    if args.workdir is None:
        from pathlib import Path

        return str(Path("runs") / Path(args.config or "default").stem)
    if not args.workdir.strip():
        raise ConfigError("--workdir: empty path")
    return args.workdir


def _dispatch(args: argparse.Namespace, beam_args: list[str]) -> int:
    if args.verb in data_cli.DATA_VERBS:
        return data_cli.run(args, beam_args)
    if args.verb in INFER_VERBS or args.verb in convert_cli.CONVERT_VERBS or args.verb in harness_cli.HARNESS_VERBS:
        runlog.attach(None)  # orbax's and absl's logs to a temporary file, not the terminal (workdir untouched)
    if args.verb in INFER_VERBS:
        from llmjax.infer.commands import run

        return run(args)
    if args.verb in harness_cli.HARNESS_VERBS:
        return harness_cli.run(args)
    if args.verb in scaling_cli.SCALING_VERBS:
        return scaling_cli.run(args)
    if args.verb in convert_cli.CONVERT_VERBS:
        from llmjax.interop.convert import run as convert

        return convert(args)
    if args.verb in planner_cli.PLANNER_VERBS:
        from llmjax.planner.command import run as compile_for_topology

        return compile_for_topology(args)
    if args.verb in ("bench", "mup-check") and args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    cfg = load_config(args.config, args.overrides)
    if args.verb == "config":
        from llmjax.config import check_keys
        from llmjax.config.show import render

        check_keys(cfg)
        where = args.config or "the default config (experiments/configs/default.yaml)"
        print(render(cfg, where + (f" with {' '.join(args.overrides)}" if args.overrides else "")), end="")
        return 0
    workdir = _workdir(args) if args.verb == "train" else None
    from llmjax.parallel.distributed import initialize

    initialize(cfg, args.coordinator, args.num_processes, args.process_id)  # before any device use
    from llmjax.runtime import setup_jax

    setup_jax(cfg)
    if args.verb == "train":
        from llmjax.train.loop import train

        return train(cfg, workdir, check_only=args.check)
    if args.verb == "mup-check":
        return _mup_check(cfg, args)
    from llmjax.bench import bench

    return bench(cfg, args.steps)


def _mup_check_args(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    try:
        widths = [int(w) for w in args.widths.split(",") if w.strip()]
    except ValueError:
        raise ConfigError(f"--widths: {args.widths!r} is not a comma-separated list of integers") from None
    if not widths or min(widths) <= 0:
        raise ConfigError(f"--widths: {args.widths!r}: give positive widths")
    names = [p.strip() for p in args.parametrizations.split(",") if p.strip()]
    bad = [p for p in names if p not in ("standard", "mup")]
    if bad or not names:
        raise ConfigError(f"--parametrizations: {args.parametrizations!r}: each must be standard or mup")
    return widths, names


def _mup_check(cfg: Any, args: argparse.Namespace) -> int:
    from pathlib import Path

    from llmjax.scaling.mup_check import coordinate_check
    from llmjax.scaling.mup_check_report import table, write

    widths, names = _mup_check_args(args)
    check = coordinate_check(cfg, widths, args.steps, names)
    print(table(check, "act") + "\n\n" + table(check, "delta"))
    paths = write(check, Path(args.out))
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def _error(msg: str) -> None:
    print(f"llmjax: error: {msg}", file=sys.stderr, flush=True)
    runlog.record(f"error: {msg}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    beam_args: list[str] = []
    if argv[:2] == ["data", "prepare"] and "--" in argv:  # the rest goes to Apache Beam
        cut = argv.index("--")
        argv, beam_args = argv[:cut], argv[cut + 1:]
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args, beam_args)
    except ConfigError as e:
        _error(str(e))
        return EXIT_USAGE
    except StorageError as e:
        _error(str(e))
        return EXIT_STORAGE
    except KeyboardInterrupt:
        print("llmjax: interrupted", file=sys.stderr)
        return 130
    except CheckpointError as e:
        _error(str(e))
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - one line on the terminal, the traceback in the log
        if os.environ.get("LLMJAX_DEBUG"):
            sys.excepthook = sys.__excepthook__  # runlog's hook would send the traceback to the log
            raise
        reason = storage_problem(e)
        path = getattr(e, "llmjax_log", None) or runlog.record_exception(e, "unexpected failure")
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if reason is not None:
            _error(f"{reason}: {type(e).__name__}: {first[:300]} (details in {path})")
            return EXIT_STORAGE
        _error(f"{type(e).__name__}: {first[:300]} (the full traceback is in {path})")
        return EXIT_FAILED
    finally:
        runlog.detach()


if __name__ == "__main__":
    sys.exit(main())
