"""RepDistiller's CIFAR-100 benchmark: resnet110 -> resnet32, DFA on the CRD recipe.

  python -m dfa_jax.main --config=configs/crd/resnet110_to_resnet32.py --workdir=runs/crd_resnet110_resnet32

Teacher (or --config.teacher.checkpoint=W, e.g. RepDistiller's resnet110 imported with
`python -m dfa_jax.interop import`) -> search -> distill (240 epochs). Baselines beside DFA:
--config.distill.compare_with='("kd",)'. `:tiny` shrinks it to seconds.
"""

from dfa_jax import config_lib


def get_config(arg: str | None = None):
    return config_lib.apply_arg(config_lib.crd_pair("resnet110", "resnet32"), arg)
