"""RepDistiller's CIFAR-100 benchmark: wrn_40_2 -> wrn_40_1, DFA on the CRD recipe.

  python -m dfa_jax.main --config=configs/crd/wrn_40_2_to_wrn_40_1.py --workdir=runs/crd_wrn_40_2_wrn_40_1

Teacher (or --config.teacher.checkpoint=W, e.g. RepDistiller's wrn_40_2 imported with
`python -m dfa_jax.interop import`) -> search -> distill (240 epochs). Baselines beside DFA:
--config.distill.compare_with='("kd",)'. `:tiny` shrinks it to seconds.
"""

from dfa_jax import config_lib


def get_config(arg: str | None = None):
    return config_lib.apply_arg(config_lib.crd_pair("wrn_40_2", "wrn_40_1"), arg)
