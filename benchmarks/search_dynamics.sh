#!/usr/bin/env bash
# What moves beta in the search, on real CIFAR-10 (npz shards; never shipped with the project):
# a WRN_16_2 teacher, then four searches for a WRN_10_1 student with the paper's beta settings
# (Adam 1e-3, betas (0.5, 0.999)) — lambda = 1e-3 and 0, each with `search.w_schedule` 'global'
# and 'per_group' — then a table and alpha-trajectory plots of where alpha went and whether the
# loss's gradient or the L2 pull moved it (benchmarks/search_dynamics.py).
#   bash benchmarks/search_dynamics.sh CIFAR10_NPZ_DIR [RUNS_DIR] [TRAIN_IMAGES] [EPOCHS_PER_GROUP]
#       [TEACHER_EPOCHS] [BETA_LR]
# TRAIN_IMAGES (default 10000) caps the training images the search splits 7:3 into its w and beta
# halves; the teacher (TEACHER_EPOCHS, default 5) trains on all of them. BETA_LR (default the
# paper's 1e-3) sets how far Adam moves beta (about BETA_LR per step under a steady push); another rate's
# searches get workdirs of their own (`..._lr0.01`). Re-running resumes.
set -euo pipefail
data=${1:?usage: search_dynamics.sh CIFAR10_NPZ_DIR [RUNS_DIR] [TRAIN_IMAGES] [EPOCHS_PER_GROUP]}
runs=${2:-runs/search_dynamics}
train_images=${3:-10000}
epochs_per_group=${4:-5}
teacher_epochs=${5:-5}
beta_lr=${6:-0.001}
suffix="" out="$runs"
[[ $beta_lr == 0.001 ]] || { suffix="_lr$beta_lr"; out="$runs/lr$beta_lr"; }
lscpu | grep -m1 "Model name" || true
# One JAX CPU device (see real_data_cifar10.sh).
common=(--config.num_cpu_devices=1 --config.data.dataset=cifar10 --config.data.source=npz
        "--config.data.path=$data" --config.teacher.model=wrn_16_2 --config.student.model=wrn_10_1
        --config.log_every_steps=10 --config.checkpoint_every_steps=1000)
python -m dfa_jax.main --config=configs/cifar100_pair3.py --workdir="$runs/teacher" "${common[@]}" \
  '--config.stages=("teacher",)' --config.teacher.optim.epochs="$teacher_epochs" \
  --config.teacher.optim.schedule=cosine
searches=()
for lam in 0.001 0.0; do
  for schedule in global per_group; do
    searches+=("$runs/lambda${lam}_${schedule}$suffix")
    python -m dfa_jax.main --config=configs/cifar100_pair3.py \
      --workdir="${searches[-1]}" "${common[@]}" \
      '--config.stages=("search",)' "--config.teacher.checkpoint=$runs/teacher" \
      --config.data.max_train_examples="$train_images" \
      --config.search.epochs_per_group="$epochs_per_group" --config.search.beta_lr="$beta_lr" \
      --config.search.beta_weight_decay="$lam" --config.search.w_schedule="$schedule"
  done
done
mkdir -p "$out"
python -m benchmarks.search_dynamics "${searches[@]}" --out "$out"
