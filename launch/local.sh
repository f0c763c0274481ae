#!/usr/bin/env bash
# Run a multi-process llmjax job on this machine: NUM_PROCESSES processes, each with
# DEVICES_PER_PROCESS virtual CPU devices, joined through a coordinator on 127.0.0.1.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh [options] NUM_PROCESSES DEVICES_PER_PROCESS -- COMMAND [ARGS...]

Start NUM_PROCESSES copies of COMMAND on this machine (e.g. `llmjax train ...`), each
seeing DEVICES_PER_PROCESS CPU devices, as one jax.distributed run with its coordinator
on 127.0.0.1. Each process gets LLMJAX_COORDINATOR, LLMJAX_NUM_PROCESSES and
LLMJAX_PROCESS_ID (read by `llmjax`), JAX_PLATFORMS=cpu and XLA_FLAGS with
--xla_force_host_platform_device_count=DEVICES_PER_PROCESS.

SIGINT, SIGTERM and SIGHUP reach every process as SIGTERM (background processes of a
script ignore SIGINT; on SIGTERM llmjax saves a checkpoint and exits with 143). If
one process fails, the others get SIGTERM, then SIGKILL after the grace period, and the
launcher exits with the failed process's status (non-zero). Exit 0 only if all succeed.

Options:
  --port PORT       coordinator port (default: a free port)
  --grace SECONDS   wait this long after SIGTERM before SIGKILL (default: 10)
  --log-dir DIR     also write each process's output to DIR/process-<i>.log
  -h, --help        show this help

Example:
  launch/local.sh 2 4 -- llmjax train --workdir runs/two mesh.data=2 mesh.fsdp=2 mesh.tensor=2
EOF
}

die() {
  echo "local.sh: $*" >&2
  echo "Try 'launch/local.sh --help'." >&2
  exit 2
}

port=""
grace=10
log_dir=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --port) [[ $# -ge 2 ]] || die "--port needs a value"; port="$2"; shift 2 ;;
    --grace) [[ $# -ge 2 ]] || die "--grace needs a value"; grace="$2"; shift 2 ;;
    --log-dir) [[ $# -ge 2 ]] || die "--log-dir needs a value"; log_dir="$2"; shift 2 ;;
    --) die "NUM_PROCESSES and DEVICES_PER_PROCESS come before --" ;;
    -*) die "unknown option $1" ;;
    *) break ;;
  esac
done

[[ $# -ge 2 ]] || { usage >&2; exit 2; }
num_processes="$1"
devices="$2"
shift 2
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || die "NUM_PROCESSES must be a positive integer, got '$num_processes'"
[[ "$devices" =~ ^[1-9][0-9]*$ ]] || die "DEVICES_PER_PROCESS must be a positive integer, got '$devices'"
[[ "$grace" =~ ^[0-9]+$ ]] || die "--grace must be a whole number of seconds, got '$grace'"
[[ $# -ge 1 && "$1" == "--" ]] || die "expected -- before the command"
shift
[[ $# -ge 1 ]] || die "no command given after --"

if [[ -z "$port" ]]; then
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"
if [[ -n "$log_dir" ]]; then
  mkdir -p "$log_dir"
fi

# XLA_FLAGS of the caller, minus any device count of its own.
base_flags=""
for flag in ${XLA_FLAGS:-}; do
  [[ "$flag" == --xla_force_host_platform_device_count=* ]] || base_flags+="$flag "
done
xla_flags="${base_flags}--xla_force_host_platform_device_count=${devices}"

pids=()
stopping=0

# Send SIGNAL to every process still running.
signal_all() {
  local sig="$1" pid
  for pid in "${pids[@]}"; do
    kill -s "$sig" "$pid" 2>/dev/null || true
  done
}

any_running() {
  local pid
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      return 0
    fi
  done
  return 1
}

# SIGTERM the others, then SIGKILL whatever is left after the grace period.
stop_all() {
  local waited=0
  signal_all TERM
  while any_running && [[ $waited -lt $((grace * 10)) ]]; do
    sleep 0.1
    waited=$((waited + 1))
  done
  if any_running; then
    echo "local.sh: processes still running after ${grace}s; sending SIGKILL" >&2
    signal_all KILL
  fi
}

# shellcheck disable=SC2317  # invoked by the traps below
forward() {
  local sig="$1"
  echo "local.sh: forwarding SIG${sig} to ${#pids[@]} processes" >&2
  stopping=1
  signal_all "$sig"
}
trap 'forward TERM' TERM INT HUP

for ((i = 0; i < num_processes; i++)); do
  if [[ -n "$log_dir" ]]; then
    LLMJAX_COORDINATOR="127.0.0.1:${port}" LLMJAX_NUM_PROCESSES="$num_processes" LLMJAX_PROCESS_ID="$i" \
      JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" "$@" > >(tee "$log_dir/process-$i.log") 2>&1 &
  else
    LLMJAX_COORDINATOR="127.0.0.1:${port}" LLMJAX_NUM_PROCESSES="$num_processes" LLMJAX_PROCESS_ID="$i" \
      JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" "$@" &
  fi
  pids+=("$!")
  echo "local.sh: started process $i (pid $!) of $num_processes, $devices CPU devices, coordinator 127.0.0.1:$port" >&2
done

# Poll rather than `wait -n`: a trapped signal or a process that already ended must not
# make the launcher lose track of an exit status.
status=0
live=("${pids[@]}")
while [[ ${#live[@]} -gt 0 ]]; do
  still=()
  for pid in "${live[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
      continue
    fi
    set +e
    wait "$pid"
    rc=$?
    set -e
    index=-1
    for ((i = 0; i < num_processes; i++)); do
      if [[ "${pids[$i]}" == "$pid" ]]; then
        index=$i
      fi
    done
    if [[ $rc -ne 0 && $status -eq 0 ]]; then
      status=$rc
      if [[ $stopping -eq 0 ]]; then
        echo "local.sh: process $index (pid $pid) exited with status $rc; stopping the others" >&2
        stopping=1
        stop_all
      fi
    fi
  done
  live=("${still[@]+"${still[@]}"}")
  if [[ ${#live[@]} -gt 0 ]]; then
    sleep 0.2
  fi
done
exit "$status"
