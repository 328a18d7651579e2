#!/usr/bin/env bash
# A small CPU version of the paper's protocol and of Table 2 on real CIFAR-10 (npz shards; never
# shipped with the project), WRN_16_2 -> WRN_10_1, one seed, every student the same budget:
#   1. teacher (5 epochs) -> search (1 epoch per group) -> DFA, Last, Average and the student
#      alone (1 epoch each), in RUNS/protocol;
#   2. every baseline (KD, FitNets, AT, Jacobian, FT, AB, SP, Margin; 1 epoch each) distilled
#      from that same teacher, in RUNS/baselines/...;
#   3. the Table 2 / Table 5 report over both, into RUNS.
#   bash benchmarks/real_data_cifar10.sh CIFAR10_NPZ_DIR [RUNS_DIR] [SEED]
# Re-running resumes; the figures go to BENCHMARKS.md.
set -euo pipefail
data=${1:?usage: real_data_cifar10.sh CIFAR10_NPZ_DIR [RUNS_DIR] [SEED]}
runs=${2:-runs/real_cifar10}
seed=${3:-0}
lscpu | grep -m1 "Model name" || true
# One JAX CPU device: with two, a run here hung in XLA:CPU's in-process all-reduce (see
# BENCHMARKS.md); on one device there is no collective.
# The sweep sets each run's seed itself (--seeds=).
common=(--config.num_cpu_devices=1
        --config.data.dataset=cifar10 --config.data.source=npz "--config.data.path=$data"
        --config.teacher.model=wrn_16_2 --config.student.model=wrn_10_1
        --config.distill.optim.epochs=1 --config.distill.optim.schedule=cosine
        --config.log_every_steps=100 --config.checkpoint_every_steps=1000)
python -m dfa_jax.main --config=configs/cifar100_pair3.py --workdir="$runs/protocol" \
  --config.seed="$seed" "${common[@]}" \
  --config.teacher.optim.epochs=5 --config.teacher.optim.schedule=cosine \
  --config.search.epochs_per_group=1 --config.search.beta_lr=0.01 \
  --config.distill.compare_with='("last", "average", "none")'
bash launch/sweep.sh --runs="$runs/baselines" --configs=configs/cifar100_pair3.py \
  --methods=kd,fitnets,at,jacobian,ft,ab,sp,margin --seeds="$seed" "${common[@]}" \
  "--config.teacher.checkpoint=$runs/protocol" \
  --config.baselines.ft_pretrain_epochs=1 --config.baselines.ab_init_epochs=1
python -m dfa_jax.report "$runs" --out "$runs"
