"""CIFAR-100 pair (2): WRN_28_4 -> WRN_28_2 (Table 2 row 2: student alone 75.78%, DFA 78.18%).

  python -m dfa_jax.main --config=configs/cifar100_pair2.py --workdir=runs/c100_pair2

Teacher (or --config.teacher.checkpoint=W of a finished teacher) -> search (40 epochs per group on
the 7:3 split of the training set) -> distill (200 epochs, the paper's recipe with Nesterov).
Table 5 rows: the same command with --config.distill.aggregation=last|average|random.
Table 2's KD, AT, SP and Margin as the authors' own code ran them: add
--config.baselines.preset=authors (the default is RepDistiller's settings; README, Configs).
Needs CIFAR-100 prepared for tfds (--config.data.data_dir=DIR). `:tiny` shrinks it to seconds.
"""

from dfa_jax import config_lib


def get_config(arg: str | None = None):
    return config_lib.apply_arg(config_lib.cifar100_pair("wrn_28_2"), arg)
