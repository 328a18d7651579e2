#!/usr/bin/env bash
# Runs dfa_jax on every worker of a Cloud TPU VM slice (a pod slice: one process per host),
# creating the slice if it does not exist. Needs gcloud, logged in, with the TPU API enabled.
#
#   launch/tpu_pod.sh --name=dfa --zone=us-central2-b --accelerator-type=v4-32 \
#       --config=configs/cifar100_pair3.py --workdir=gs://BUCKET/runs/pair3 [--config.a.b=value ...]
#   launch/tpu_pod.sh --dry-run ...   # print every gcloud command, run nothing
#
# Steps: `tpu-vm describe` (reuse the slice if it exists) or `tpu-vm create`; install on every
# worker (a Python >= 3.11 venv ~/dfa_jax_venv with jax[tpu] and this package); then on every
# worker `python -m dfa_jax.main ... --distributed` over `tpu-vm ssh --worker=all`. Each worker
# appends its output, after a dated line, to ~/dfa_jax_logs/BUCKET_PATH/worker.log (for the
# workdir gs://BUCKET/PATH, every / of it an _); worker 0's (process 0, the only one that writes
# logs and summaries) is also streamed here. Another worker's log:
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=3 \
#       --command='tail ~/dfa_jax_logs/BUCKET_PATH/worker.log'
# Ctrl-C stops the streaming, not the remote processes (worker 0 goes on writing its log): delete
# the slice or run
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command='pkill -f dfa_jax.main'
# On a slice that exists, nothing starts while a worker still runs dfa_jax.main (the install would
# replace its checkout and venv under it, and a second run would fight it for the TPUs).
#
#   --name=NAME            TPU VM name (default: dfa-jax)
#   --zone=ZONE            zone (default: us-central2-b)
#   --accelerator-type=T   slice type when creating it (default: v4-32)
#   --version=V            TPU software version when creating it (default: tpu-ubuntu2204-base)
#   --project=P            Cloud project (default: gcloud's configured project)
#   --repo=SPEC            what the workers install: a git URL[@ref] (pip installs git+URL[@ref])
#                          or any other pip requirement (default: this checkout's files, tracked
#                          and untracked but not ignored, copied with `tpu-vm scp --worker=all`;
#                          the run starts in that copy, so --config=configs/... resolves; with
#                          --repo it starts in the home directory: configs must be there)
#   --no-install           skip the install step (the slice already has this version)
#   --delete-at-end        delete the slice afterwards, also when the run fails (not when it
#                          was refused because dfa_jax.main still runs there)
#   --dry-run              print every gcloud command, one line each, run nothing
#   -h, --help             print this help
# Every other flag goes to `python -m dfa_jax.main`; --config and --workdir are required and the
# workdir must be a gs:// path: a pod's workers share no disk (each needs read/write access).
set -euo pipefail

usage() {
  sed -n '2,39p' "$0" | sed 's/^# \{0,1\}//'
}

die() {
  echo "tpu_pod.sh: error: $*" >&2
  exit 2
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

name=dfa-jax
zone=us-central2-b
accelerator_type=v4-32
version=tpu-ubuntu2204-base
project=""
repo=""
do_install=1
delete_at_end=0
dry_run=0
args=()
for arg in "$@"; do
  case "$arg" in
    --name=*) name=${arg#*=} ;;
    --zone=*) zone=${arg#*=} ;;
    --accelerator-type=*) accelerator_type=${arg#*=} ;;
    --version=*) version=${arg#*=} ;;
    --project=*) project=${arg#*=} ;;
    --repo=*) repo=${arg#*=} ;;
    --no-install) do_install=0 ;;
    --delete-at-end) delete_at_end=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    --name | --zone | --accelerator-type | --version | --project | --repo)
      die "write $arg=VALUE (with '=')"
      ;;
    *) args+=("$arg") ;;
  esac
done

workdir="" config_given=0
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --workdir=*) workdir=${args[i]#*=} ;;
    --workdir) workdir=${args[i + 1]:-} ;;
    --config=* | --config) config_given=1 ;;
  esac
done
[[ -n $workdir ]] || die "--workdir=gs://BUCKET/PATH is required (a pod's workers share no disk)"
[[ $workdir == gs://?* ]] ||
  die "--workdir must be a gs:// path, got '$workdir' (a pod's workers share no disk)"
((config_given)) || die "--config=CONFIG_FILE is required"
[[ -n $name && -n $zone ]] || die "--name and --zone must not be empty"

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
src_dir=dfa_jax_src # the copied checkout, in the workers' home directories
venv=\$HOME/dfa_jax_venv
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$zone")
[[ -z $project ]] || where+=("--project=$project")

# What pip installs on the workers, as a word of the remote command.
copy_checkout=0
if [[ -z $repo ]]; then
  copy_checkout=1
  package=\$HOME/$src_dir
elif [[ $repo == git+* ]]; then
  package=$(quote "$repo")
elif [[ $repo == *://* || $repo == git@* ]]; then
  package=$(quote "git+$repo")
else
  package=$(quote "$repo")
fi

# The install, as one remote shell command: Python >= 3.11 (apt's python3.11 where the image's
# python3 is older, e.g. Ubuntu 22.04's 3.10), a venv, jax[tpu], gcsfs (the gs:// workdir, read
# and written through etils.epath), the package (reinstalled even when its version is unchanged).
install_cmd="set -e; py=python3; \
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
py=python3.11; command -v python3.11 >/dev/null || { sudo apt-get update -qq \
&& sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv; }; fi; \
\$py -m venv $venv; $venv/bin/pip install -q -U pip; \
$venv/bin/pip install -q -U 'jax[tpu]' gcsfs; $venv/bin/pip install -q $package; \
$venv/bin/pip install -q --no-deps --force-reinstall $package"

# The run, as one remote shell command: every worker appends to its log of this workdir, worker
# 0 also writes to the ssh session (its number comes from the metadata server). Appended, after a
# dated line: a resume, or the next run of a sweep, keeps what was there. Worker 0's `tee -p` goes
# on writing the log when the session's pipe closes (Ctrl-C here, a dropped connection), as the
# run goes on too.
log_dir="\$HOME/dfa_jax_logs/$(quote "$(printf '%s' "${workdir#*://}" | tr / _)")"
log="$log_dir/worker.log"
main_cmd="$venv/bin/python -m dfa_jax.main $(quote_all ${args[@]+"${args[@]}"}) --distributed"
# Relative paths (--config=configs/...) resolve in the copied checkout; with --repo the package
# alone is installed, so they resolve in the home directory and must be there.
if ((copy_checkout)); then run_dir="\$HOME/$src_dir"; else run_dir="\$HOME"; fi
run_cmd="set -o pipefail; cd $run_dir; w=\$(curl -s -H Metadata-Flavor:Google \
http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number); \
mkdir -p $log_dir; echo \"===== \$(date '+%Y-%m-%d %H:%M:%S %z'): tpu_pod.sh, worker \$w =====\" \
>>$log; if [ \"\$w\" = 0 ]; then $main_cmd 2>&1 | tee -a -p $log; \
else $main_cmd >>$log 2>&1; fi"

describe=("${gcloud_tpu[@]}" describe "$name" "${where[@]}" '--format=value(state)')
# Every dfa_jax.main still running on a worker of a slice that exists, one line each (pgrep's
# pattern does not match the remote shell's own command line, nor sed's).
busy=("${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all
  "--command=pgrep -af 'dfa_jax[.]main' | sed \"s/^/dfa_jax_running \$(hostname): /\"; true")
create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" "--accelerator-type=$accelerator_type"
  "--version=$version")
clean_src=("${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all
  "--command=rm -rf \$HOME/$src_dir")
# The copy of the checkout: $1/dfa_jax_src to every worker's home directory.
scp_cmd() {
  scp=("${gcloud_tpu[@]}" scp --recurse "$1/$src_dir" "$name:" "${where[@]}" --worker=all)
}
install=("${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all "--command=$install_cmd")
run=("${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all "--command=$run_cmd")
delete=("${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet)

if [[ $dry_run -eq 1 ]]; then
  echo "# whether TPU VM $name exists is only known by asking gcloud; a real run first calls:"
  quote_all "${describe[@]}"
  echo
  echo "# when it exists, this lists any dfa_jax.main still running on it (then nothing starts):"
  quote_all "${busy[@]}"
  echo
  echo "# and, when it does not exist:"
  quote_all "${create[@]}"
  echo
  if ((do_install)); then
    if ((copy_checkout)); then
      echo "# copies $root's tracked and untracked, not ignored files to a temporary STAGE/$src_dir"
      quote_all "${clean_src[@]}"
      echo
      scp_cmd STAGE
      quote_all "${scp[@]}"
      echo
    fi
    quote_all "${install[@]}"
    echo
  fi
  quote_all "${run[@]}"
  echo
  if ((delete_at_end)); then
    quote_all "${delete[@]}"
    echo
  fi
  exit 0
fi

say() { echo "tpu_pod.sh: $*" >&2; }
run_logged() {
  say "$(quote_all "$@")"
  "$@"
}

stage=""
cleanup() {
  local status=$?
  [[ -z $stage ]] || rm -rf "$stage"
  if ((delete_at_end)); then
    say "deleting $name (--delete-at-end)"
    run_logged "${delete[@]}" || status=$((status ? status : 1))
  fi
  exit "$status"
}
trap cleanup EXIT

# The deletion is armed only once the slice is known to be this run's: one it created, or an
# idle READY one. A `describe` that failed for another reason than a missing slice (an expired
# token, a network error) led to `create`, which failed on the existing slice, and the exit
# then deleted that slice, perhaps under another run.
delete_requested=$delete_at_end
delete_at_end=0
if state=$("${describe[@]}" 2>/dev/null); then
  say "reusing TPU VM $name in $zone (state ${state:-unknown})"
  [[ $state == READY ]] || die "TPU VM $name is ${state:-in an unknown state}, not READY;" \
    "delete it (gcloud compute tpus tpu-vm delete $name --zone=$zone) or start it"
  found=$(run_logged "${busy[@]}")
  running=$(grep '^dfa_jax_running ' <<<"$found" || true)
  if [[ -n $running ]]; then # The slice is the running job's: not deleted under it.
    die "dfa_jax.main is still running on $name, not starting another run there:" \
      $'\n'"${running//dfa_jax_running /  }"$'\n'"stop it first (gcloud compute tpus tpu-vm ssh" \
      "$name --zone=$zone --worker=all --command='pkill -f dfa_jax.main') or wait for it to end"
  fi
else
  run_logged "${create[@]}"
fi
delete_at_end=$delete_requested

if ((do_install)); then
  if ((copy_checkout)); then
    stage=$(mktemp -d)
    mkdir "$stage/$src_dir"
    if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      git -C "$root" ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [[ ! -f $root/$f ]] || printf '%s\0' "$f"; done |
        tar -C "$root" --null -T - -cf - | tar -C "$stage/$src_dir" -xf -
    else
      cp -R "$root/." "$stage/$src_dir"
    fi
    run_logged "${clean_src[@]}"
    scp_cmd "$stage"
    run_logged "${scp[@]}"
  fi
  run_logged "${install[@]}"
fi

say "running on every worker of $name; worker 0's output follows; each worker's is in" \
  "${log#\$HOME/} in its home directory"
run_logged "${run[@]}"
say "finished; summaries and checkpoints are in $workdir"
