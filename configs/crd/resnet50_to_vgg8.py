"""RepDistiller's CIFAR-100 benchmark: ResNet50 -> vgg8, DFA on the CRD recipe.

  python -m dfa_jax.main --config=configs/crd/resnet50_to_vgg8.py --workdir=runs/crd_resnet50_vgg8

Teacher (or --config.teacher.checkpoint=W, e.g. RepDistiller's ResNet50 imported with
`python -m dfa_jax.interop import`) -> search -> distill (240 epochs). The student's
first groups end at half the teacher's sizes: the teacher's maps are average-pooled to the
student's (mdistiller's OFD). Baselines beside DFA:
--config.distill.compare_with='("kd",)'. `:tiny` shrinks it to seconds.
"""

from dfa_jax import config_lib


def get_config(arg: str | None = None):
    return config_lib.apply_arg(config_lib.crd_pair("ResNet50", "vgg8"), arg)
