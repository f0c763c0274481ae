#!/usr/bin/env bash
# A detached job on this machine: start a command that outlives the shell (and the ssh
# session) that started it, follow its log, stop it with SIGTERM, wait for it.
# tpu_pod.sh runs this on every TPU worker; it works the same on any Linux machine.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/job.sh [--dir DIR] start [--env NAME=VALUE ...] -- COMMAND [ARGS...]
       launch/job.sh [--dir DIR] status
       launch/job.sh [--dir DIR] logs [--follow] [--lines N]
       launch/job.sh [--dir DIR] stop [--grace SECONDS]
       launch/job.sh [--dir DIR] wait

  start   run COMMAND detached: in a new session with no terminal, stdin from /dev/null and
          output appended to DIR/log, so closing the shell or dropping the ssh connection
          leaves it running. Refused (status 3) while an earlier job in DIR still runs.
  status  print whether the job runs (pid, start time) or how it ended (exit status)
  logs    print the last N lines of the log [50]; with --follow keep printing until the job
          ends, then exit with the job's exit status
  stop    SIGTERM the job's process group (llmjax then saves a checkpoint and exits 143),
          SIGKILL it if it still runs after the grace period [300 s]
  wait    block until the job ends; exit with its exit status

Files in DIR (default $LLMJAX_JOB_DIR, or ~/llmjax-job): log, command, pid (the command's
process and process group), supervisor.pid, exit_status (written when the job ends).
Exit status 2: usage error; 3: start refused; 4: no job in DIR.
EOF
}

die() {
  echo "job.sh: $*" >&2
  exit 2
}

dir="${LLMJAX_JOB_DIR:-$HOME/llmjax-job}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --dir) [[ $# -ge 2 ]] || die "--dir needs a value"; dir="$2"; shift 2 ;;
    -*) die "unknown option $1" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
action="$1"
shift

alive() {  # alive PIDFILE: the process named in PIDFILE exists
  local pid
  [[ -s "$1" ]] || return 1
  pid="$(cat "$1")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null
}

# The job's supervisor still runs (and the pid was not reused by another program since, e.g. after a reboot).
running() {
  alive "$dir/supervisor.pid" || return 1
  local cmdline
  cmdline="/proc/$(cat "$dir/supervisor.pid")/cmdline"
  [[ ! -r "$cmdline" ]] || tr '\0' ' ' <"$cmdline" | grep -q -- "_supervise"
}

need_job() {
  [[ -s "$dir/supervisor.pid" ]] || { echo "job.sh: no job in $dir" >&2; exit 4; }
}

# The job's status once it has ended: its exit status, or 1 (with a note) when none was recorded.
ended_status() {
  if [[ -s "$dir/exit_status" ]]; then
    cat "$dir/exit_status"
  else
    echo "job.sh: the job in $dir ended without recording an exit status (killed, or the machine restarted)" >&2
    echo 1
  fi
}

# Runs detached (see `start`): start the command as the leader of its own session and process
# group, record its pid, wait for it and record its exit status.
supervise() {
  local child status r interrupted=0
  echo "$$" >"$dir/supervisor.pid"
  # A SIGTERM/SIGINT sent to the supervisor (e.g. at shutdown) goes on to the command's group;
  # SIGHUP is ignored (there is no terminal to hang up, but be sure).
  trap 'interrupted=1; [[ -n "${child:-}" ]] && kill -TERM -- "-$child" 2>/dev/null' TERM INT
  trap '' HUP
  setsid "$@" &
  child=$!
  echo "$child" >"$dir/pid"
  status=""
  while :; do
    interrupted=0
    r=0
    wait "$child" || r=$?
    if [[ $r -eq 127 && -n "$status" ]]; then
      break  # already collected by the previous wait
    fi
    status=$r
    [[ $interrupted -eq 1 ]] || break  # else a trapped signal cut the wait short: wait again
  done
  echo "$status" >"$dir/exit_status.tmp"
  mv "$dir/exit_status.tmp" "$dir/exit_status"
  echo "=== job.sh: $(date -u '+%Y-%m-%dT%H:%M:%SZ') exited with status $status"
}

case "$action" in
  start)
    envs=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do
      case "$1" in
        --env)
          [[ $# -ge 2 && "$2" == [A-Za-z_]*=* ]] || die "--env needs NAME=VALUE"
          envs+=("$2"); shift 2 ;;
        *) die "unknown start option $1 (the command goes after --)" ;;
      esac
    done
    [[ $# -ge 2 && "$1" == "--" ]] || die "start: expected -- COMMAND"
    shift
    mkdir -p "$dir"
    if running; then
      echo "job.sh: a job is already running in $dir (pid $(cat "$dir/pid" 2>/dev/null || echo '?')): stop it first" >&2
      exit 3
    fi
    rm -f "$dir/exit_status" "$dir/pid" "$dir/supervisor.pid"
    printf '%q ' "$@" >"$dir/command"
    echo >>"$dir/command"
    echo "=== job.sh: $(date -u '+%Y-%m-%dT%H:%M:%SZ') on $(hostname): $(cat "$dir/command")" >>"$dir/log"
    # setsid: a new session without a controlling terminal, so no SIGHUP reaches it when the
    # starting shell or ssh connection goes away.
    env "${envs[@]+"${envs[@]}"}" setsid bash "${BASH_SOURCE[0]}" --dir "$dir" _supervise "$@" \
      </dev/null >>"$dir/log" 2>&1 &
    for _ in $(seq 100); do
      [[ -s "$dir/pid" ]] && break
      sleep 0.05
    done
    [[ -s "$dir/pid" ]] || { echo "job.sh: the job did not start; see $dir/log" >&2; exit 1; }
    echo "job.sh: started pid $(cat "$dir/pid") on $(hostname); log: $dir/log"
    ;;
  _supervise) supervise "$@" ;;
  status)
    need_job
    if running; then
      echo "running: pid $(cat "$dir/pid") on $(hostname), since $(date -u -r "$dir/supervisor.pid" '+%Y-%m-%dT%H:%M:%SZ')"
    else
      status="$(ended_status 2>/dev/null)"
      echo "ended: exit status $status on $(hostname)"
    fi
    ;;
  logs)
    follow=0
    lines=50
    while [[ $# -gt 0 ]]; do
      case "$1" in
        --follow | -f) follow=1; shift ;;
        --lines | -n) [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || die "--lines needs a number"; lines="$2"; shift 2 ;;
        *) die "unknown logs option $1" ;;
      esac
    done
    need_job
    if [[ $follow -eq 0 ]]; then
      tail -n "$lines" "$dir/log"
      exit 0
    fi
    if running; then
      # --pid: tail exits once the supervisor (which outlives the command) has ended.
      tail -n "$lines" -F --pid="$(cat "$dir/supervisor.pid")" "$dir/log" 2>/dev/null || true
    else
      tail -n "$lines" "$dir/log"
    fi
    exit "$(ended_status)"
    ;;
  stop)
    grace=300
    while [[ $# -gt 0 ]]; do
      case "$1" in
        --grace) [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || die "--grace needs a whole number of seconds"; grace="$2"; shift 2 ;;
        *) die "unknown stop option $1" ;;
      esac
    done
    need_job
    if ! running; then
      echo "job.sh: no job running in $dir on $(hostname) (it ended with status $(ended_status))"
      exit 0
    fi
    pgid="$(cat "$dir/pid")"
    echo "job.sh: sending SIGTERM to process group $pgid on $(hostname)"
    kill -TERM -- "-$pgid" 2>/dev/null || true
    waited=0
    while running && [[ $waited -lt $((grace * 10)) ]]; do
      sleep 0.1
      waited=$((waited + 1))
    done
    if running; then
      echo "job.sh: still running after ${grace}s; sending SIGKILL" >&2
      kill -KILL -- "-$pgid" 2>/dev/null || true
      while running; do sleep 0.1; done
    fi
    echo "job.sh: stopped; exit status $(ended_status)"
    ;;
  wait)
    need_job
    while running; do sleep 2; done
    exit "$(ended_status)"
    ;;
  *) die "unknown action '$action' (start, status, logs, stop or wait)" ;;
esac
