#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, from Debian's packages, with its state under one directory.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: launch/slurm_local.sh up DIR     start munged (if none runs), slurmctld and slurmd; print the environment
       launch/slurm_local.sh down DIR   stop the daemons this script started (by their PIDs under DIR)
       launch/slurm_local.sh env DIR    print the environment of a cluster that is up

Starts a one-node Slurm cluster (partition `debug`, this host) from Debian's packages
(`apt-get install slurm-wlm`, which brings munge) for trying a submission locally and for the
tests: configuration, state, spool, logs and PID files under DIR. Run as root (slurmd manages the
jobs' processes). Use it with the printed environment:

  eval "$(launch/slurm_local.sh up /tmp/slurm)"
  sinfo; sbatch --wrap 'hostname'; launch/slurm_submit.sh --gpus-per-node 0 --nodes 1 -- hostname
  launch/slurm_local.sh down /tmp/slurm

Environment: SLURM_LOCAL_CPUS  CPUs the node offers [8, more than the machine has: jobs share the cores]
             SLURM_LOCAL_PORT  slurmctld's port [6817 + a hash of DIR; slurmd's is the next one]
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
    stop_pid_file "$dir/munged.pid.ours"
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
port="${SLURM_LOCAL_PORT:-$((6817 + $(printf '%s' "$dir" | cksum | cut -d' ' -f1) % 500 * 2))}"
mkdir -p "$dir/state" "$dir/spool" "$dir/log"

# munge: the authentication daemon, shared by every cluster on the machine (one socket).
if ! munge -n </dev/null >/dev/null 2>&1; then
  [[ -f /etc/munge/munge.key ]] || mungekey -c
  mkdir -p /run/munge
  chown munge:munge /run/munge /etc/munge/munge.key 2>/dev/null || true
  munged --force --pid-file="$dir/munged.pid.ours"  # the daemon's own PID (not its exiting parent's)
  for _ in $(seq 50); do
    munge -n </dev/null >/dev/null 2>&1 && break
    sleep 0.1
  done
  munge -n </dev/null >/dev/null 2>&1 || die "munged did not start"
fi

cat >"$conf" <<CONF
# Written by launch/slurm_local.sh: a one-node cluster with its state under $dir
ClusterName=local
SlurmctldHost=$host
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
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
