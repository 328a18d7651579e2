#!/usr/bin/env bash
# Runs dfa_jax on this host with all of its devices (every GPU, or one JAX device per CPU core).
#
#   launch/local.sh --config=configs/demo.py --workdir=runs/demo [--config.a.b=value ...]
#   launch/local.sh --dry-run --config=... --workdir=...   # print the command, run nothing
#
# Every flag except --dry-run and --help is passed to `python -m dfa_jax.main` unchanged.
# Re-running the same command resumes the run in its workdir.
set -euo pipefail

usage() {
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
}

dry_run=0
args=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    *) args+=("$arg") ;;
  esac
done

python=${PYTHON:-python3}
cmd=("$python" -m dfa_jax.main "${args[@]}")
if [[ $dry_run -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
exec "${cmd[@]}"
