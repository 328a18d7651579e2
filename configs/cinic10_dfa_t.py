"""DFA-T (Table 4): search the aggregation on CIFAR-100, distill with it on CINIC-10.

First search on CIFAR-100 with the same ShuffleNetV2 teacher/student architectures:

  python -m dfa_jax.main --config=configs/cifar100_pair1.py --workdir=runs/c100_shufflenet \
      --config.teacher.model=shufflenet_v2_2.0 --config.student.model=shufflenet_v2_1.0 \
      --config.teacher.optim.lr=0.01 --config.stages='("teacher","search")'

(the paper does not say how; lr 0.01 is how RepDistiller and the authors' CINIC-10 scripts train
a ShuffleNet, where the WRN recipe's 0.1 is the pair config's default),

then distill on CINIC-10 with that run's alpha.json:

  python -m dfa_jax.main --config=configs/cinic10_dfa_t.py --workdir=runs/cinic_dfa_t \
      --config.data.path=/path/to/CINIC-10 --config.distill.alpha_file=runs/c100_shufflenet/alpha.json

An alpha.json of another teacher layout is refused with the mismatching groups named.
"""

from dfa_jax import config_lib


def get_config(arg: str | None = None):
    config = config_lib.cinic10_pair("shufflenet_v2_2.0", "shufflenet_v2_1.0")
    config.stages = ("teacher", "distill")  # No search here: alpha comes from CIFAR-100.
    config.distill.aggregation = "file"
    return config_lib.apply_arg(config, arg)
