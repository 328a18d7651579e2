# shellcheck shell=bash
# Helpers the launch scripts share (sourced; not a command). slurm_gpu.sbatch keeps its own copy:
# SLURM runs a spooled copy of a batch script, away from this folder.

# One word as the shell would need it typed: bare when safe, else single-quoted.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_,./:=@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Words as one command line, each quoted as needed (what --dry-run prints).
quote_all() {
  local word sep=""
  for word in "$@"; do
    printf '%s' "$sep"
    quote "$word"
    sep=" "
  done
}
