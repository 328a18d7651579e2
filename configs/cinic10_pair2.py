"""CINIC-10 pair (2): ShuffleNetV2 2.0x -> 0.5x (Table 4 row 2: student 77.34%, DFA 79.51%).

  python -m dfa_jax.main --config=configs/cinic10_pair2.py --workdir=runs/cinic_pair2 \
      --config.data.path=/path/to/CINIC-10

CINIC-10 as it ships: ROOT/{train,valid,test}/<class>/*.png. The search trains w on train and beta
on valid (5 epochs per group); the teacher and the distilled student train on train only, with
the paper's CINIC-10 recipe (lr 0.01, x0.1 at 100/120 of 140 epochs, batch 96).
`:tiny` shrinks it to seconds. Table 4's AT, SP and Margin columns ran the authors' baseline
code: `--config.distill.compare_with='("at","sp","margin")' --config.baselines.preset=authors`.
"""

from dfa_jax import config_lib


def get_config(arg: str | None = None):
    config = config_lib.cinic10_pair("shufflenet_v2_2.0", "shufflenet_v2_0.5")
    return config_lib.apply_arg(config, arg)
