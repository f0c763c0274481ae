"""`llmjax sweep run|collect|submit|work|status`, `llmjax fit`, `llmjax plot`: arguments and dispatch.

Importing this module imports neither jax, numpy, scipy nor matplotlib (`llmjax --help` stays fast).
"""

from __future__ import annotations

import argparse
import os

SCALING_VERBS = ("sweep", "fit", "plot")


def add_arguments(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sweep", help="run a scaling sweep (experiments/sweeps/*.yaml) or collect its runs.csv")
    ssub = s.add_subparsers(dest="sweep_verb", required=True)
    r = ssub.add_parser("run", help="train every point of a sweep spec in order (finished ones skipped, "
                                    "interrupted ones resumed)")
    r.add_argument("spec", help="sweep spec YAML (see llmjax/scaling/sweep/spec.py)")
    r.add_argument("--workdir", help="sweep directory, one sub-directory per point (default: runs/sweeps/<name>)")
    r.add_argument("--dry-run", action="store_true", help="print one launch command per point and exit")
    r.add_argument("--launcher", default="", metavar="PREFIX",
                   help="prefix of each --dry-run command, e.g. 'launch/slurm_submit.sh ... --'")
    r.add_argument("--keep-going", action="store_true",
                   help="after a failing point (e.g. a diverging learning rate) mark it FAILED and go on "
                        "(exit status 1 at the end if any failed)")
    r.add_argument("--pack", type=int, default=1, metavar="K",
                   help="train up to K points of the same shape (differing only in seed, optim.lr, b1, b2, "
                        "weight_decay) together in one compiled program, each written as if trained alone "
                        "(default 1: one at a time)")
    r.add_argument("--pack-mode", default="auto", choices=("auto", "vmap", "map"),
                   help="how a pack maps its points: vmap (batched into every op: accelerators), map (lax.map: the "
                        "lone step K times in one program: CPU); auto (default): map on CPU, else vmap")
    _add_cluster_verbs(ssub)
    c = ssub.add_parser("collect", help="write DIR/runs.csv from the run directories under DIR")
    c.add_argument("dir", help="sweep directory")
    c.add_argument("--out", help="CSV path (default: DIR/runs.csv)")
    c.add_argument("--export", metavar="DIR", help="write DIR/runs.csv plus each run's config and training curve "
                                                  "(DIR/runs/<name>/), a small copy that `llmjax fit` reads as it is")

    f = sub.add_parser("fit", help="fit scaling laws (Hoffmann approaches 1-3, Kaplan) to a runs.csv")
    f.add_argument("--csv", required=True, help="runs CSV: params, tokens, loss (or final_loss)[, flops, budget, "
                                                 "point, workdir, ...] (see llmjax/scaling/laws/runs.py), or a sweep "
                                                 "directory (its runs.csv)")
    f.add_argument("--out", required=True, help="output directory for fit.json")
    f.add_argument("--budgets", help="comma-separated FLOPs budgets for compute-optimal N, D (e.g. 1e18,1e19)")
    f.add_argument("--holdout", help="'largest' (the largest IsoFLOP budget) or a FLOPs value: refit without "
                                     "those runs and predict their losses")
    f.add_argument("--bootstrap", type=int, default=100,
                   help="bootstrap refits for approach 3's intervals, and for the intervals from the replicate spread "
                        "(several seeds per point)")
    f.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    _add_run_options(f)

    p = sub.add_parser("plot", help="plot IsoFLOP curves, the frontier, N_opt(C), D_opt(C) and residuals")
    p.add_argument("--csv", required=True, help="runs CSV, or a sweep directory (its runs.csv)")
    p.add_argument("--fit", help="fit.json from `llmjax fit` (its options choose N, L and C); needed by the "
                                 "scaling plots")
    p.add_argument("--out", required=True, help="output directory (PNG and SVG)")
    p.add_argument("--kind", choices=("scaling", "lr-transfer"), default="scaling",
                   help="scaling: IsoFLOP curves, frontier, N_opt/D_opt, residuals (default); lr-transfer: loss "
                        "against learning rate per width, one panel per parametrization")
    p.add_argument("--loss", help="lr-transfer: the loss column (default final_loss)")


def _add_cluster_verbs(ssub: argparse._SubParsersAction) -> None:
    """`sweep submit`, `sweep work`, `sweep status` (llmjax/scaling/cluster/)."""
    s = ssub.add_parser("submit", help="start N identical workers on a cluster that claim the sweep's points "
                                       "(see llmjax/scaling/cluster/submit.py)")
    s.add_argument("spec", help="sweep spec YAML")
    s.add_argument("--executor", required=True, choices=("slurm", "tpu"),
                   help="slurm: a job array through launch/slurm_submit.sh; tpu: slices through launch/tpu_pod.sh")
    s.add_argument("--workers", type=int, required=True, metavar="N", help="identical workers (per resource shape)")
    s.add_argument("--workdir", help="sweep directory on a file system every worker sees "
                                     "(default: runs/sweeps/<name>)")
    s.add_argument("--gpus-per-worker", type=int, default=8, metavar="G", help="GPUs per node of a worker "
                                                                                "(0: CPU workers) [8]")
    s.add_argument("--nodes-per-worker", type=int, default=1, metavar="N", help="nodes per worker [1]")
    s.add_argument("--cpus-per-task", type=int, help="CPUs per worker process (slurm_submit.sh's default: 8 per GPU, "
                                                     "1 for a CPU worker)")
    s.add_argument("--partition", help="Slurm partition")
    s.add_argument("--account", help="Slurm account")
    s.add_argument("--time", default="24:00:00", help="Slurm time limit per worker (requeued after it) [24:00:00]")
    s.add_argument("--venv", help="virtual environment activated in every worker")
    s.add_argument("--env-setup", help="shell command run in every worker first (module load, conda activate...)")
    s.add_argument("--container", help="container image of the workers (pyxis)")
    s.add_argument("--container-mounts", help="container mounts, e.g. /shared:/shared")
    s.add_argument("--lease-seconds", type=float, default=600.0,
                   help="a point whose worker has not renewed its lease for this long is taken over [600]")
    s.add_argument("--retries", type=int, default=2, help="retries of a failing point before it is FAILED [2]")
    s.add_argument("--pack", type=int, default=1, metavar="K", help="each worker trains up to K points of one "
                                                                    "shape together (as sweep run --pack) [1]")
    s.add_argument("--tpu-type", default="v5p-8", help="tpu: accelerator type of each worker's slice [v5p-8]")
    s.add_argument("--tpu-name", help="tpu: name prefix of the slices [sweep-<name>]")
    s.add_argument("--zone", help="tpu: zone")
    s.add_argument("--project", help="tpu: GCP project")
    s.add_argument("--dry-run", action="store_true", help="print the submission command(s); submit nothing")
    w = ssub.add_parser("work", help="claim and train a submitted sweep's points until none is left (what each "
                                     "worker of `sweep submit` runs)")
    w.add_argument("dir", help="sweep directory (with queue.json)")
    w.add_argument("--resources", help="only the points of this resource shape (NODESxGPUS, set by sweep submit)")
    w.add_argument("--worker", help="this worker's name (default: the Slurm array task, else host-pid)")
    st = ssub.add_parser("status", help="the points of a submitted sweep: pending, running, stale, done, failed")
    st.add_argument("dir", help="sweep directory (with queue.json)")
    st.add_argument("--wait", action="store_true", help="wait until every point is done or failed; exit status 0 "
                                                        "only when all are done")
    st.add_argument("--json", action="store_true", help="print JSON instead of the table")
    st.add_argument("--every", type=float, default=5.0, help="--wait: seconds between looks [5]")
    st.add_argument("--grace", type=float, help="--wait: give up (exit status 4) when points are left and no worker "
                                                "has been alive this many seconds [the sweep's --lease-seconds]")


def _add_run_options(f: argparse.ArgumentParser) -> None:
    f.add_argument("--params", default="total", choices=("total", "non_embedding", "active"),
                   help="N: the params, non_embedding_params or active_params column (default total)")
    f.add_argument("--loss", help="the loss column (default: loss, else final_loss; final_bpb: bits per byte)")
    f.add_argument("--flops", default="formula", choices=("formula", "xla", "6nd"),
                   help="C: the flops column (our formula; default), flops_xla (XLA's cost analysis of the compiled "
                        "step) or 6*N*D")
    f.add_argument("--select", default="best", choices=("best", "all"),
                   help="with several runs per (N, D) (hyperparameter axes): fit the best of each (default) or all")
    f.add_argument("--hparams", metavar="COLS",
                   help="comma-separated hyperparameter columns "
                        "(default: detected, see llmjax/scaling/laws/hparams.py)")


def run(args: argparse.Namespace) -> int:
    # The fits are tiny: BLAS threads only contend (set before numpy is first imported).
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    if args.verb == "sweep" and args.sweep_verb == "run":
        from pathlib import Path

        from llmjax.scaling.sweep.runner import run_sweep
        from llmjax.scaling.sweep.spec import load_sweep

        sweep = load_sweep(args.spec)
        workdir = Path(args.workdir) if args.workdir else Path("runs") / "sweeps" / sweep.name
        return run_sweep(sweep, workdir, dry_run=args.dry_run, prefix=args.launcher, keep_going=args.keep_going,
                         pack=args.pack, pack_mode=args.pack_mode)
    if args.verb == "sweep" and args.sweep_verb in ("submit", "work", "status"):
        return _cluster(args)
    if args.verb == "sweep":
        from llmjax.scaling.sweep.runner import collect

        collect(args.dir, args.out, export=args.export)
        return 0
    if args.verb == "fit":
        import json

        from llmjax.scaling.laws.fit import summary, write_fit

        if args.bootstrap < 0:
            from llmjax.scaling import ScalingError

            raise ScalingError(f"--bootstrap must be >= 0, got {args.bootstrap}")
        path = write_fit(args.csv, args.out, args.budgets, args.holdout, args.bootstrap, args.seed, params=args.params,
                         loss=args.loss, flops=args.flops, select=args.select, hparams=args.hparams)
        print(summary(json.loads(path.read_text())))
        print(f"wrote {path}")
        return 0
    if args.kind == "lr-transfer":
        from llmjax.scaling.plots_hparams import write_lr_transfer

        paths = write_lr_transfer(args.csv, args.out, loss=args.loss)
    else:
        from llmjax.scaling import ScalingError
        from llmjax.scaling.plots import write_plots

        if not args.fit:
            raise ScalingError("llmjax plot: --fit FIT.json is needed for the scaling plots (--kind scaling)")
        paths = write_plots(args.csv, args.fit, args.out)
    for path in paths:
        print(f"wrote {path}")
    return 0


def _cluster(args: argparse.Namespace) -> int:
    if args.sweep_verb == "submit":
        import sys

        from llmjax.scaling.cluster.submit import submit
        from llmjax.scaling.sweep.spec import load_sweep

        args.python = ["python3"] if (args.venv or args.env_setup or args.container) else [sys.executable]
        return submit(args, load_sweep(args.spec))
    if args.sweep_verb == "work":
        from llmjax.scaling.cluster.worker import work

        return work(args.dir, args.worker, args.resources)
    from llmjax.scaling.cluster.status import status_main

    return status_main(args.dir, wait=args.wait, as_json=args.json, every=args.every, grace=args.grace)
