#!/usr/bin/env bash
# Runs dfa_jax on this host: one process using all of its devices (every GPU, or one JAX device per
# CPU core), or with --processes N, N processes of the same command forming one JAX job over
# loopback (how a multi-host job runs, on one machine).
#
#   launch/local.sh --config=configs/demo.py --workdir=runs/demo [--config.a.b=value ...]
#   launch/local.sh --processes 2 --config=configs/demo.py --workdir=runs/demo2
#   launch/local.sh --dry-run ...   # print the command(s), run nothing, create nothing
#
# Every other flag is passed to `python -m dfa_jax.main` unchanged (PYTHON=... picks the
# interpreter, default python3). Re-running the same command resumes the run in its workdir.
#
#   --processes N  processes to start (default 1: one process, today's single-host run). With
#                  N > 1 process i gets --coordinator_address=127.0.0.1:PORT --num_processes=N
#                  --process_id=i. On a GPU host (nvidia-smi lists GPUs) process i gets
#                  CUDA_VISIBLE_DEVICES set to its 1/N of the GPUs (of those CUDA_VISIBLE_DEVICES
#                  lists, if set). On a CPU-only host (no nvidia-smi, or CUDA_VISIBLE_DEVICES set
#                  empty), unless --config.num_cpu_devices is given, each is pinned with taskset
#                  to its 1/N of the CPUs this shell may use and picks its own device count
#                  (the most, up to its cores, that divides every batch over all processes);
#                  without taskset each gets --config.num_cpu_devices=max(1, nproc/N).
#                  Process 0 prints here; process i > 0 appends to
#                  WORKDIR/logs/process_i.log, after a dated line (for a gs://BUCKET/PATH workdir
#                  TMPDIR/dfa_jax_logs/BUCKET_PATH/process_i.log, every / of it an _).
#                  When one process fails the others are stopped (SIGKILL after 10 s) and its exit
#                  status is returned. Ctrl-C or SIGTERM sends SIGTERM to every process and waits
#                  DFA_JAX_STOP_GRACE_S seconds (default 120) for them to save a checkpoint and
#                  stop; those still running then get SIGKILL, and local.sh exits 137; one that
#                  failed while stopping is named and its status is local.sh's.
#   --port P       coordinator port on 127.0.0.1 (default: one of 20000-59999 derived from the
#                  workdir, so that runs of two workdirs do not meet; a port in use is refused)
#   --dry-run      print every command, one line each, environment as a prefix; run nothing
#   -h, --help     print this help
set -euo pipefail

usage() {
  sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'
}

die() {
  echo "local.sh: $*" >&2
  exit 2
}

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

is_count() { [[ $1 =~ ^[1-9][0-9]*$ ]]; }

dry_run=0
processes=1
port="" # Derived from the workdir below unless given.
args=()
while (($# > 0)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    --processes=*) processes=${1#*=} ;;
    --processes)
      (($# > 1)) || die "--processes needs a value"
      processes=$2
      shift
      ;;
    --port=*) port=${1#*=} ;;
    --port)
      (($# > 1)) || die "--port needs a value"
      port=$2
      shift
      ;;
    *) args+=("$1") ;;
  esac
  shift
done
is_count "$processes" || die "--processes must be a positive integer, got '$processes'"
if [[ -n $port ]] && { ! is_count "$port" || ((port > 65535)); }; then
  die "--port must be a port number, got '$port'"
fi

python=${PYTHON:-python3}

if ((processes == 1)); then
  cmd=("$python" -m dfa_jax.main ${args[@]+"${args[@]}"})
  if [[ $dry_run -eq 1 ]]; then
    quote_all "${cmd[@]}"
    printf '\n'
    exit 0
  fi
  exec "${cmd[@]}"
fi

# --- N processes on loopback ---

workdir="" cpu_flag_given=0
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --workdir=*) workdir=${args[i]#*=} ;;
    --workdir) workdir=${args[i + 1]:-} ;;
    --config.num_cpu_devices | --config.num_cpu_devices=*) cpu_flag_given=1 ;;
  esac
done
[[ -n $workdir ]] || die "--processes $processes needs --workdir (processes i > 0 log there)"
if [[ -z $port ]]; then # A port per workdir: a second run on this host gets its own coordinator.
  port=$((20000 + $(printf '%s' "$workdir" | cksum | cut -d' ' -f1) % 40000))
fi
if [[ $workdir == *://* ]]; then # A bucket: the logs stay on this host.
  # The whole path names the folder: a sweep's workdirs all end in seed<k>.
  log_dir=${TMPDIR:-/tmp}/dfa_jax_logs/$(printf '%s' "${workdir#*://}" | tr / _)
else
  log_dir=$workdir/logs
fi

# The GPUs to share out; none on a CPU-only host.
gpus=()
if command -v nvidia-smi >/dev/null 2>&1; then
  if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    if [[ -n $CUDA_VISIBLE_DEVICES && $CUDA_VISIBLE_DEVICES != -1 ]]; then
      IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
    fi
  else
    count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    for ((g = 0; g < count; g++)); do gpus+=("$g"); done
  fi
fi
if ((${#gpus[@]} > 0)); then
  ((${#gpus[@]} % processes == 0)) ||
    die "cannot split ${#gpus[@]} GPUs evenly over $processes processes"
  per_process=$((${#gpus[@]} / processes))
else
  cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null ||
    getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)
  cpu_devices=$((cores / processes))
  ((cpu_devices >= 1)) || cpu_devices=1
  # With several processes and taskset, each process is pinned to its share of the CPUs this
  # shell may use and left to pick its device count (num_cpu_devices = 0 fits the count to its
  # cores and to every batch size over all processes: 12 cores, 2 processes and batches of 64
  # give 4 devices each, where 12/2 = 6 made 12 devices, which no batch of 64 divides).
  cpu_sets=()
  if ((processes > 1)) && command -v taskset >/dev/null 2>&1; then
    allowed=$(taskset -pc $$ 2>/dev/null | sed 's/.*: *//') || allowed=""
    ids=()
    IFS=, read -r -a ranges <<<"$allowed"
    for range in ${ranges[@]+"${ranges[@]}"}; do
      if [[ $range =~ ^([0-9]+)-([0-9]+)$ ]]; then
        for ((c = BASH_REMATCH[1]; c <= BASH_REMATCH[2]; c++)); do ids+=("$c"); done
      elif [[ $range =~ ^[0-9]+$ ]]; then
        ids+=("$range")
      fi
    done
    share=$((${#ids[@]} / processes))
    if ((share >= 1)); then
      for ((i = 0; i < processes; i++)); do
        cpu_sets+=("$(
          IFS=,
          echo "${ids[*]:i*share:share}"
        )")
      done
    fi
  fi
fi

# Sets `envs` and `cmd` to process $1's environment and command.
process_cmd() {
  local i=$1
  envs=()
  if ((${#gpus[@]} > 0)); then
    local share=("${gpus[@]:i*per_process:per_process}")
    envs=("CUDA_VISIBLE_DEVICES=$(
      IFS=,
      echo "${share[*]}"
    )")
  fi
  cmd=("$python" -m dfa_jax.main ${args[@]+"${args[@]}"} "--coordinator_address=127.0.0.1:$port"
    "--num_processes=$processes" "--process_id=$i")
  if ((${#gpus[@]} == 0 && cpu_flag_given == 0)); then
    if ((${#cpu_sets[@]} > 0)); then
      cmd=(taskset -c "${cpu_sets[i]}" "${cmd[@]}")
    else
      cmd+=("--config.num_cpu_devices=$cpu_devices")
    fi
  fi
}

if [[ $dry_run -eq 1 ]]; then
  for ((i = 0; i < processes; i++)); do
    process_cmd "$i"
    quote_all ${envs[@]+"${envs[@]}"} "${cmd[@]}"
    if ((i > 0)); then
      printf ' >>'
      quote "$log_dir/process_$i.log"
      printf ' 2>&1'
    fi
    printf '\n'
  done
  exit 0
fi

# A coordinator already listening there: another run of this workdir (the port is the
# workdir's), whose coordinator a second launch would join before any lock could refuse it,
# aborting the first run; or another program. Nothing starts.
if (: </dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
  die "port $port on 127.0.0.1 is in use: another run of $workdir is going (a second launch would" \
    "join it and abort it), or another program holds it; wait for that run, or pass --port P"
fi

# How long a stop asked for (Ctrl-C, SIGTERM) may take: each process finishes its step, meets the
# others at the next sync step and saves a checkpoint, which a compile or a slow disk can make
# last minutes.
grace=${DFA_JAX_STOP_GRACE_S:-120}
[[ $grace =~ ^[0-9]+$ ]] ||
  die "DFA_JAX_STOP_GRACE_S must be a whole number of seconds, got '$grace'"
# Once one process has failed, the others only wait for it at the next sync step: no checkpoint
# is coming, so they are not waited on long.
failure_grace=10

pids=()
killed=0
stop_failures=() # "process i ... exited with status s" for each that failed while stopping.
stop_status=0
# SIGTERM every process still running, SIGKILL what is left after $1 seconds (and say so: then
# `killed` is 1), and reap them all. `jobs -p` adds a process started but not yet in `pids` (a
# signal that lands between its `&` and the `pids[i]=$!` after it), which the final `wait` would
# otherwise wait on forever.
stop_all() {
  local limit=$1 pid alive all=() left=()
  all=(${pids[@]+"${pids[@]}"})
  for pid in $(jobs -p); do
    [[ " ${all[*]-} " == *" $pid "* ]] || all+=("$pid")  # Each once, in messages too.
  done
  ((${#all[@]} > 0)) || return 0
  for pid in ${all[@]+"${all[@]}"}; do kill -TERM "$pid" 2>/dev/null || true; done
  limit=$((SECONDS + limit))
  while :; do
    alive=0
    for pid in ${all[@]+"${all[@]}"}; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive && SECONDS <= limit)) || break
    sleep 0.5
  done
  for pid in ${all[@]+"${all[@]}"}; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
  if ((${#left[@]} > 0)); then
    echo "local.sh: ${#left[@]} process(es) still running $1 s after SIGTERM;" \
      "sending SIGKILL to pid(s) ${left[*]}" >&2
    for pid in ${left[@]+"${left[@]}"}; do kill -KILL "$pid" 2>/dev/null || true; done
    killed=1
  fi
  # Each process's status: one that failed while stopping (its checkpoint not saved) must not
  # pass for a clean stop. 130 and 143: stopped as asked; 137: killed above; 127: reaped before.
  # (Only the processes: `jobs -p` also lists the main loop's `sleep`, whose status says nothing.)
  local status i
  for ((i = 0; i < ${#pids[@]}; i++)); do
    [[ -n ${pids[i]:-} ]] || continue
    status=0
    wait "${pids[i]}" 2>/dev/null || status=$?
    case $status in
      0 | 127 | 130 | 137 | 143) ;;
      *)
        if ((i == 0)); then
          stop_failures+=("process 0 exited with status $status")
        else
          stop_failures+=("process $i (log: $log_dir/process_$i.log) exited with status $status")
        fi
        ((stop_status)) || stop_status=$status
        ;;
    esac
  done
  wait 2>/dev/null || true
}
# Background processes ignore SIGINT (no job control here), so Ctrl-C is passed on as SIGTERM.
# A stop that had to kill exits 137 (as a SIGKILL would), not as a clean stop.
on_signal() {
  trap - INT TERM HUP
  echo "local.sh: signal received, stopping all $processes processes" \
    "(SIGKILL after ${grace} s: DFA_JAX_STOP_GRACE_S)" >&2
  stop_all "$grace"
  trap - EXIT
  if ((${#stop_failures[@]} > 0)); then
    for failure in ${stop_failures[@]+"${stop_failures[@]}"}; do
      echo "local.sh: $failure while stopping: its checkpoint may not have been saved" >&2
    done
    exit "$stop_status"
  fi
  ((killed == 0)) || exit 137
  exit $((128 + $1))
}
trap 'on_signal 2' INT
trap 'on_signal 15' TERM
trap 'on_signal 1' HUP
trap 'stop_all $failure_grace' EXIT

mkdir -p "$log_dir"
echo "local.sh: $processes processes, coordinator 127.0.0.1:$port;" \
  "process 0 prints here, process i > 0 logs to $log_dir/process_i.log" >&2
for ((i = processes - 1; i >= 0; i--)); do
  process_cmd "$i"
  if ((i == 0)); then
    env ${envs[@]+"${envs[@]}"} "${cmd[@]}" &
  else
    # Appended: a resumed run, or another launch on this workdir, keeps the earlier output (a
    # crash's traceback among it).
    printf '===== %s: local.sh, process %d of %d =====\n' "$(date '+%Y-%m-%d %H:%M:%S %z')" \
      "$i" "$processes" >>"$log_dir/process_$i.log"
    env ${envs[@]+"${envs[@]}"} "${cmd[@]}" >>"$log_dir/process_$i.log" 2>&1 &
  fi
  pids[i]=$!
done

finished=()
running=$processes
while ((running > 0)); do
  sleep 0.5 &
  wait $! || true
  for ((i = 0; i < processes; i++)); do
    [[ -z ${finished[i]:-} ]] || continue
    ! kill -0 "${pids[i]}" 2>/dev/null || continue
    finished[i]=1
    running=$((running - 1))
    rc=0
    wait "${pids[i]}" || rc=$?
    if ((rc != 0)); then
      where=""
      ((i == 0)) || where=" (log: $log_dir/process_$i.log)"
      echo "local.sh: process $i exited with status $rc$where; stopping the others" >&2
      trap - INT TERM HUP
      stop_all "$failure_grace"
      trap - EXIT
      exit "$rc"
    fi
  done
done
trap - EXIT
echo "local.sh: all $processes processes finished; the others' logs are in $log_dir" >&2
