"""The scaling-law workflow: sweep specs, a sweep runner, fits and plots.

- `spec`: `experiments/sweeps/*.yaml` -> a list of `Point`s (one training run each).
- `runner`: `llmjax sweep run` (train every point, skip finished ones, resume interrupted ones)
  and `llmjax sweep collect` (one `runs.csv` row per run directory).
- `fit`: `llmjax fit` (Hoffmann et al. approaches 1-3, Kaplan-style laws, compute-optimal
  allocations, held-out predictions) -> `fit.json`.
- `plots`: `llmjax plot` (IsoFLOP curves, loss-compute frontier, N_opt(C), D_opt(C), residuals).
- `cli_args`: the argparse subcommands; importing it imports neither jax nor scipy.
"""

from llmjax.config import ConfigError


class ScalingError(ConfigError):
    """A bad sweep spec, run directory or runs.csv: reported as `llmjax: error: ...`, exit status 2."""
