"""Sweeps on a cluster: N identical workers claim the points of one sweep directory.

- `lease`: the claim protocol (an atomic lease file per point with a heartbeat; a stale lease is
  taken over; attempts, DONE and FAILED markers), on a shared file system or gs://.
- `worker`: `llmjax sweep work DIR` (claim the next unfinished point, train it with a heartbeat,
  mark it, claim the next until none is left); the queue (`DIR/queue.json`) it reads.
- `broadcast`: a worker of several processes (process 0 claims and broadcasts each trainer command,
  the others run it).
- `status`: `llmjax sweep status DIR [--wait] [--json]` (per point: pending, running, done,
  failed, stale; totals, accelerator-hours spent and to go).
- `submit`: `llmjax sweep submit SPEC --executor slurm` (one Slurm job array of workers per
  resource shape, through launch/slurm_submit.sh) and the TPU command line (launch/tpu_pod.sh).
"""
