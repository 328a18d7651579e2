#!/usr/bin/env bash
# Trains two teachers on real CIFAR-10 (npz shards, not shipped with the project) with the shared
# loop and prints their summaries; the figures go to BENCHMARKS.md.
#   bash benchmarks/real_data_teacher.sh /path/to/cifar10_npz_dir [runs_dir]
set -euo pipefail
data=${1:?usage: real_data_teacher.sh CIFAR10_NPZ_DIR [RUNS_DIR]}
runs=${2:-runs/real_data}
lscpu | grep -m1 "Model name" || true
common=(--config=configs/cifar100_teacher.py --config.data.dataset=cifar10
        --config.data.source=npz "--config.data.path=$data" --config.teacher.optim.schedule=cosine
        --config.log_every_steps=100 --config.checkpoint_every_steps=1000)
# Demo-size teacher (the demo's WRN_16_2), 5 epochs.
python -m dfa_jax.main "${common[@]}" --workdir="$runs/wrn_16_2_5ep" \
  --config.teacher.model=wrn_16_2 --config.teacher.optim.epochs=5
# A small WRN teacher, 10 epochs.
python -m dfa_jax.main "${common[@]}" --workdir="$runs/wrn_16_1_10ep" \
  --config.teacher.model=wrn_16_1 --config.teacher.optim.epochs=10
for run in "$runs"/wrn_16_2_5ep "$runs"/wrn_16_1_10ep; do
  python - "$run" <<'PY'
import json, sys
s = json.load(open(f"{sys.argv[1]}/summary.json"))["stages"]["teacher"]
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/teacher/metrics.jsonl")]
ips = [r["train/images_per_s"] for r in rows if "train/images_per_s" in r][2:]
print(f"{sys.argv[1]}: best {100*s['best_accuracy']:.2f}% (epoch {s['best_epoch']}), last "
      f"{100*s['last_accuracy']:.2f}%, {s['epochs']} epochs, {s['wall_time_s']:.0f} s, "
      f"median {sorted(ips)[len(ips)//2]:.0f} img/s")
PY
done
