#!/usr/bin/env bash
# A small CPU version of Table 2 on real CIFAR-10 (npz shards; not shipped with the project):
# every method, the same budget (1 epoch per student), the same seed, one shared teacher (the one
# benchmarks/real_data_protocol.sh trained), WRN_16_2 -> WRN_10_1. Then the report.
#   bash benchmarks/real_data_table2.sh CIFAR10_NPZ_DIR TEACHER_WORKDIR [runs_dir]
set -euo pipefail
data=${1:?usage: real_data_table2.sh CIFAR10_NPZ_DIR TEACHER_WORKDIR [RUNS_DIR]}
teacher=${2:?usage: real_data_table2.sh CIFAR10_NPZ_DIR TEACHER_WORKDIR [RUNS_DIR]}
runs=${3:-runs/real_table2}
lscpu | grep -m1 "Model name" || true
bash launch/sweep.sh --runs="$runs" --configs=configs/cifar100_pair3.py \
  --methods=none,kd,fitnets,at,jacobian,ft,ab,sp,margin,dfa --seeds=0 \
  --config.data.dataset=cifar10 --config.data.source=npz "--config.data.path=$data" \
  --config.teacher.model=wrn_16_2 --config.student.model=wrn_10_1 \
  "--config.teacher.checkpoint=$teacher" \
  --config.search.epochs_per_group=1 --config.search.beta_lr=0.01 \
  --config.distill.optim.epochs=1 --config.distill.optim.schedule=cosine \
  --config.baselines.ft_pretrain_epochs=1 --config.baselines.ab_init_epochs=1 \
  --config.log_every_steps=100 --config.checkpoint_every_steps=1000
python -m dfa_jax.report "$runs" --out "$runs"
