#!/usr/bin/env bash
# Table 5's protocol on real CIFAR-10 in one command: teacher -> search -> DFA, Last, Start (the
# search's starting alpha, unsearched), Average and the student alone, each over several seeds
# (one run: all their students train in one step that computes the teacher's forward once,
# cohort.py), then the report with the per-seed paired DFA - Last / Start / Average differences
# and their 95 % intervals.
#   bash benchmarks/protocol.sh cpu DATA RUNS   # 2-core CPU, < 60 min: npz shards (DATA = dir)
#   bash benchmarks/protocol.sh gpu DATA RUNS   # one GPU, < 10 min: image_folder (DATA = root)
# cpu: WRN_16_2 -> WRN_10_1 on 10,000 training images (2,000 test), 3 seeds, 3 epochs a network,
#      1 search epoch per group. gpu: the same pair on all 50,000, 5 seeds, 15 epochs a network
#      and 5 search epochs per group at beta lr 0.01, so that alpha can move away from Last.
# Re-running resumes; RUNS/report/ gets table5.md and paired.md. Figures go to BENCHMARKS.md.
set -euo pipefail
size=${1:?usage: protocol.sh cpu|gpu DATA RUNS}
data=${2:?usage: protocol.sh cpu|gpu DATA RUNS}
runs=${3:?usage: protocol.sh cpu|gpu DATA RUNS}
lscpu | grep -m1 "Model name" || true
common=(--config.data.dataset=cifar10
        --config.teacher.model=wrn_16_2 --config.student.model=wrn_10_1
        --config.teacher.optim.schedule=cosine --config.distill.optim.schedule=cosine
        --config.distill.aggregation=dfa '--config.distill.compare_with=("last","start","average","none")'
        --config.log_every_steps=50 --config.checkpoint_every_steps=500)
case "$size" in
  cpu)
    # One JAX CPU device: no in-process collective (BENCHMARKS.md, "Real CIFAR-10").
    sized=(--config.num_cpu_devices=1 --config.data.source=npz "--config.data.path=$data"
           --config.data.max_train_examples=10000 --config.data.max_test_examples=2000
           --config.teacher.optim.epochs=3 --config.distill.optim.epochs=3
           --config.search.epochs_per_group=1 --config.search.beta_lr=0.01
           '--config.distill.seeds=(0,1,2)') ;;
  gpu)
    sized=(--config.data.source=image_folder "--config.data.path=$data"
           --config.teacher.optim.epochs=15 --config.distill.optim.epochs=15
           --config.search.epochs_per_group=5 --config.search.beta_lr=0.01
           '--config.distill.seeds=(0,1,2,3,4)') ;;
  *) echo "size must be cpu or gpu, not $size" >&2; exit 2 ;;
esac
start=$(date +%s)
python -m dfa_jax.main --config=configs/cifar100_pair3.py --workdir="$runs/protocol" \
  "${common[@]}" "${sized[@]}"
python -m dfa_jax.report "$runs/protocol" --out "$runs/report"
echo "protocol ($size): $(( $(date +%s) - start )) s of wall time"
