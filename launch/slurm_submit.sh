#!/usr/bin/env bash
# Submit launch/slurm_gpu.sbatch with the node, GPU and task counts filled in consistently.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/slurm_submit.sh [options] -- COMMAND [ARGS...]

Submits launch/slurm_gpu.sbatch, which runs COMMAND (e.g. `llmjax train --workdir
/shared/runs/x ...`) with srun on every node as one jax.distributed run.

Options:
  --nodes N            nodes [8]
  --gpus-per-node G    GPUs per node [8]; 0: a CPU job (no GPUs requested)
  --tasks-per-node T   a CPU job's processes per node [1] (with GPUs: set by --per-gpu/--per-node)
  --array SPEC         submit a job array (sbatch --array), e.g. 0-3 for 4 identical workers
  --per-gpu            one process per GPU (default)
  --per-node           one process per node, seeing all its GPUs
  --partition P        Slurm partition
  --account A          Slurm account
  --time T             time limit [24:00:00]
  --job-name NAME      job name [llmjax]
  --cpus-per-task C    CPUs per process [8 per GPU / 8*G per node]
  --output FILE        Slurm output file (appended to across requeues) [llmjax-%j.out]
  --grace SECONDS      signal the job this long before its time limit to checkpoint and requeue [180]
  --max-restarts N     requeue after the time limit at most N times [20]
  --no-requeue         neither requeue after the time limit nor let Slurm requeue the job
  --env-setup CMD      shell command run in every task before COMMAND (module load, conda activate, ...)
  --venv DIR           activate this virtual environment in every task
  --container-image I  run the tasks in this container image (pyxis: srun --container-image)
  --container-mounts M container mounts, e.g. /shared:/shared
  --srun-arg ARG       extra srun argument (repeatable)
  --port PORT          the jax.distributed coordinator's port [12000 + job id % 20000]
  --xla-flags FLAGS    XLA flags instead of the recommended GPU flags ('' for none)
  --dry-run            print the sbatch command and the srun line the job would run; submit nothing
  -h, --help           show this help

The job is requeued (and resumes from its checkpoint) after a node failure, a preemption or,
up to --max-restarts times, its time limit; see launch/slurm_gpu.sbatch --help.

Example (8 nodes x 8 H100):
  launch/slurm_submit.sh --nodes 8 --gpus-per-node 8 --partition h100 --venv /shared/venvs/llmjax -- \
    llmjax train --config experiments/configs/llama_400m.yaml --workdir /shared/runs/h100 mesh.fsdp=8
USAGE
}

# shellcheck source-path=SCRIPTDIR source=shquote.sh
source "$(dirname "${BASH_SOURCE[0]}")/shquote.sh"

die() {
  echo "slurm_submit.sh: $*" >&2
  echo "Try 'launch/slurm_submit.sh --help'." >&2
  exit 2
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nodes=8
gpus=8
mode=per-gpu
partition=""
account=""
time_limit="24:00:00"
job_name="llmjax"
cpus=""
output="llmjax-%j.out"
grace=180
requeue=1
job_args=()
dry_run=0
tasks_cpu=1
array=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --nodes) [[ $# -ge 2 ]] || die "--nodes needs a value"; nodes="$2"; shift 2 ;;
    --gpus-per-node) [[ $# -ge 2 ]] || die "--gpus-per-node needs a value"; gpus="$2"; shift 2 ;;
    --tasks-per-node) [[ $# -ge 2 ]] || die "--tasks-per-node needs a value"; tasks_cpu="$2"; shift 2 ;;
    --array) [[ $# -ge 2 ]] || die "--array needs a value"; array="$2"; shift 2 ;;
    --per-gpu) mode=per-gpu; shift ;;
    --per-node) mode=per-node; shift ;;
    --partition) [[ $# -ge 2 ]] || die "--partition needs a value"; partition="$2"; shift 2 ;;
    --account) [[ $# -ge 2 ]] || die "--account needs a value"; account="$2"; shift 2 ;;
    --time) [[ $# -ge 2 ]] || die "--time needs a value"; time_limit="$2"; shift 2 ;;
    --job-name) [[ $# -ge 2 ]] || die "--job-name needs a value"; job_name="$2"; shift 2 ;;
    --cpus-per-task) [[ $# -ge 2 ]] || die "--cpus-per-task needs a value"; cpus="$2"; shift 2 ;;
    --output) [[ $# -ge 2 ]] || die "--output needs a value"; output="$2"; shift 2 ;;
    --grace) [[ $# -ge 2 ]] || die "--grace needs a value"; grace="$2"; shift 2 ;;
    --no-requeue) requeue=0; job_args+=(--no-requeue); shift ;;
    --max-restarts | --env-setup | --venv | --container-image | --container-mounts | --srun-arg | --xla-flags | --port)
      [[ $# -ge 2 ]] || die "$1 needs a value"; job_args+=("$1" "$2"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) die "unknown option $1 (the command goes after --)" ;;
  esac
done
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$nodes'"
[[ "$gpus" =~ ^[0-9]+$ ]] || die "--gpus-per-node must be a whole number, got '$gpus'"
[[ "$tasks_cpu" =~ ^[1-9][0-9]*$ ]] || die "--tasks-per-node must be a positive integer, got '$tasks_cpu'"
[[ -z "$array" || "$array" =~ ^[0-9][-0-9,:%]*$ ]] || die "--array must be a Slurm array spec like 0-3, got '$array'"
[[ "$grace" =~ ^[1-9][0-9]*$ ]] || die "--grace must be a positive number of seconds, got '$grace'"

if [[ "$gpus" -eq 0 ]]; then
  tasks="$tasks_cpu"
  cpus="${cpus:-1}"
elif [[ "$mode" == per-gpu ]]; then
  tasks="$gpus"
  cpus="${cpus:-8}"
else
  tasks=1
  cpus="${cpus:-$((8 * gpus))}"
fi
[[ "$cpus" =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-task must be a positive integer, got '$cpus'"

# --gpus-per-node=0 overrides the script's own #SBATCH --gpus-per-node=8 (a CPU job).
sbatch_args=(--job-name="$job_name" --nodes="$nodes" --gpus-per-node="$gpus"
  --ntasks-per-node="$tasks" --cpus-per-task="$cpus" --time="$time_limit" --output="$output"
  --open-mode=append --signal="B:USR1@$grace")
if [[ -n "$array" ]]; then
  sbatch_args+=(--array="$array")
fi
if [[ $requeue -eq 1 ]]; then
  sbatch_args+=(--requeue)
else
  sbatch_args+=(--no-requeue)
fi
if [[ -n "$partition" ]]; then
  sbatch_args+=(--partition="$partition")
fi
if [[ -n "$account" ]]; then
  sbatch_args+=(--account="$account")
fi
cmd=(sbatch "${sbatch_args[@]}" "$here/slurm_gpu.sbatch" "--$mode" "${job_args[@]+"${job_args[@]}"}" -- "$@")

if [[ $dry_run -eq 1 ]]; then
  quoted="$(shquote "${cmd[@]}")"
  printf '%s\n' "$quoted"
  # The srun line the job will run (its first node is only known once the job starts).
  SLURM_JOB_NUM_NODES="$nodes" SLURM_GPUS_ON_NODE="$gpus" SLURM_NTASKS_PER_NODE="$tasks" SLURM_CPUS_PER_TASK="$cpus" \
    SLURM_JOB_NODELIST="" \
    "$here/slurm_gpu.sbatch" --dry-run "--$mode" "${job_args[@]+"${job_args[@]}"}" -- "$@"
  exit 0
fi
exec "${cmd[@]}"
