#!/usr/bin/env bash
# Run llmjax on every worker of a Cloud TPU VM slice (a pod slice such as v5p-64), or of several
# slices at once (multi-slice), detached from the ssh connections that start it.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh [options] up
       launch/tpu_pod.sh [options] run -- COMMAND [ARGS...]
       launch/tpu_pod.sh [options] logs | status | stop | delete

  up      create the slice(s), or reuse them, and install llmjax on every worker: uv (which
          brings its own Python) makes a Python --python environment with llmjax and jax[tpu],
          whatever the TPU image's system Python is
  run     `up`, then start COMMAND (e.g. `llmjax train ...`) on every worker as a detached job
          (launch/job.sh: it keeps running when the ssh connection drops or this script ends)
          and follow worker 0's log until the job ends. A dropped connection reconnects to the
          log; a preempted slice is re-created, reinstalled and the command started again, which
          resumes from the newest checkpoint (--retries). With --detach, start and return.
  logs    follow the job's log (worker --worker; `all` for every worker); ends when the job ends
  status  print the job's state on every worker
  stop    SIGTERM the job on every worker (llmjax saves a checkpoint and exits); SIGKILL after --grace
  delete  delete the slice(s) (and the queued resource)

Every worker runs the same command; llmjax finds the others through the TPU metadata (jax's
auto-detection; for several slices the queued resource's MEGASCALE settings), one process per
worker. The workdir must be one that every worker sees: a gs:// path (checkpoints and metrics
are written there directly; the VMs' service account needs write access) or a shared mount
(Filestore/NFS, gcsfuse; see --setup).

Options (defaults in brackets; also from the environment variables named):
  --name NAME            TPU VM / queued resource name [$TPU_NAME, or llmjax]
  --zone ZONE            zone [$TPU_ZONE, or us-east5-a]
  --project PROJECT      GCP project [$TPU_PROJECT, or gcloud's default]
  --type TYPE            accelerator type per slice [$TPU_TYPE, or v5p-8], e.g. v5p-64, v5litepod-16
  --version VERSION      TPU software version [$TPU_VERSION, or v2-alpha-tpuv5]
  --workers N            N independent slices NAME-w0 ... (queued resources), each running COMMAND on
                         its own with LLMJAX_WORKER=NAME-wI and LLMJAX_WORKER_PROCESSES=<hosts of
                         one --type slice>: the workers of `llmjax sweep submit --executor tpu`, whose
                         sweep directory is best a gs:// URL (run implies --detach; up/status/stop/
                         delete act on all)
  --num-slices N         N slices of --type joined over the data-centre network (multi-slice; created
                         as one queued resource with nodes NAME-0 .. NAME-(N-1)) [1]
  --queued               create through a queued resource (waits for capacity; implied by --num-slices > 1)
  --spot                 spot (preemptible) capacity
  --create-arg ARG       extra argument for the create command, e.g. --create-arg=--reserved (repeatable)
  --src DIR              llmjax source to copy to the workers [this repository]
  --remote-dir DIR       where it goes on the workers, relative to the home directory [llmjax]
  --python VERSION       Python of the workers' environment (installed by uv) [3.12]
  --venv DIR             that environment, relative to the home directory [llmjax-venv]
  --extras LIST          llmjax extras to install, comma-separated [tpu]; e.g. tpu,wandb
  --pip PACKAGE          another package to install into the environment (repeatable); gcsfs is
                         added when the command names a gs:// path
  --setup COMMAND        shell command run on every worker after installing (e.g. mount a file system)
  --env NAME=VALUE       environment variable for the job (repeatable), e.g. --env WANDB_API_KEY=...
  --job-dir DIR          the job's files (log, pid, exit status) on each worker [~/llmjax-job]
  --retries N            restarts after a preemption [3]
  --detach               run: start the job and return instead of following its log
  --worker W             logs: which worker (0, 1, ... or all) [0]
  --slice S              logs: which slice [0]
  --grace SECONDS        stop: wait this long for the checkpoint before SIGKILL [300]
  --delete-after         run: delete the slice(s) when the job has ended (successfully or not)
  --dry-run              print every command (gcloud, tar) instead of running it
  -h, --help             show this help

Example (a v5p-64: 8 workers x 4 chips; then 2 of them):
  launch/tpu_pod.sh --name llmjax-v5p --zone us-east5-a --type v5p-64 --spot \
    run -- llmjax train --config experiments/configs/llama_400m.yaml --workdir gs://MY_BUCKET/runs/v5p \
    mesh.data=-1 mesh.fsdp=8 train.batch_size=256
  launch/tpu_pod.sh --name llmjax-v5p --zone us-east5-a logs      # reattach from anywhere
  launch/tpu_pod.sh --name llmjax-v5p --zone us-east5-a stop      # checkpoint and stop
  launch/tpu_pod.sh --name llmjax-v5p --zone us-east5-a delete
  launch/tpu_pod.sh --name llmjax-2x --type v5p-64 --num-slices 2 run -- llmjax train ... \
    mesh.dcn_data=2 mesh.data=-1 mesh.fsdp=8
EOF
}

# shellcheck source-path=SCRIPTDIR source=shquote.sh
source "$(dirname "${BASH_SOURCE[0]}")/shquote.sh"

die() {
  echo "tpu_pod.sh: $*" >&2
  echo "Try 'launch/tpu_pod.sh --help'." >&2
  exit 2
}

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
all_args=("$@")
workers=0
name="${TPU_NAME:-llmjax}"
zone="${TPU_ZONE:-us-east5-a}"
project="${TPU_PROJECT:-}"
accel_type="${TPU_TYPE:-v5p-8}"
version="${TPU_VERSION:-v2-alpha-tpuv5}"
num_slices=1
queued=0
spot=0
create_args=()
src="$repo_root"
remote_dir="llmjax"
python_version="3.12"
venv="llmjax-venv"
extras="tpu"
pip_extra=()
setup_cmd=""
job_envs=()
job_dir=""
retries=3
detach=0
worker=0
slice=0
grace=300
delete_after=0
dry_run=0

need() { [[ $2 -ge 2 ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --name) need "$1" $#; name="$2"; shift 2 ;;
    --zone) need "$1" $#; zone="$2"; shift 2 ;;
    --project) need "$1" $#; project="$2"; shift 2 ;;
    --type) need "$1" $#; accel_type="$2"; shift 2 ;;
    --version) need "$1" $#; version="$2"; shift 2 ;;
    --num-slices) need "$1" $#; num_slices="$2"; shift 2 ;;
    --workers) need "$1" $#; workers="$2"; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --create-arg) need "$1" $#; create_args+=("$2"); shift 2 ;;
    --create-arg=*) create_args+=("${1#--create-arg=}"); shift ;;
    --src) need "$1" $#; src="$2"; shift 2 ;;
    --remote-dir) need "$1" $#; remote_dir="$2"; shift 2 ;;
    --python) need "$1" $#; python_version="$2"; shift 2 ;;
    --venv) need "$1" $#; venv="$2"; shift 2 ;;
    --extras) need "$1" $#; extras="$2"; shift 2 ;;
    --pip) need "$1" $#; pip_extra+=("$2"); shift 2 ;;
    --setup) need "$1" $#; setup_cmd="$2"; shift 2 ;;
    --env) need "$1" $#; job_envs+=("$2"); shift 2 ;;
    --job-dir) need "$1" $#; job_dir="$2"; shift 2 ;;
    --retries) need "$1" $#; retries="$2"; shift 2 ;;
    --detach) detach=1; shift ;;
    --worker) need "$1" $#; worker="$2"; shift 2 ;;
    --slice) need "$1" $#; slice="$2"; shift 2 ;;
    --grace) need "$1" $#; grace="$2"; shift 2 ;;
    --delete-after) delete_after=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -*) die "unknown option $1" ;;
    *) break ;;
  esac
done

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
action="$1"
shift
case "$action" in
  up | logs | status | stop | delete) [[ $# -eq 0 ]] || die "'$action' takes no arguments" ;;
  run)
    [[ $# -ge 1 && "$1" == "--" ]] || die "expected -- before the command"
    shift
    [[ $# -ge 1 ]] || die "no command given after --"
    ;;
  *) die "unknown action '$action' (up, run, logs, status, stop or delete)" ;;
esac
[[ "$retries" =~ ^[0-9]+$ ]] || die "--retries must be a whole number, got '$retries'"
[[ "$grace" =~ ^[0-9]+$ ]] || die "--grace must be a whole number of seconds, got '$grace'"
[[ "$num_slices" =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, got '$num_slices'"
[[ "$worker" =~ ^([0-9]+|all)$ ]] || die "--worker must be a worker index or 'all', got '$worker'"
[[ "$slice" =~ ^[0-9]+$ && "$slice" -lt "$num_slices" ]] || die "--slice must be in [0, --num-slices), got '$slice'"
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name must be lower-case letters, digits and '-', got '$name'"
[[ "$python_version" =~ ^3\.[0-9]+$ ]] || die "--python must look like 3.12, got '$python_version'"
py_minor="${python_version#3.}"
[[ "$py_minor" -ge 11 ]] || die "--python $python_version: llmjax needs Python >= 3.11"
[[ "$extras" =~ ^[a-z0-9_,-]*$ ]] || die "--extras must be a comma-separated list of extras, got '$extras'"
for e in "${job_envs[@]+"${job_envs[@]}"}"; do
  [[ "$e" == [A-Za-z_]*=* ]] || die "--env needs NAME=VALUE, got '$e'"
done
if [[ $num_slices -gt 1 ]]; then
  queued=1  # multi-slice needs a queued resource
fi
[[ "$workers" =~ ^[0-9]+$ ]] || die "--workers must be a whole number, got '$workers'"

# The hosts (TPU VMs) of one slice of --type: v2/v3/v4/v5p types count TensorCores (2 per chip), the
# others chips (the units of llmjax/planner/topology.py TPU_GENERATIONS); 4 chips per host, except
# that v5e/v6e slices of up to 8 chips are one host.
slice_hosts() {
  local gen="${1%-*}" n="${1##*-}" units=1 chips
  [[ "$1" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] || return 1
  case "$gen" in
    v2 | v3 | v4 | v5p) units=2 ;;
    v5e | v5litepod | v6e) units=1 ;;
    *) return 1 ;;
  esac
  chips=$((n / units))
  if [[ $units -eq 1 && $chips -le 8 ]] || [[ $chips -le 4 ]]; then echo 1; else echo $(((chips + 3) / 4)); fi
}

if [[ $workers -gt 0 ]]; then
  # One queued-resource slice per worker: this script once per slice (in parallel unless --dry-run).
  [[ $num_slices -eq 1 ]] || die "--workers and --num-slices do not mix (each worker is one slice)"
  rest=()
  skip=0
  for a in "${all_args[@]}"; do
    if [[ $skip -eq 1 ]]; then skip=0; continue; fi
    case "$a" in --workers | --name) skip=1; continue ;; esac
    rest+=("$a")
  done
  pids=()
  for ((i = 0; i < workers; i++)); do
    one=("$0" --name "$name-w$i" --queued)
    if [[ "$action" == run ]]; then
      # Every host of the slice runs the worker; process 0 (the host whose agent-worker-number is 0)
      # claims and waits for the others' acknowledgements, so it must know how many there are.
      hosts="$(slice_hosts "$accel_type")" || die "--workers: cannot tell the host count of --type '$accel_type' (known: v2, v3, v4, v5p, v5e/v5litepod, v6e types such as v5p-64)"
      one+=(--detach --env "LLMJAX_WORKER=$name-w$i" --env "LLMJAX_WORKER_PROCESSES=$hosts")
    fi
    if [[ $dry_run -eq 1 ]]; then
      "${one[@]}" "${rest[@]}"
    else
      "${one[@]}" "${rest[@]}" &
      pids+=($!)
    fi
  done
  status=0
  for pid in "${pids[@]+"${pids[@]}"}"; do
    wait "$pid" || status=$?
  done
  exit "$status"
fi

common=(--zone="$zone")
if [[ -n "$project" ]]; then
  common+=(--project="$project")
fi
# The TPU VMs: one per slice (a multi-slice queued resource names its nodes NAME-0, NAME-1, ...).
nodes=()
if [[ $num_slices -eq 1 ]]; then
  nodes=("$name")
else
  for ((i = 0; i < num_slices; i++)); do
    nodes+=("$name-$i")
  done
fi

# The script's standard output, also from inside $(...): where --dry-run prints the commands.
exec 3>&1

# Print a command (shell-quoted, so it can be pasted): on stdout and not run with --dry-run,
# else on stderr and run.
run_cmd() {
  local quoted
  quoted="$(shquote "$@")"
  if [[ $dry_run -eq 1 ]]; then
    printf '%s\n' "$quoted" >&3
    return 0
  fi
  echo "+ $quoted" >&2
  "$@"
}

ssh_node() {  # ssh_node NODE WORKER REMOTE_COMMAND
  run_cmd gcloud compute tpus tpu-vm ssh "$1" "${common[@]}" --worker="$2" --command="$3"
}

# The slice's state: a queued resource's (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...) or a
# TPU VM's (READY, PREEMPTED, CREATING, ...); NONE if it does not exist.
slice_state() {
  local cmd
  if [[ $queued -eq 1 ]]; then
    cmd=(gcloud compute tpus queued-resources describe "$name" "${common[@]}" --format='value(state.state)')
  else
    cmd=(gcloud compute tpus tpu-vm describe "$name" "${common[@]}" --format='value(state)')
  fi
  if [[ $dry_run -eq 1 ]]; then
    run_cmd "${cmd[@]}"
    echo NONE
    return 0
  fi
  "${cmd[@]}" 2>/dev/null || echo NONE
}

is_ready() { [[ "$1" == READY || "$1" == ACTIVE ]]; }

wait_ready() {
  local state
  if [[ $dry_run -eq 1 ]]; then
    slice_state >/dev/null
    return 0
  fi
  while true; do
    state="$(slice_state)"
    case "$state" in
      READY | ACTIVE) return 0 ;;
      FAILED | SUSPENDED | NONE) die "$name is ${state} while waiting for it to become ready" ;;
      *) echo "tpu_pod.sh: $name is ${state:-unknown}; waiting" >&2; sleep 60 ;;
    esac
  done
}

create() {
  local extra=("${create_args[@]+"${create_args[@]}"}")
  if [[ $spot -eq 1 ]]; then
    extra+=(--spot)
  fi
  if [[ $queued -eq 1 ]]; then
    local target=(--node-id="$name")
    if [[ $num_slices -gt 1 ]]; then
      target=(--node-count="$num_slices" --node-prefix="$name")
    fi
    run_cmd gcloud compute tpus queued-resources create "$name" "${common[@]}" "${target[@]}" \
      --accelerator-type="$accel_type" --runtime-version="$version" "${extra[@]+"${extra[@]}"}"
  else
    run_cmd gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type="$accel_type" \
      --version="$version" "${extra[@]+"${extra[@]}"}"
  fi
  wait_ready
}

delete() {
  if [[ $queued -eq 1 ]]; then
    run_cmd gcloud compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
  else
    run_cmd gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
  fi
}

# A path on the workers: absolute as given, else under the home directory (ssh starts there).
remote_path() {
  # shellcheck disable=SC2016  # "$HOME" is expanded by the worker's shell, not here
  if [[ "$1" == /* ]]; then shquote "$1"; else printf '"$HOME"/%s' "$(shquote "$1")"; fi
}

# The job's launch/job.sh invocation on a worker.
job_cmd() {
  local cmd
  cmd="$(remote_path "$remote_dir")/launch/job.sh"
  if [[ -n "$job_dir" ]]; then
    cmd+=" --dir $(remote_path "$job_dir")"
  fi
  printf '%s' "$cmd"
}

# Copy the source to every worker and make its Python environment: uv (installed if missing)
# downloads a standalone Python, so the TPU image's own Python (3.10 on current images) is not used.
install() {
  local tarball="${TMPDIR:-/tmp}/llmjax-src-$$.tar.gz" node remote dir venv_dir packages
  run_cmd tar -czf "$tarball" -C "$src" --exclude=.git --exclude=./runs --exclude=./build --exclude=.cache \
    --exclude='*.egg-info' --exclude=__pycache__ .
  dir="$(remote_path "$remote_dir")"
  venv_dir="$(remote_path "$venv")"
  packages="-e $dir$(shquote "[$extras]")"
  for p in "${pip_extra[@]+"${pip_extra[@]}"}"; do
    packages+=" $(shquote "$p")"
  done
  remote="set -eo pipefail; mkdir -p $dir; tar -xzf llmjax-src.tar.gz -C $dir"
  remote+="; export PATH=\"\$HOME/.local/bin:\$HOME/.cargo/bin:\$PATH\""
  remote+="; command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh"
  remote+="; [ -x $venv_dir/bin/python ] || uv venv --python $(shquote "$python_version") $venv_dir"
  remote+="; uv pip install --python $venv_dir/bin/python -U $packages"
  remote+="; $venv_dir/bin/python -c 'import sys, llmjax; assert sys.version_info >= (3, 11), sys.version'"
  if [[ -n "$setup_cmd" ]]; then
    remote+="; $setup_cmd"
  fi
  for node in "${nodes[@]}"; do
    run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$node:llmjax-src.tar.gz" "${common[@]}" --worker=all
    ssh_node "$node" all "$remote"
  done
  if [[ $dry_run -eq 0 ]]; then
    rm -f "$tarball"
  fi
}

# Make sure the slice(s) exist and are ready (create or re-create), then install.
up() {
  local state
  state="$(slice_state)"
  case "$state" in
    READY | ACTIVE) echo "tpu_pod.sh: reusing $name ($state)" >&2 ;;
    NONE) create ;;
    CREATING | STARTING | RESTARTING | REPAIRING | ACCEPTED | PROVISIONING | WAITING_FOR_RESOURCES)
      echo "tpu_pod.sh: $name is $state; waiting" >&2
      wait_ready
      ;;
    *)  # PREEMPTED, STOPPED, TERMINATED, SUSPENDED, FAILED, ...: start over
      echo "tpu_pod.sh: $name is $state; re-creating it" >&2
      delete
      create
      ;;
  esac
  install
}

# Start the command as a detached job on every worker of every slice.
start_job() {
  local remote node envs="" e
  for e in "${job_envs[@]+"${job_envs[@]}"}"; do
    envs+=" --env $(shquote "$e")"
  done
  remote="cd $(remote_path "$remote_dir") && PATH=$(remote_path "$venv")/bin:\"\$PATH\" $(job_cmd) start$envs -- $(shquote "$@")"
  for node in "${nodes[@]}"; do
    ssh_node "$node" all "$remote"
  done
}

follow_logs() {  # follow_logs LINES: worker 0 of slice 0 until the job ends; its exit status
  ssh_node "${nodes[$slice]}" "$worker" "$(job_cmd) logs --follow --lines $1"
}

on_all() {  # on_all JOB_ARGS: run job.sh with these arguments on every worker of every slice
  local node status=0
  for node in "${nodes[@]}"; do
    ssh_node "$node" all "$(job_cmd) $1" || status=$?
  done
  return $status
}

case "$action" in
  up) up ;;
  delete) delete ;;
  status) on_all status ;;
  stop) on_all "stop --grace $grace" ;;
  logs) follow_logs 100 ;;
  run)
    for arg in "$@"; do
      if [[ "$arg" == *gs://* ]]; then
        pip_extra+=(gcsfs)  # etils.epath reads and writes gs:// through it
        break
      fi
    done
    status=0
    attempt=0
    while true; do
      up
      start_job "$@"
      if [[ $detach -eq 1 ]]; then
        echo "tpu_pod.sh: started; follow it with '$0 --name $name --zone $zone logs', stop it with '... stop'" >&2
        exit 0
      fi
      lines=100
      lost=0
      while true; do
        set +e
        follow_logs "$lines"
        status=$?
        set -e
        [[ $dry_run -eq 0 && $status -eq 255 ]] || break
        # ssh lost the connection; the job is detached and keeps running on a healthy slice.
        state="$(slice_state)"
        is_ready "$state" || break
        lost=$((lost + 1))
        [[ $lost -le 30 ]] || { echo "tpu_pod.sh: cannot reach worker 0 (30 tries); the job may still run" >&2; break; }
        echo "tpu_pod.sh: lost the connection to the log; reconnecting (the job keeps running)" >&2
        sleep 10
        lines=20
      done
      if [[ $status -eq 0 || $dry_run -eq 1 ]]; then
        break
      fi
      state="$(slice_state)"
      if is_ready "$state" && [[ $status -ne 255 ]]; then
        echo "tpu_pod.sh: the job failed with status $status on a healthy slice; not retrying" >&2
        break
      fi
      attempt=$((attempt + 1))
      if [[ $attempt -gt $retries ]]; then
        echo "tpu_pod.sh: giving up after $retries retries (slice $state, status $status)" >&2
        break
      fi
      echo "tpu_pod.sh: slice $state, status $status: retry $attempt of $retries (resumes from the checkpoint)" >&2
    done
    if [[ $delete_after -eq 1 ]]; then
      delete
    fi
    exit "$status"
    ;;
esac
