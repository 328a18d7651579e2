"""Teacher of the paper's CIFAR-100 pairs: WRN_28_4 with the paper's recipe (Table 2: 79.17%).

  python -m dfa_jax.main --config=configs/cifar100_teacher.py --workdir=runs/c100_teacher

200 epochs of batch 128 (78k steps). Needs CIFAR-100 prepared for tfds (`tfds build cifar100`
on a connected machine, then --config.data.data_dir=DIR). `:tiny` shrinks it to seconds.
"""

from dfa_jax import config_lib


def get_config(arg: str | None = None):
    config = config_lib.base_config()
    config.stages = ("teacher",)
    config.data.dataset = "cifar100"
    config.data.source = "tfds"
    config.teacher.model = "wrn_28_4"
    config.teacher.optim = config_lib.optim_recipe("paper")
    return config_lib.apply_arg(config, arg)
