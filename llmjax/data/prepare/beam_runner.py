"""The `llmjax data prepare --runner beam` pipeline: the same shard tasks as the local run, on Beam.

Each task (a range of records of one split) becomes one element; a `Reshuffle` spreads them over
the workers and `write_shard` writes each shard exactly as the local preparation does, so both
give the same files token for token. With a curation dedup stage, a first pipeline runs
`scan_shard` over the same tasks (its files go to OUT/.curate/); the driver decides, then the
second pipeline writes the shards. Beam arguments after `--` choose the runner: by default
the local DirectRunner; on a cluster e.g. `--runner=DataflowRunner --project=P --region=R
--temp_location=gs://B/tmp --requirements_file=requirements.txt` (Spark: `--runner=SparkRunner`,
Flink: `--runner=FlinkRunner --flink_master=HOST:PORT`). Workers must see the corpus and OUT at the
same paths (a shared file system or a gcsfuse mount) and have llmjax installed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from llmjax.config import ConfigError


def run_beam(tasks: Sequence[Any], beam_args: list[str], fn: Callable[[Any], object] | None = None) -> None:
    """Run `fn` (default `write_shard`; curation's first pass is `scan_shard`) over `tasks` as a Beam pipeline (blocks
    until it finishes)."""
    try:
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise ConfigError("--runner beam needs Apache Beam: pip install 'llmjax[beam]'") from None
    if fn is None:
        from llmjax.data.prepare.shards import write_shard

        fn = write_shard
    options = PipelineOptions(beam_args or ["--runner=DirectRunner"])
    with beam.Pipeline(options=options) as p:
        _ = (p | "tasks" >> beam.Create(list(tasks)) | "spread" >> beam.Reshuffle()
             | getattr(fn, "__name__", "run") >> beam.Map(fn))
