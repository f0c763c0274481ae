# shellcheck shell=bash
# Sourced by the launch scripts that run on the user's machine (tpu_pod.sh, slurm_submit.sh).
# slurm_gpu.sbatch keeps its own copy: Slurm runs a spooled copy of it, away from this folder.

# POSIX shell quoting, pasteable into any sh (unlike printf %q, never $'...').
shquote() {
  local out="" arg q="'"
  for arg in "$@"; do
    if [[ -n "$arg" && "$arg" =~ ^[-A-Za-z0-9_./=:,@+%]+$ ]]; then
      out+="$arg "
    else
      out+="'${arg//$q/$q\\$q$q}' "
    fi
  done
  printf '%s' "${out% }"
}
