"""Offline demo: the pipeline on scikit-learn's bundled `digits` (8x8 digits upsampled to 32x32).

  python -m dfa_jax.main --config=configs/demo.py --workdir=runs/demo

No network, no dataset download: the images ship inside scikit-learn (1438 train / 359 test).
Trains a WRN_16_2 teacher for 10 epochs (220 steps of batch 64): measured 85 s and 96.1% test
accuracy on a 2-core Intel Xeon. `:tiny` shrinks it to seconds (tests).
"""

from dfa_jax import config_lib


def get_config(arg: str | None = None):
    config = config_lib.base_config()
    config.stages = ("teacher",)
    config.data.dataset = "digits"
    config.data.source = "bundled"
    config.data.eval_batch_size = 120
    config.teacher.model = "wrn_16_2"
    config.student.model = "wrn_10_1"
    optim = config.teacher.optim
    optim.epochs = 10
    optim.batch_size = 64
    optim.lr = 0.05
    optim.milestones = (7,)
    optim.decay = 0.1
    config.log_every_steps = 10
    config.checkpoint_every_steps = 50
    if arg == "tiny":
        config_lib.tiny(config)
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; use ':tiny' or nothing")
    return config
