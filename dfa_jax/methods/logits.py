"""Methods that read the networks' outputs only: the student alone, KD and Jacobian matching."""

from __future__ import annotations

import jax

from dfa_jax import baseline_presets
from dfa_jax import losses
from dfa_jax.methods import common


def cross_entropy_loss(pair: common.Pair, config, constants=None) -> common.LossFn:
    """The label cross-entropy alone (the student alone; AB after its initialisation)."""
    del constants
    return common.student_loss(pair, config, lambda step: step.ce, teacher_features=False)


NONE = common.Implementation(loss=cross_entropy_loss)


def _kd_loss(pair, config, constants):
    """kd_ce_weight * CE + kd_weight * T^2 KL(p_t || p_s) at T = kd_temperature (preset's)."""
    del constants
    preset = baseline_presets.settings(config)

    def term(step):
        t_logits, _ = step.teacher()
        kd = losses.kd_loss(step.logits, t_logits, preset.kd_temperature)
        step.metrics["kd_loss"] = kd
        return preset.kd_ce_weight * step.ce + preset.kd_weight * kd

    return common.student_loss(pair, config, term, teacher_features=False)


def _kd_check(config) -> list[str]:
    base = config.baselines
    problems = []
    if not base.kd_temperature > 0:
        problems.append(
            f"baselines.kd_temperature = {base.kd_temperature}: must be positive (RepDistiller: 4)."
        )
    return problems + common.non_negative(config, "kd_weight", "kd_ce_weight")


KD = common.Implementation(loss=_kd_loss, check=_kd_check)


def jacobian_term(pair: common.Pair, params, batch_stats, aux, images, labels) -> jax.Array:
    """Jacobian matching: distance of the normalised input gradients of the true-class logit."""

    def student_logits(variables, x):
        return pair.student.apply(variables, x, train=True, mutable=["batch_stats"])[0]

    def teacher_logits(variables, x):
        return pair.teacher.apply(variables, x, train=False)

    s_vars = {"params": params["student"], "batch_stats": batch_stats["student"]}
    grad_s = losses.target_logit_input_grad(student_logits, s_vars, images, labels)
    grad_t = jax.lax.stop_gradient(
        losses.target_logit_input_grad(
            teacher_logits, common.teacher_variables(aux), images, labels
        )
    )
    return losses.jacobian_loss(grad_s, grad_t)


def _jacobian_loss(pair, config, constants):
    """CE + jacobian_weight * Jacobian matching (Knowledge-Distillation-Zoo's Sobolev)."""
    del constants
    weight = config.baselines.jacobian_weight

    def term(step):
        jac = jacobian_term(pair, step.params, step.batch_stats, step.aux, step.images, step.labels)
        step.metrics["jacobian_loss"] = jac
        return step.ce + weight * jac

    return common.student_loss(pair, config, term, teacher_features=False)


JACOBIAN = common.Implementation(
    loss=_jacobian_loss, check=lambda config: common.non_negative(config, "jacobian_weight")
)
