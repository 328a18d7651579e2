"""Offline demo: the pipeline on scikit-learn's bundled `digits` (8x8 digits upsampled to 32x32).

  python -m dfa_jax.main --config=configs/demo.py --workdir=runs/demo

No network, no dataset download: the images ship inside scikit-learn (1438 train / 359 test).
Trains a WRN_16_2 teacher for 10 epochs (220 steps of batch 64): 69-110 s and 96.94 % test
accuracy on a 2-core AMD EPYC of family 25 model 17 (59-76 s on 2-core Intel Xeons, which
compile other programs and train to other numbers). The search logs every group's
alpha at its start and its end, and the run prints the searched alpha. `:tiny` shrinks it to seconds
(tests).

The search's beta learning rate is 0.05, not the paper's 1e-3: under a steady one-signed
gradient Adam moves each beta by about its learning rate per step (more only where the gradient
grows after a quieter stretch), and the paper's rate is sized for ~11k beta steps per group,
where the demo has 75 (5 epochs of 1004 images in batches of 64). At 1e-3 a steady push would
move beta by 0.075 and alpha would stay near where it starts (0.982 on the last map); at 0.05
one moves it by ~3.75, the size of the starting gap. Tested in tests/test_search_distill.py.
"""

from dfa_jax import config_lib


def get_config(arg: str | None = None):
    config = config_lib.base_config()
    config.stages = ("teacher", "search", "distill")
    config.data.dataset = "digits"
    config.data.source = "bundled"
    config.data.eval_batch_size = 120
    config.teacher.model = "wrn_16_2"
    config.student.model = "wrn_10_1"
    for optim in (config.teacher.optim, config.distill.optim):  # distill keeps its Nesterov.
        optim.epochs = 10
        optim.batch_size = 64
        optim.lr = 0.05
        optim.milestones = (7,)
        optim.decay = 0.1
    config.search.epochs_per_group = 5
    config.search.batch_size = 64
    config.search.beta_lr = 0.05  # Sized to the demo's 75 beta steps per group (docstring).
    config.distill.aggregation = "dfa"
    config.distill.compare_with = ("last", "none")
    config.log_every_steps = 10
    config.checkpoint_every_steps = 50
    return config_lib.apply_arg(config, arg)
