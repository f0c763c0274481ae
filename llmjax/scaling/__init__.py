"""The scaling-law workflow: sweep specs, a sweep runner, fits and plots.

- `spec`: `experiments/sweeps/*.yaml` -> a list of `Point`s (one training run each);
  `axes`: its hyperparameter axes (grids, per-size rules, fitted laws); `replicates`: seeds per point.
- `runner`: `llmjax sweep run` (train every point, skip finished ones, resume interrupted ones);
  `collect`: `llmjax sweep collect` (one `runs.csv` row per run directory, `--export` copies).
- `cluster`: `llmjax sweep submit|work|status` (workers on Slurm or TPU VMs claiming points through
  lease files, see docs/sweeps-on-a-cluster.md).
- `fit`: `llmjax fit` -> `fit.json`, from `runs` (the CSV and the --params/--loss/--flops options),
  `hparams` (best run over the hyperparameters, optimal-lr and batch-size laws), `envelope`
  (Hoffmann et al. approach 1), `chinchilla` (approaches 2 and 3, allocations, held-out
  predictions), `kaplan` (L(N), L(D), L(C)), `replicates` (intervals from the seeds' spread) and `lse`
  (the log-space Huber fit, power laws).
- `plots`: `llmjax plot` (IsoFLOP curves, loss-compute frontier, N_opt(C), D_opt(C), residuals);
  `plots_hparams`: the optimal-hyperparameter laws and the learning-rate transfer plot.
- `cli_args`: the argparse subcommands; importing it imports neither jax nor scipy.
"""

from llmjax.errors import ScalingError

__all__ = ["ScalingError"]
