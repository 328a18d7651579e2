"""Offline demo: the pipeline on scikit-learn's bundled `digits` (8x8 digits upsampled to 32x32).

  python -m dfa_jax.main --config=configs/demo.py --workdir=runs/demo

No network, no dataset download: the images ship inside scikit-learn. Trains a WRN_16_2 teacher
for 6 epochs (~140 steps of batch 64) in a few minutes on 2 CPU cores and reaches about 95%
test accuracy. `:tiny` shrinks it to seconds (tests).
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
  optim.epochs = 6
  optim.batch_size = 64
  optim.lr = 0.05
  optim.milestones = (4,)
  optim.decay = 0.1
  config.log_every_steps = 10
  config.checkpoint_every_steps = 50
  if arg == "tiny":
    config_lib.tiny(config)
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; use ':tiny' or nothing")
  return config
