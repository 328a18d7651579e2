#!/usr/bin/env bash
# The GPU measurements of speed against eager and compiled PyTorch, FLOP/s as a share of the
# chip's peaks, and ShuffleNetV2's memory and compile time, in one command of ~8 minutes on one
# H100 / H200 (each part in its own process, so that the device's peak memory is that part's):
#   bash benchmarks/gpu_speed_memory.sh OUT
# writes OUT/*.jsonl (one JSON line per case, as `benchmarks.throughput` and
# `benchmarks.memory_accounting` print them) and OUT/*.log, and prints a line per part.
#   1. throughput of CASES, float32, against the eager and the `torch.compile` twin (ratio,
#      ratio_compile, compile times, peak_fraction_*);
#   2. the same cases' JAX steps in bfloat16 (FLOP/s against the bf16 peak);
#   3. the ShuffleNetV2 distillation step's accounting (compiled temp against the device's peak
#      after the compile and after one step), with XLA's GPU autotuning and without it, and with
#      Eq. 2's aggregation as the CPU's chain instead of the GPU's reduction.
# Environment: CASES, BATCH (128), MIN_TIME (2 s a timing), PART_TIMEOUT (240 s a part) to change
# them; a part that fails or runs out of time is reported and the next one runs.
set -uo pipefail
out=${1:?usage: gpu_speed_memory.sh OUT}
mkdir -p "$out"
cases=${CASES:-teacher_wrn_16_2,search_pair3,distill_pair3_dfa,distill_shufflenet_2.0_0.5_dfa}
batch=${BATCH:-128}
min_time=${MIN_TIME:-2}
part_timeout=${PART_TIMEOUT:-240}
python=${PYTHON:-python3}
# JAX and PyTorch share the card in one process (throughput's --torch).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}
lscpu | grep -m1 "Model name" || true
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

part() {  # part NAME COMMAND...: runs it with a time limit, keeps its JSON lines and its log.
  local name=$1 start rc
  shift
  start=$(date +%s)
  timeout "$part_timeout" "$@" > "$out/$name.log" 2>&1
  rc=$?
  grep '^{' "$out/$name.log" > "$out/$name.jsonl" || true
  echo "$name: exit $rc, $(( $(date +%s) - start )) s, $(wc -l < "$out/$name.jsonl") JSON lines"
}

part throughput_float32 "$python" -m benchmarks.throughput --cases "$cases" --batch "$batch" \
  --min-time "$min_time" --torch-compile --malloc default
part throughput_bfloat16 "$python" -m benchmarks.throughput --cases "$cases" --batch "$batch" \
  --min-time "$min_time" --dtype bfloat16 --malloc default
part memory_shufflenet "$python" -m benchmarks.memory_accounting \
  --case distill_shufflenet_2.0_0.5_dfa --batch "$batch" --top 10
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" part memory_shufflenet_no_autotune \
  "$python" -m benchmarks.memory_accounting --case distill_shufflenet_2.0_0.5_dfa \
  --batch "$batch" --top 10
part memory_shufflenet_chain "$python" -m benchmarks.memory_accounting \
  --case distill_shufflenet_2.0_0.5_dfa --batch "$batch" --top 10 --aggregation chain
