"""`llmjax <verb>`: the command line.

  llmjax train [--config FILE] [--workdir DIR|gs://BUCKET/DIR] [--check] [section.key=value ...]
  llmjax config show [--config FILE] [section.key=value ...]
  llmjax bench [--config FILE] [--steps N] [--rounds R] [--json] [--profile] [section.key=value ...]
  llmjax mup-check [--config FILE] [--widths 64,128,...] [--steps N] [--out DIR] [section.key=value ...]
  llmjax compile --topology v5p-64 [--slices N] [--config FILE] [section.key=value ...]
  llmjax generate --workdir DIR --prompt TEXT [--temperature T --top-k K --top-p P --beams B ...]
  llmjax eval --workdir DIR [--split validation|train] [--quant int8,int4,int4-gptq [--quant-group-size 128]]
  llmjax harness --workdir DIR --tasks T1,T2 [--num-fewshot K --limit N --include-path DIR]
  llmjax bench-generate --workdir DIR [--batch B --prompt-len P --new-tokens N] [--quant none|int8|int4|int4-gptq]
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
error (disk full, quota exceeded, read-only or forbidden path, a path that cannot be created:
the message names the path and
its free space, and checkpoints saved before are intact); 128+N after signal N (the run saved
a checkpoint and can be resumed with the same command). Every failure prints one line; the
full detail (tracebacks, library logs) goes to WORKDIR/llmjax.log, or to a temporary file
named in the message when there is no workdir. LLMJAX_DEBUG=1 shows tracebacks instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmjax import runlog
from llmjax.config import ConfigError, load_config
from llmjax.data import data_cli
from llmjax.errors import EXIT_FAILED, EXIT_STORAGE, EXIT_USAGE, CheckpointError, StorageError
from llmjax.evals import harness_cli
from llmjax.infer import infer_cli
from llmjax.interop import convert_cli
from llmjax.planner import compile_cli as planner_cli
from llmjax.post.rl import reward_cli
from llmjax.runtime import exec_with_tcmalloc
from llmjax.scaling import scaling_cli
from llmjax.storage import free_space, storage_problem


def version() -> str:
    """'llmjax X (jax Y, Python Z)' from the installed package metadata (no jax import)."""
    from importlib import metadata

    def of(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return f"llmjax {of('llmjax')} (jax {of('jax')}, Python {sys.version.split()[0]})"


def _add_config_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--config", help="YAML config (default: experiments/configs/default.yaml)")
    sp.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    g = sp.add_argument_group("multi-process (default: auto-detect a TPU pod or Slurm step, else one process)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator")
    g.add_argument("--num-processes", type=int, metavar="N", help="number of processes in the run")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. N-1")


def _add_train(sub: Any) -> None:
    t = sub.add_parser("train", help="train a model (resumes from the workdir's newest checkpoint)")
    _add_config_args(t)
    t.add_argument("--workdir", help="run directory, a path or gs://BUCKET/PATH (default: runs/<config name>)")
    t.add_argument("--check", action="store_true", help="validate, build and compile, then exit without training "
                                                        "or writing anything")


def _add_config(sub: Any) -> None:
    c = sub.add_parser("config", help="print the resolved config: every key with its value, description, range "
                                      "and default")
    csub = c.add_subparsers(dest="config_verb", required=True)
    show = csub.add_parser("show", help="the resolved config as commented YAML (usable as a config file)")
    show.add_argument("--config", help="YAML config (default: experiments/configs/default.yaml)")
    show.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def _add_bench(sub: Any) -> None:
    b = sub.add_parser("bench", help="print tokens/s, step time, MFU, compile time and memory for a config")
    _add_config_args(b)
    b.add_argument("--steps", type=int, default=10, help="timed steps per round")
    b.add_argument("--rounds", type=int, default=5, help="timed rounds (median and range over them)")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps before the first round")
    b.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    b.add_argument("--profile", action="store_true", help="add where the step's time goes (XLA's per-op times "
                                                          "from a jax.profiler trace) and the host's work")


def _add_mup_check(sub: Any) -> None:
    m = sub.add_parser("mup-check", help="muP coordinate check: every module's output RMS and its change after a "
                                         "few steps, across widths, standard vs mup (a table and a plot)")
    _add_config_args(m)
    m.add_argument("--widths", default="64,128,256,512,1024", help="comma-separated model widths (d_model; d_ff "
                                                                   "keeps its ratio)")
    m.add_argument("--steps", type=int, default=5, help="train steps at a constant learning rate")
    m.add_argument("--parametrizations", default="standard,mup", help="comma-separated: standard, mup")
    m.add_argument("--out", default="runs/mup_check", help="directory for coord_check.{json,txt,png,svg}")


# ------------------------------------------------------------------ runners: (args, beam_args) -> exit status


def _load(args: argparse.Namespace) -> Any:
    return load_config(args.config, args.overrides)


def _start(cfg: Any, args: argparse.Namespace) -> None:
    """Join the multi-process run (before any device use) and apply the config's jax settings."""
    from llmjax.parallel.distributed import initialize

    initialize(cfg, args.coordinator, args.num_processes, args.process_id)
    from llmjax.runtime import setup_jax

    setup_jax(cfg)


def _check_steps(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")


def _run_train(args: argparse.Namespace, beam_args: list[str]) -> int:
    cfg = _load(args)
    workdir = _workdir(args)
    _start(cfg, args)
    from llmjax.train.loop import train

    return train(cfg, workdir, check_only=args.check)


def _run_config(args: argparse.Namespace, beam_args: list[str]) -> int:
    cfg = _load(args)
    from llmjax.config import check_keys
    from llmjax.config.show import render

    check_keys(cfg)
    where = args.config or "the default config (experiments/configs/default.yaml)"
    print(render(cfg, where + (f" with {' '.join(args.overrides)}" if args.overrides else "")), end="")
    return 0


def _run_bench(args: argparse.Namespace, beam_args: list[str]) -> int:
    _check_steps(args)
    if args.rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {args.rounds}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    cfg = _load(args)
    _start(cfg, args)
    from llmjax.bench import bench

    return bench(cfg, args.steps, args.rounds, args.warmup, args.json, args.profile)


def _run_mup_check(args: argparse.Namespace, beam_args: list[str]) -> int:
    _check_steps(args)
    cfg = _load(args)
    _start(cfg, args)
    return _mup_check(cfg, args)


def _detached(run: Callable[[argparse.Namespace], int]) -> Runner:
    """A workdir-reading verb: orbax's and absl's logs go to a temporary file, not the terminal (the workdir is
    not written)."""

    def runner(args: argparse.Namespace, beam_args: list[str]) -> int:
        runlog.attach(None)
        return run(args)

    return runner


def _infer(args: argparse.Namespace) -> int:
    from llmjax.infer.commands import run

    return run(args)


def _convert(args: argparse.Namespace) -> int:
    from llmjax.interop.convert import run

    return run(args)


def _compile(args: argparse.Namespace, beam_args: list[str]) -> int:
    from llmjax.planner.command import run

    return run(args)


Runner = Callable[[argparse.Namespace, list[str]], int]


@dataclass(frozen=True)
class Verb:
    """A group of `llmjax` verbs: `add(subparsers)` adds their parsers, `run(args, beam_args)` runs one."""

    names: tuple[str, ...]
    add: Callable[[Any], None]
    run: Runner


# In `llmjax --help` order. Adding a verb: one entry here (its module's imports stay inside `run`: no jax at --help).
VERBS: tuple[Verb, ...] = (
    Verb(("train",), _add_train, _run_train),
    Verb(("config",), _add_config, _run_config),
    Verb(("bench",), _add_bench, _run_bench),
    Verb(("mup-check",), _add_mup_check, _run_mup_check),
    Verb(infer_cli.INFER_VERBS, infer_cli.add_arguments, _detached(_infer)),
    Verb(harness_cli.HARNESS_VERBS, harness_cli.add_arguments, _detached(harness_cli.run)),
    Verb(scaling_cli.SCALING_VERBS, scaling_cli.add_arguments, lambda args, beam_args: scaling_cli.run(args)),
    Verb(convert_cli.CONVERT_VERBS, convert_cli.add_arguments, _detached(_convert)),
    Verb(reward_cli.REWARD_VERBS, reward_cli.add_arguments, _detached(reward_cli.run)),
    Verb(data_cli.DATA_VERBS, data_cli.add_arguments, data_cli.run),
    Verb(planner_cli.PLANNER_VERBS, planner_cli.add_arguments, _compile),
)
VERB_TABLE: dict[str, Verb] = {name: v for v in VERBS for name in v.names}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmjax", description="Train and benchmark LLMs with JAX.")
    p.add_argument("--version", action="version", version=version())
    sub = p.add_subparsers(dest="verb", required=True)
    for verb in VERBS:
        verb.add(sub)
    return p


def _workdir(args: argparse.Namespace) -> str:
    if args.workdir is None:
        from pathlib import Path

        return str(Path("runs") / Path(args.config or "default").stem)
    if not args.workdir.strip():
        raise ConfigError("--workdir: empty path")
    return args.workdir


def _dispatch(args: argparse.Namespace, beam_args: list[str]) -> int:
    return VERB_TABLE[args.verb].run(args, beam_args)


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


def _file_error(e: BaseException) -> OSError | None:
    """The OSError naming a file in `e`'s cause/context chain (a path that could not be created, opened or
    written), or None."""
    seen: set[int] = set()
    node: BaseException | None = e
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, OSError) and node.filename is not None and node.strerror:
            return node
        node = node.__cause__ or node.__context__
    return None


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the process's own command line: steps run with tcmalloc where installed (re-executes once)
        exec_with_tcmalloc(sys.argv[1:])
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
        refused = _file_error(e)
        if refused is not None:  # a path the file system refused (e.g. an --out under /proc)
            _error(f"cannot use {refused.filename}: {refused.strerror} ({free_space(refused.filename)}; details in "
                   f"{path})")
            return EXIT_STORAGE
        _error(f"{type(e).__name__}: {first[:300]} (the full traceback is in {path})")
        return EXIT_FAILED
    finally:
        runlog.detach()


if __name__ == "__main__":
    sys.exit(main())
