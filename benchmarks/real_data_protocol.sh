#!/usr/bin/env bash
# A small CPU version of the paper's protocol on real CIFAR-10 (npz shards; not shipped with the
# project): teacher -> search -> distill, with the student alone, Last and Average beside DFA.
#   bash benchmarks/real_data_protocol.sh /path/to/cifar10_npz_dir [runs_dir] [seed]
# Prints the results table and the searched alpha; the figures go to BENCHMARKS.md.
set -euo pipefail
data=${1:?usage: real_data_protocol.sh CIFAR10_NPZ_DIR [RUNS_DIR] [SEED]}
runs=${2:-runs/real_data}
seed=${3:-0}
lscpu | grep -m1 "Model name" || true
python -m dfa_jax.main --config=configs/cifar100_pair3.py --workdir="$runs/seed$seed" \
  --config.seed="$seed" \
  --config.data.dataset=cifar10 --config.data.source=npz "--config.data.path=$data" \
  --config.teacher.model=wrn_16_2 --config.student.model=wrn_10_1 \
  --config.teacher.optim.epochs=5 --config.teacher.optim.schedule=cosine \
  --config.search.epochs_per_group=1 --config.search.beta_lr=0.01 \
  --config.distill.optim.epochs=3 --config.distill.optim.schedule=cosine \
  --config.distill.compare_with='("last", "average", "none")' \
  --config.log_every_steps=100 --config.checkpoint_every_steps=1000
