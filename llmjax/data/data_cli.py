"""Arguments of `llmjax data prepare` and `llmjax bench-data` (no JAX import: `llmjax --help` stays fast)."""

from __future__ import annotations

import argparse

DATA_VERBS = ("data", "bench-data")


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """Register `data prepare` and `bench-data` on the CLI's subparsers."""
    d = sub.add_parser("data", help="offline data preparation")
    dsub = d.add_subparsers(dest="data_verb", required=True)
    p = dsub.add_parser("prepare", help="tokenize the config's corpus into sharded array_record token files",
                        description="Tokenize data.path / data.tfds_name with the run's tokenizer (data.tokenizer, or "
                                    "one trained on the corpus) into OUT; train on it with data.path=OUT. Arguments "
                                    "after -- go to Apache Beam (with --runner beam).")
    p.add_argument("out", metavar="OUT", help="output directory (created; must be empty)")
    p.add_argument("--config", help="YAML config (default: experiments/configs/default.yaml)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1)")
    p.add_argument("--shards", type=int, default=0, help="train shards (default: one per 256 MB, at least --workers)")
    p.add_argument("--runner", choices=("local", "beam"), default="local",
                   help="local processes, or an Apache Beam pipeline (DirectRunner unless -- --runner=... says else)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    b = sub.add_parser("bench-data", help="tokens/s, time to first batch and peak memory of the input pipeline alone")
    b.add_argument("--config", help="YAML config (default: experiments/configs/default.yaml)")
    b.add_argument("--batches", type=int, default=200, help="batches timed after the first (default 200)")
    b.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides (e.g. data.workers=2)")


def run(args: argparse.Namespace, beam_args: list[str]) -> int:
    from llmjax.config import ConfigError, load_config, validate_data

    cfg = load_config(args.config, args.overrides)
    validate_data(cfg)
    if args.verb == "bench-data":
        from llmjax.data.stream.bench_data import bench_data

        if args.batches < 1:
            raise ConfigError(f"--batches must be >= 1, got {args.batches}")
        return bench_data(cfg, args.batches)
    from llmjax.data.prepare.shards import prepare

    prepare(cfg, args.out, args.workers, args.shards, args.runner, beam_args)
    return 0
