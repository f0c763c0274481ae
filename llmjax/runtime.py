"""Process-wide JAX settings that every entry point (train, bench, eval, generate, convert) applies."""

from __future__ import annotations

import os

from llmjax.config import Config


def setup_jax(cfg: Config) -> None:
    """Partitionable RNG (the same values under any sharding) and the persistent compilation
    cache in `<cache dir>/xla` unless `JAX_COMPILATION_CACHE_DIR` is set (re-runs and resumes
    skip compilation)."""
    import jax

    jax.config.update("jax_threefry_partitionable", True)
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        from llmjax.data.stream.files import resolve_cache_dir

        jax.config.update("jax_compilation_cache_dir", str(resolve_cache_dir(cfg) / "xla"))
