#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, from Debian's packages, with its state under one directory.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/slurm_local.sh up DIR     start munged, slurmctld and slurmd for a cluster under DIR; print its environment
       launch/slurm_local.sh down DIR   stop the daemons this script started (by their PIDs under DIR)
       launch/slurm_local.sh env DIR    print the environment of a cluster that is up

Starts a one-node Slurm cluster (partition `debug`, this host) from Debian's packages
(`apt-get install slurm-wlm`, which brings munge) for trying a submission locally and for the
tests: configuration, state, spool, logs, PID files and its own munge daemon (key, socket) under DIR,
so that clusters under different DIRs run side by side. Run as root (slurmd manages the
jobs' processes). Use it with the printed environment:

  eval "$(launch/slurm_local.sh up /tmp/slurm)"
  sinfo; sbatch --wrap 'hostname'; launch/slurm_submit.sh --gpus-per-node 0 --nodes 1 -- hostname
  launch/slurm_local.sh down /tmp/slurm

Environment: SLURM_LOCAL_CPUS  CPUs the node offers [8, more than the machine has: jobs share the cores]
             SLURM_LOCAL_PORT  slurmctld's port [6817 + a hash of DIR, or the next pair of free ports;
                               slurmd's is the next one]
USAGE
}

die() {
  echo "slurm_local.sh: $*" >&2
  exit 2
}

[[ $# -ge 1 ]] || { usage >&2; exit 2; }
case "$1" in -h | --help) usage; exit 0 ;; esac
[[ $# -eq 2 ]] || { usage >&2; exit 2; }
verb="$1"
case "$verb" in up | down | env) ;; *) die "unknown verb '$verb' (up, down or env)" ;; esac
mkdir -p "$2"
dir="$(cd "$2" && pwd)"
conf="$dir/slurm.conf"

print_env() {
  echo "export SLURM_CONF=$conf"
}

stop_pid_file() {
  local file="$1" pid
  [[ -f "$file" ]] || return 0
  pid="$(cat "$file")"
  if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$file"
}

case "$verb" in
  env) [[ -f "$conf" ]] || die "no cluster under $dir (run: launch/slurm_local.sh up $dir)"; print_env; exit 0 ;;
  down)
    if [[ -f "$conf" && -f "$dir/slurmctld.pid" ]]; then
      # Cancel what still runs, so that no job step outlives the daemons.
      export SLURM_CONF="$conf" PATH="$PATH:/usr/sbin"
      scancel --user="$(id -un)" 2>/dev/null || true
      for _ in $(seq 50); do
        [[ -z "$(squeue -h 2>/dev/null)" ]] && break
        sleep 0.2
      done
    fi
    stop_pid_file "$dir/slurmd.pid"
    stop_pid_file "$dir/slurmctld.pid"
    stop_pid_file "$dir/munge/munged.pid"
    exit 0
    ;;
  up) ;;
esac

for cmd in slurmctld slurmd munged; do
  command -v "$cmd" >/dev/null 2>&1 || [[ -x "/usr/sbin/$cmd" ]] \
    || die "$cmd not found: install Debian's Slurm (apt-get install slurm-wlm)"
done
[[ "$(id -u)" -eq 0 ]] || die "must run as root (slurmd starts the jobs' processes as their users)"
export PATH="$PATH:/usr/sbin"

host="$(hostname -s)"
cpus="${SLURM_LOCAL_CPUS:-8}"
[[ "$cpus" =~ ^[1-9][0-9]*$ ]] || die "SLURM_LOCAL_CPUS must be a positive integer, got '$cpus'"
socket="$dir/munge/munge.socket"

# Whether anything listens on 127.0.0.1:$1 (bash's /dev/tcp: no extra tools).
listening() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

if [[ -n "${SLURM_LOCAL_PORT:-}" ]]; then
  port="$SLURM_LOCAL_PORT"
  [[ "$port" =~ ^[1-9][0-9]*$ ]] || die "SLURM_LOCAL_PORT must be a port number, got '$port'"
else
  # 6817 + a hash of DIR, then the next free pair: two clusters never take the same ports.
  port=$((6817 + $(printf '%s' "$dir" | cksum | cut -d' ' -f1) % 500 * 2))
  for _ in $(seq 500); do
    if ! listening "$port" && ! listening "$((port + 1))"; then break; fi
    port=$((port + 2 > 7816 ? 6817 : port + 2))
  done
fi
mkdir -p "$dir/state" "$dir/spool" "$dir/log"

# munge: a private daemon for this cluster (its own key, socket and PID file under DIR), so that clusters
# under different DIRs (parallel test sessions, pytest-xdist workers) never share or stop each other's.
mkdir -p "$dir/munge"
chmod 700 "$dir/munge"
[[ -f "$dir/munge/munge.key" ]] || mungekey -c -k "$dir/munge/munge.key"
stop_pid_file "$dir/munge/munged.pid"
munged --force --socket="$socket" --key-file="$dir/munge/munge.key" --pid-file="$dir/munge/munged.pid" \
  --seed-file="$dir/munge/munged.seed" --log-file="$dir/log/munged.log"
for _ in $(seq 50); do
  munge -S "$socket" -n </dev/null >/dev/null 2>&1 && break
  sleep 0.1
done
munge -S "$socket" -n </dev/null >/dev/null 2>&1 || die "munged did not start; log: $dir/log/munged.log"

cat >"$conf" <<CONF
# Written by launch/slurm_local.sh: a one-node cluster with its state under $dir
ClusterName=local
SlurmctldHost=$host
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
AuthInfo=socket=$socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmdUser=root
ReturnToService=2
# The node offers the CPUs configured below even where the machine has fewer.
SlurmdParameters=config_overrides
MpiDefault=none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
KillWait=30
MinJobAge=300
SchedulerParameters=sched_interval=1
MessageTimeout=20
NodeName=$host CPUs=$cpus RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF="$conf"
stop_pid_file "$dir/slurmd.pid"
stop_pid_file "$dir/slurmctld.pid"
slurmctld -f "$conf" -i
slurmd -f "$conf"
for _ in $(seq 100); do
  if sinfo -h -o '%T' 2>/dev/null | grep -qx idle; then
    print_env
    exit 0
  fi
  sleep 0.2
done
echo "slurm_local.sh: the node did not become idle in 20 s; logs under $dir/log" >&2
tail -n 5 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
exit 1
