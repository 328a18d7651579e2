#!/usr/bin/env bash
# Runs methods x configs x seeds one after another on this machine, each in its own workdir
# RUNS/<config>/<method>/seed<k>; re-running the same sweep resumes (finished runs are skipped).
#
#   launch/sweep.sh --runs=runs/table2 --configs=configs/cifar100_pair3.py \
#       --methods=none,kd,fitnets,at,jacobian,ft,ab,sp,margin,dfa --seeds=0,1,2 [--dry-run] \
#       [--config.teacher.checkpoint=W ...]
#
# A method is one of none kd fitnets at jacobian ft ab sp margin dfa, or a DFA aggregation
# (last average random) for Table 5. Non-DFA methods skip the search stage. Any other flag is
# passed to every run (e.g. a shared teacher, data paths, shorter epochs). Afterwards:
#   python -m dfa_jax.report RUNS --out RUNS
# On a cluster the same list is what launch/local.sh (or a scheduler array) fans out.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

runs="" configs="" methods="" seeds="0" dry_run=0
passthrough=()
for arg in "$@"; do
  case "$arg" in
    --runs=*) runs=${arg#*=} ;;
    --configs=*) configs=${arg#*=} ;;
    --methods=*) methods=${arg#*=} ;;
    --seeds=*) seeds=${arg#*=} ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    *) passthrough+=("$arg") ;;
  esac
done
if [[ -z $runs || -z $configs || -z $methods ]]; then
  usage >&2
  exit 2
fi

python=${PYTHON:-python3}
IFS=, read -r -a config_list <<< "$configs"
IFS=, read -r -a method_list <<< "$methods"
IFS=, read -r -a seed_list <<< "$seeds"
for config in "${config_list[@]}"; do
  name=$(basename "${config%%:*}" .py)
  for method in "${method_list[@]}"; do
    case "$method" in
      dfa) flags=(--config.distill.method=dfa --config.distill.aggregation=dfa) ;;
      last|average|random) flags=(--config.distill.method=dfa "--config.distill.aggregation=$method"
                                  '--config.stages=("teacher","distill")') ;;
      *) flags=("--config.distill.method=$method" '--config.stages=("teacher","distill")') ;;
    esac
    for seed in "${seed_list[@]}"; do
      cmd=("$python" -m dfa_jax.main "--config=$config" "--workdir=$runs/$name/$method/seed$seed"
           "--config.seed=$seed" "${flags[@]}" "${passthrough[@]}")
      printf '%q ' "${cmd[@]}"
      printf '\n'
      if [[ $dry_run -eq 0 ]]; then
        "${cmd[@]}"
      fi
    done
  done
done
