#!/usr/bin/env bash
# Run an llmjax command on every worker of a Cloud TPU VM slice (a pod slice such as v5p-64).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh [options] run -- COMMAND [ARGS...]
       launch/tpu_pod.sh [options] up
       launch/tpu_pod.sh [options] delete

  up      create the TPU VM slice (or reuse it if it exists) and install llmjax on every worker
  run     `up`, then run COMMAND (e.g. `llmjax train ...`) on every worker at once, streaming
          their output; if the slice is preempted or the connection drops, wait for it (re-create
          it if needed), reinstall and run the same command again, which resumes from the newest
          checkpoint in the workdir (use a workdir every worker shares: a gcsfuse or NFS mount)
  delete  delete the slice (and its queued resource)

Every worker runs the same command; llmjax finds the other workers through the TPU
metadata (jax.distributed auto-detection), one process per worker.

Options (defaults in brackets; also from the environment variables named):
  --name NAME            TPU VM / queued resource name [$TPU_NAME, or llmjax]
  --zone ZONE            zone [$TPU_ZONE, or us-east5-a]
  --project PROJECT      GCP project [$TPU_PROJECT, or gcloud's default]
  --type TYPE            accelerator type [$TPU_TYPE, or v5p-8], e.g. v5p-64, v5litepod-16
  --version VERSION      TPU software version [$TPU_VERSION, or v2-alpha-tpuv5]
  --queued               create through a queued resource (waits for capacity)
  --spot                 spot (preemptible) capacity
  --src DIR              llmjax source to copy to the workers [this repository]
  --remote-dir DIR       where it goes on the workers [llmjax]
  --setup COMMAND        extra shell command run on every worker after installing (e.g. mount a bucket)
  --retries N            re-runs after preemption or lost connection [3]
  --delete-after         delete the slice when `run` ends (successfully or not)
  --dry-run              print the gcloud commands instead of running them
  -h, --help             show this help

Example:
  launch/tpu_pod.sh --name llmjax-v5p --zone us-east5-a --type v5p-64 --spot --delete-after \
    run -- llmjax train --config experiments/configs/default.yaml --workdir /mnt/runs/v5p \
    mesh.data=-1 mesh.fsdp=8 train.batch_size=256
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
name="${TPU_NAME:-llmjax}"
zone="${TPU_ZONE:-us-east5-a}"
project="${TPU_PROJECT:-}"
accel_type="${TPU_TYPE:-v5p-8}"
version="${TPU_VERSION:-v2-alpha-tpuv5}"
queued=0
spot=0
src="$repo_root"
remote_dir="llmjax"
setup_cmd=""
retries=3
delete_after=0
dry_run=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --name) [[ $# -ge 2 ]] || die "--name needs a value"; name="$2"; shift 2 ;;
    --zone) [[ $# -ge 2 ]] || die "--zone needs a value"; zone="$2"; shift 2 ;;
    --project) [[ $# -ge 2 ]] || die "--project needs a value"; project="$2"; shift 2 ;;
    --type) [[ $# -ge 2 ]] || die "--type needs a value"; accel_type="$2"; shift 2 ;;
    --version) [[ $# -ge 2 ]] || die "--version needs a value"; version="$2"; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --src) [[ $# -ge 2 ]] || die "--src needs a value"; src="$2"; shift 2 ;;
    --remote-dir) [[ $# -ge 2 ]] || die "--remote-dir needs a value"; remote_dir="$2"; shift 2 ;;
    --setup) [[ $# -ge 2 ]] || die "--setup needs a value"; setup_cmd="$2"; shift 2 ;;
    --retries) [[ $# -ge 2 ]] || die "--retries needs a value"; retries="$2"; shift 2 ;;
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
  up | delete) [[ $# -eq 0 ]] || die "'$action' takes no arguments" ;;
  run)
    [[ $# -ge 1 && "$1" == "--" ]] || die "expected -- before the command"
    shift
    [[ $# -ge 1 ]] || die "no command given after --"
    ;;
  *) die "unknown action '$action' (up, run or delete)" ;;
esac
[[ "$retries" =~ ^[0-9]+$ ]] || die "--retries must be a whole number, got '$retries'"
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name must be lower-case letters, digits and '-', got '$name'"

common=(--zone="$zone")
if [[ -n "$project" ]]; then
  common+=(--project="$project")
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

# The slice's state (READY, PREEMPTED, CREATING, ...), or NONE if it does not exist.
tpu_state() {
  if [[ $dry_run -eq 1 ]]; then
    run_cmd gcloud compute tpus tpu-vm describe "$name" "${common[@]}" --format='value(state)'
    echo NONE
    return 0
  fi
  gcloud compute tpus tpu-vm describe "$name" "${common[@]}" --format='value(state)' 2>/dev/null || echo NONE
}

create() {
  local extra=()
  if [[ $spot -eq 1 ]]; then
    extra+=(--spot)
  fi
  if [[ $queued -eq 1 ]]; then
    run_cmd gcloud compute tpus queued-resources create "$name" "${common[@]}" --node-id="$name" \
      --accelerator-type="$accel_type" --runtime-version="$version" "${extra[@]}"
    if [[ $dry_run -eq 1 ]]; then
      run_cmd gcloud compute tpus queued-resources describe "$name" "${common[@]}" --format='value(state.state)'
      return 0
    fi
    local state=""
    while [[ "$state" != ACTIVE ]]; do
      state="$(gcloud compute tpus queued-resources describe "$name" "${common[@]}" --format='value(state.state)')"
      case "$state" in
        FAILED | SUSPENDED) die "queued resource $name is $state" ;;
        ACTIVE) ;;
        *) echo "tpu_pod.sh: queued resource $name is ${state:-unknown}; waiting" >&2; sleep 60 ;;
      esac
    done
  else
    run_cmd gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type="$accel_type" \
      --version="$version" "${extra[@]}"
  fi
}

delete() {
  if [[ $queued -eq 1 ]]; then
    run_cmd gcloud compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
  else
    run_cmd gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
  fi
}

# Copy the source to every worker and install it (with JAX for TPU).
install() {
  local tarball="${TMPDIR:-/tmp}/llmjax-src-$$.tar.gz"
  run_cmd tar -czf "$tarball" -C "$src" --exclude=.git --exclude=runs --exclude=.cache --exclude='*.egg-info' .
  run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$name:llmjax-src.tar.gz" "${common[@]}" --worker=all
  local remote
  remote="set -e; mkdir -p $(shquote "$remote_dir"); tar -xzf llmjax-src.tar.gz -C $(shquote "$remote_dir")"
  remote+="; python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e $(shquote "$remote_dir")"
  if [[ -n "$setup_cmd" ]]; then
    remote+="; $setup_cmd"
  fi
  run_cmd gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command="$remote"
  if [[ $dry_run -eq 0 ]]; then
    rm -f "$tarball"
  fi
}

# Make sure the slice exists and is READY (create or re-create it), then install.
up() {
  local state
  state="$(tpu_state)"
  case "$state" in
    READY) echo "tpu_pod.sh: reusing $name ($state)" >&2 ;;
    NONE) create ;;
    CREATING | STARTING | RESTARTING | REPAIRING)
      while [[ "$(tpu_state)" != READY ]]; do
        echo "tpu_pod.sh: $name is starting; waiting" >&2
        sleep 30
      done
      ;;
    *)  # PREEMPTED, STOPPED, TERMINATED, ...: start over
      echo "tpu_pod.sh: $name is $state; re-creating it" >&2
      delete
      create
      ;;
  esac
  install
}

run_on_workers() {
  local remote
  remote="cd $(shquote "$remote_dir") && $(shquote "$@")"
  run_cmd gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command="$remote"
}

case "$action" in
  up) up ;;
  delete) delete ;;
  run)
    status=0
    attempt=0
    while true; do
      up
      set +e
      run_on_workers "$@"
      status=$?
      set -e
      if [[ $status -eq 0 || $dry_run -eq 1 ]]; then
        break
      fi
      state="$(tpu_state)"
      # 255: ssh lost a worker; a slice that is no longer READY was preempted or is being repaired.
      if [[ "$state" == READY && $status -ne 255 ]]; then
        echo "tpu_pod.sh: the command failed with status $status on a healthy slice; not retrying" >&2
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
