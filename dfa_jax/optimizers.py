"""Optimisers and learning-rate schedules from an `optim` sub-config (see config_lib.optim_recipe)."""

from __future__ import annotations

import optax


def lr_schedule(optim, steps_per_epoch: int) -> optax.Schedule:
    """The per-step learning rate: step decay at epoch milestones, cosine, or constant."""
    if optim.schedule == "step":
        boundaries = {int(m * steps_per_epoch): optim.decay for m in optim.milestones}
        return optax.piecewise_constant_schedule(optim.lr, boundaries)
    if optim.schedule == "cosine":
        return optax.cosine_decay_schedule(optim.lr, decay_steps=optim.epochs * steps_per_epoch)
    if optim.schedule == "constant":
        return optax.constant_schedule(optim.lr)
    raise ValueError(f"unknown schedule {optim.schedule!r}")


def sgd(
    optim, steps_per_epoch: int, schedule: optax.Schedule | None = None
) -> optax.GradientTransformation:
    """SGD with momentum and *coupled* weight decay, as PyTorch's `SGD(weight_decay=...)`.

    The decay is added to the gradient before momentum (`add_decayed_weights` first), which is what
    the paper's recipe (and every peer's PyTorch code) does; it applies to all parameters the step
    trains, BN's too. `schedule` replaces `optim`'s learning-rate schedule.
    """
    return optax.chain(
        optax.add_decayed_weights(optim.weight_decay),
        optax.sgd(
            schedule or lr_schedule(optim, steps_per_epoch),
            momentum=optim.momentum,
            nesterov=optim.nesterov,
        ),
    )
