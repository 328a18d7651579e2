#!/usr/bin/env bash
# Runs methods x configs x seeds, each in its own workdir RUNS/<config>/<method>/seed<k> (a config's
# argument joins its name: x.py:tiny -> RUNS/x_tiny/); re-running the same sweep resumes (finished
# stages are skipped).
#
#   launch/sweep.sh --runs=runs/table2 --configs=configs/cifar100_pair3.py \
#       --methods=none,kd,fitnets,at,jacobian,ft,ab,sp,margin,dfa --seeds=0,1,2 [--dry-run] \
#       [--launcher=direct|local|slurm|tpu] [--force] [--keep-going] \
#       [--config.teacher.checkpoint=W ...]
#
# A method is any `distill.method` (none kd fitnets at jacobian ft ab sp margin dkd dist kd_ls
# dkd_ls dfa, or a registered one), or a DFA aggregation (last average random for Table 5; start,
# the search's starting alpha unsearched; file with --config.distill.alpha_file=...). Only dfa
# runs the search stage. Any other flag is passed
# to every run (e.g. a shared teacher, data paths, shorter epochs). Each seed is a run of its own;
# one run with --config.distill.seeds='(0,1,2)' instead trains the seeds' students in one step
# sharing the teacher's forward. --dry-run prints one line per run and runs nothing. Afterwards:
#   python -m dfa_jax.report RUNS --out RUNS
#
# A run that finished with the same command (its workdir holds summary.json and the command the
# sweep recorded there, .sweep_command) is skipped with a line saying so: starting it again would
# only skip its stages (under slurm, in an allocation of its own). With other flags it starts,
# and the run itself refuses a changed protocol (naming the fields) or trains what is new. Only a
# local RUNS is checked, a gs://... one is not. Under slurm a run whose job name is queued or
# running (`squeue --me`; not checked without squeue) is skipped too: a second job would share
# its workdir. --force starts them all the same (a job name does not include RUNS, so another
# sweep's job of the same config, method and seed counts). The sweep sets each run's
# --config.seed, --config.stages, --config.distill.method and --config.distill.aggregation:
# passing one of them is refused (a field given twice is). Each run trains its method's student
# alone (--config.distill.compare_with='()') unless --config.distill.compare_with=... is given.
#
# A run that fails stops the sweep (its exit status is the sweep's) unless --keep-going is given
# (direct and local launchers): then the other runs go on, the failed ones are listed at the end
# and the sweep exits 1.
#
# --launcher says how each run starts:
#   direct  (default) `python -m dfa_jax.main ...`, one run after another (PYTHON=... picks it)
#   local   launch/local.sh, one run after another; --processes=N and --port=P are passed on
#   slurm   `sbatch [--sbatch=OPT ...] launch/slurm_gpu.sbatch ...`: one job per run (named
#           <config>-<method>-s<seed>), submitted and not waited for; each --sbatch=OPT is an
#           sbatch option (e.g. --sbatch=--nodes=2). RUNS must be on a disk every node shares.
#           Each job's log is WORKDIR/logs/slurm-<jobid>.out (for a local RUNS;
#           --sbatch=--output=... overrides it).
#   tpu     launch/tpu_pod.sh, one run after another on the same slice; --tpu-X=V is passed as
#           --X=V (--tpu-name=, --tpu-zone=, --tpu-accelerator-type=, --tpu-version=,
#           --tpu-project=, --tpu-repo=); runs after the first skip the install; with
#           --tpu-delete-at-end the last run deletes the slice (a failed run stops the sweep and
#           leaves it). Each run starts on the workers in their copy of this checkout
#           (~/dfa_jax_src; with --tpu-repo, their home directory), where a relative path is
#           looked up: give --config.teacher.checkpoint=... and other paths as gs://... (or
#           absolute on every worker). RUNS must be gs://...
set -euo pipefail

# The header comment, whatever its length.
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }

runs="" configs="" methods="" seeds="0" dry_run=0 launcher=direct processes="" port=""
tpu_delete=0 force=0 keep_going=0
passthrough=() sbatch_opts=() tpu_opts=()
for arg in "$@"; do
  case "$arg" in
    --launcher=*) launcher=${arg#*=} ;;
    --processes=*) processes=${arg#*=} ;;
    --port=*) port=${arg#*=} ;;
    --sbatch=*) sbatch_opts+=("${arg#*=}") ;;
    --tpu-delete-at-end) tpu_delete=1 ;;
    --tpu-*=*) tpu_opts+=("--${arg#--tpu-}") ;;
    --runs=*) runs=${arg#*=} ;;
    --configs=*) configs=${arg#*=} ;;
    --methods=*) methods=${arg#*=} ;;
    --seeds=*) seeds=${arg#*=} ;;
    --dry-run) dry_run=1 ;;
    --force) force=1 ;;
    --keep-going) keep_going=1 ;;
    -h|--help) usage; exit 0 ;;
    *) passthrough+=("$arg") ;;
  esac
done
if [[ -z $runs || -z $configs || -z $methods || -z $seeds ]]; then
  usage >&2
  exit 2
fi
fail() {
  echo "sweep.sh: $*" >&2
  exit 2
}
case "$launcher" in
  direct | local | slurm | tpu) ;;
  *) fail "--launcher must be direct, local, slurm or tpu, got '$launcher'" ;;
esac
[[ $launcher == local || -z $processes$port ]] ||
  fail "--processes and --port need --launcher=local"
[[ $launcher == slurm || ${#sbatch_opts[@]} -eq 0 ]] || fail "--sbatch=... needs --launcher=slurm"
[[ $launcher == tpu || $((${#tpu_opts[@]} + tpu_delete)) -eq 0 ]] ||
  fail "--tpu-... flags need --launcher=tpu"
# A submitted job's failure is not seen here, and a failed TPU run may have left the slice unfit
# for the next one.
[[ $launcher == direct || $launcher == local || keep_going -eq 0 ]] ||
  fail "--keep-going needs --launcher=direct or local"
# One student per run, the sweep's method: a config's own distill.compare_with (the demo's trains
# Last and the student alone beside DFA) would train its students in every run, unless given here.
compare_with=(--config.distill.compare_with='()')
for arg in ${passthrough[@]+"${passthrough[@]}"}; do
  case "$arg" in
    --config.seed=* | --config.stages=* | --config.distill.method=* | --config.distill.aggregation=*)
      fail "${arg%%=*} is set by the sweep for each run (--seeds=, --methods=); drop it" ;;
    --config.distill.compare_with=*) compare_with=() ;;
  esac
done

python=${PYTHON:-python3}
here=$(dirname "$0")
IFS=, read -r -a config_list <<< "$configs"
IFS=, read -r -a method_list <<< "$methods"
IFS=, read -r -a seed_list <<< "$seeds"
total=$((${#config_list[@]} * ${#method_list[@]} * ${#seed_list[@]}))
# The names of this user's queued and running jobs, once: a run whose job is among them is not
# submitted again. (-u: Slurm before 20.11 has no --me.)
queued=""
if [[ $launcher == slurm && $force -eq 0 ]] && command -v squeue >/dev/null 2>&1; then
  queued=$(squeue --me -h -o %j 2>/dev/null || squeue -u "$(id -un)" -h -o %j) ||
    fail "squeue failed (--force submits without asking it)"
fi
count=0 started=0
failed=()
for config in "${config_list[@]}"; do
  name=$(basename "${config%%:*}" .py)
  # The config's argument names its own runs: x.py and x.py:tiny are two experiments.
  [[ $config != *:* ]] || name+="_${config#*:}"
  for method in "${method_list[@]}"; do
    case "$method" in
      # The whole pipeline: a config of the teacher alone (its own stages) still gets its search.
      dfa) flags=(--config.distill.method=dfa --config.distill.aggregation=dfa
                  '--config.stages=("teacher","search","distill")') ;;
      last|average|random|file|start) flags=(--config.distill.method=dfa "--config.distill.aggregation=$method"
                                  '--config.stages=("teacher","distill")') ;;
      *) flags=("--config.distill.method=$method" '--config.stages=("teacher","distill")') ;;
    esac
    for seed in "${seed_list[@]}"; do
      wd=$runs/$name/$method/seed$seed
      job=$name-$method-s$seed
      run_args=("--config=$config" "--workdir=$wd"
                "--config.seed=$seed" "${flags[@]}" ${compare_with[@]+"${compare_with[@]}"}
                ${passthrough[@]+"${passthrough[@]}"})
      count=$((count + 1))
      # A bucket is not looked into: that would need its client here.
      recorded=$(printf '%q ' "${run_args[@]}")
      if [[ $force -eq 0 && $wd != *://* && -f $wd/summary.json && -f $wd/.sweep_command ]] &&
        [[ $(< "$wd/.sweep_command") == "$recorded" ]]; then
        echo "sweep.sh: skipping $wd: finished with this command (--force runs it again)" >&2
        continue
      fi
      if [[ -n $queued ]] && grep -qxF -- "$job" <<< "$queued"; then
        echo "sweep.sh: skipping $wd: job $job is queued or running (--force submits it again)" >&2
        continue
      fi
      case "$launcher" in
        direct) cmd=("$python" -m dfa_jax.main) ;;
        local)
          cmd=("$here/local.sh")
          [[ -z $processes ]] || cmd+=("--processes=$processes")
          [[ -z $port ]] || cmd+=("--port=$port")
          ;;
        slurm)
          cmd=(sbatch "--job-name=$job")
          # The job's log beside its run, not in the directory the sweep was started from (a
          # --sbatch=--output=... given later wins); sbatch needs the folder to exist.
          if [[ $wd != *://* ]]; then
            cmd+=("--output=$wd/logs/slurm-%j.out")
            [[ $dry_run -eq 1 ]] || mkdir -p "$wd/logs"
          fi
          cmd+=(${sbatch_opts[@]+"${sbatch_opts[@]}"} "$here/slurm_gpu.sbatch")
          ;;
        tpu)
          cmd=("$here/tpu_pod.sh" ${tpu_opts[@]+"${tpu_opts[@]}"})
          ((started == 0)) || cmd+=(--no-install)
          ((count < total || tpu_delete == 0)) || cmd+=(--delete-at-end)
          ;;
      esac
      cmd+=("${run_args[@]}")
      started=$((started + 1))
      printf '%q ' "${cmd[@]}"
      printf '\n'
      if [[ $dry_run -eq 0 ]]; then
        if [[ $wd != *://* ]]; then  # What the skip above compares a later sweep's command with.
          mkdir -p "$wd"
          printf '%s' "$recorded" > "$wd/.sweep_command"
        fi
        status=0
        "${cmd[@]}" || status=$?
        if ((status != 0)); then
          if ((keep_going == 0)); then
            echo "sweep.sh: $wd failed (exit status $status); stopping the sweep" \
              "(--keep-going runs the others)" >&2
            exit "$status"
          fi
          echo "sweep.sh: $wd failed (exit status $status); going on (--keep-going)" >&2
          failed+=("$wd (exit status $status)")
        fi
      fi
    done
  done
done
if ((${#failed[@]} > 0)); then
  echo "sweep.sh: ${#failed[@]} of $total runs failed:" >&2
  printf '  %s\n' ${failed[@]+"${failed[@]}"} >&2
  exit 1
fi
