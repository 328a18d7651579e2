"""The one step factory every stage trains with: a beta step on a val batch, then a w step.

The DFA search (DARTS order) alternates two optax updates inside one jitted step: first the
architecture parameters beta on a validation batch, then the weights w (student + helpers) on a
training batch. Distillation and teacher training reuse the same step with beta frozen, which
skips the beta half entirely (a static switch, so nothing of it is traced). beta and w have separate
optimizers and separate optimizer states, and each update differentiates only its own pytree: a
shared `optax.partition` would still let Adam's moments move the "frozen" half.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

PyTree = Any
# A beta loss may return, among its metrics, the gradient of its student-to-teacher part with
# respect to the searched beta (shaped like it): the step then logs the shares of beta's gradient
# that this part and the rest of the loss contribute.
BETA_GRAD_ST = "beta_grad_st"
# (params, batch_stats, beta, batch, rng, aux) -> (loss, (new_batch_stats, metrics))
WLossFn = Callable[..., tuple[jax.Array, tuple[PyTree, dict]]]
# (beta, params, batch_stats, batch, rng, aux) -> (loss, metrics)
BetaLossFn = Callable[..., tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
    """Everything a stage updates. `beta` is `{}` in stages that have none (teacher)."""

    step: jax.Array  # int32 scalar: number of completed steps.
    params: PyTree  # w: trained by the w optimizer.
    batch_stats: PyTree  # BatchNorm running statistics of w's modules.
    opt_state: PyTree  # w optimizer state.
    beta: PyTree  # dict group -> aggregation logits [N_i]; frozen stages keep them constant.
    beta_opt_state: PyTree  # dict group -> beta optimizer state (separate from w's).


def create_state(
    params,
    batch_stats,
    tx: optax.GradientTransformation,
    beta=None,
    beta_tx: optax.GradientTransformation | None = None,
) -> TrainState:
    """A step-0 TrainState; beta's optimizer state is empty when beta is frozen (`beta_tx=None`).

    `beta` is a dict (one entry per group) with one optimizer state per entry, so that stepping
    one group's beta never advances another's Adam moments or step count.
    """
    beta = {} if beta is None else beta
    beta_opt_state = {} if beta_tx is None else {k: beta_tx.init(v) for k, v in beta.items()}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        beta=beta,
        beta_opt_state=beta_opt_state,
    )


def normalised_entropy(alpha: jax.Array) -> jax.Array:
    """H(alpha) / log N of weights alpha [N] (N > 1): 1 for uniform alpha ('Average'), 0 for one
    map alone; how far a group's search has spread or concentrated its weights."""
    return -jnp.sum(alpha * jnp.log(jnp.maximum(alpha, jnp.finfo(alpha.dtype).tiny))) / jnp.log(
        alpha.size
    )


def keep_untrained(new: PyTree, old: PyTree, trainable: PyTree) -> PyTree:
    """`new` where `trainable` (Python bools shaped like the params) is True, `old` elsewhere.

    `new` / `old` are params or optimizer states: every params-shaped subtree (the params
    themselves, momentum traces, Adam moments) is selected leaf by leaf; any other entry of a
    state (a step count) comes from `new`.
    """
    params_def = jax.tree.structure(trainable)

    def is_params(x):
        return jax.tree.structure(x) == params_def

    def select(n, o):
        if not is_params(n):
            return n
        return jax.tree.map(lambda t, a, b: a if t else b, trainable, n, o)

    return jax.tree.map(select, new, old, is_leaf=is_params)


def make_bilevel_step(
    w_loss_fn: WLossFn,
    w_tx: optax.GradientTransformation,
    seed: int,
    beta_loss_fn: BetaLossFn | None = None,
    beta_tx: optax.GradientTransformation | None = None,
    beta_key: str | None = None,
    order: int = 1,
    preprocess_fn: Callable[[dict, jax.Array], dict] | None = None,
    w_trainable: PyTree | None = None,
) -> Callable[..., tuple[TrainState, dict]]:
    """Builds `step(state, batch, val_batch, aux) -> (state, metrics)`, pure and jit-ready.

    Args:
      w_loss_fn: the stage's loss for w on a training batch; also returns the new BN statistics and
        scalar metrics.
      w_tx: w's optimizer.
      seed: base of the per-step randomness, `fold_in(key(seed), step)`, so a resumed run draws
        exactly what an uninterrupted one would.
      beta_loss_fn: the loss for beta on a validation batch; None freezes beta (the step then ignores
        `val_batch` and never touches beta or its optimizer state).
      beta_tx: beta's optimizer (required with `beta_loss_fn`).
      beta_key: with `beta_loss_fn`, the entry of the dict `state.beta` to step (the group being
        searched, Algorithm 1), with its own `state.beta_opt_state[beta_key]`; the other entries
        are not even differentiated, so they cannot move.
      order: 1 = first order (the beta gradient at the current w); 2 = exact second order: the
        gradient of L_val(w', beta) with respect to beta, where w' = w + w_tx's update for
        grad_w L_train(w, beta) is the step w is about to take (its schedule's rate, momentum
        and weight decay, as DARTS' `_compute_unrolled_model` takes theta - eta * (momentum *
        buffer + dtheta + wd * theta)), differentiated through exactly instead of by DARTS'
        finite differences.
      preprocess_fn: `(batch, rng) -> batch` applied on device to both batches (augmentation and
        normalisation), so the host only gathers uint8 images.
      w_trainable: a pytree of Python bools shaped like `state.params` (None: all True). The w
        update leaves a parameter marked False, and its part of the optimizer state, exactly as
        they are, as PyTorch's SGD skips a parameter that got no gradient; otherwise weight decay
        and momentum would move parameters the step's loss does not reach (the search's
        connectors of other groups).

    Returns:
      The step. `metrics` holds device scalars: the loss functions' metrics, `grad_norm`,
      `finite` (False when a loss or gradient is not finite) and, in a search, `beta_grad_norm`,
      `beta_grad/{j}` (|dL_val/dbeta_j|, the loss's gradient before the optimizer's L2),
      `beta_grad_signed/{j}` (the same with its sign), `beta_update/{j}` (the step the optimizer
      applied to beta_j, L2 and Adam included), `alpha_entropy` (`normalised_entropy` of the
      searched group's alpha after the step; groups of one map have none) and, when the beta
      loss returns `BETA_GRAD_ST`, `beta_share_st` / `beta_share_ts` (each part's L2 norm over
      the two norms' sum).
    """
    if not (beta_loss_fn is None) == (beta_tx is None) == (beta_key is None):
        raise ValueError("beta_loss_fn, beta_tx and beta_key must be given together")
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    preprocess = preprocess_fn or (lambda batch, rng: batch)

    def step(state: TrainState, batch: dict, val_batch: dict | None, aux: PyTree):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        rng_beta, rng_w, rng_aug_val, rng_aug = jax.random.split(rng, 4)
        metrics = {}
        finite = jnp.bool_(True)
        beta, beta_opt_state = state.beta, state.beta_opt_state
        batch = preprocess(batch, rng_aug)

        if beta_loss_fn is not None:
            val_batch = preprocess(val_batch, rng_aug_val)

            def val_loss(beta_part):
                full_beta = {**beta, beta_key: beta_part}
                params = state.params
                if order == 2:
                    # The step w is about to take on the training batch, differentiated through
                    # (w's optimizer state holds its momentum; only w's gradient depends on beta).
                    w_grads, _ = jax.grad(w_loss_fn, has_aux=True)(
                        params, state.batch_stats, full_beta, batch, rng_w, aux
                    )
                    updates, _ = w_tx.update(w_grads, state.opt_state, params)
                    virtual = optax.apply_updates(params, updates)
                    if w_trainable is not None:
                        virtual = keep_untrained(virtual, params, w_trainable)
                    params = virtual
                return beta_loss_fn(full_beta, params, state.batch_stats, val_batch, rng_beta, aux)

            part = beta[beta_key]
            (beta_loss, beta_metrics), beta_grads = jax.value_and_grad(val_loss, has_aux=True)(part)
            beta_metrics = dict(beta_metrics)
            grad_st = beta_metrics.pop(BETA_GRAD_ST, None)
            if grad_st is not None:
                st_norm = jnp.linalg.norm(grad_st)
                ts_norm = jnp.linalg.norm(beta_grads - grad_st)
                total = jnp.maximum(st_norm + ts_norm, jnp.finfo(jnp.float32).tiny)
                metrics["beta_share_st"] = st_norm / total
                metrics["beta_share_ts"] = ts_norm / total
            updates, part_opt_state = beta_tx.update(beta_grads, beta_opt_state[beta_key], part)
            new_part = optax.apply_updates(part, updates)
            # Magnitudes say which force is larger; the signed gradient and the step Adam took say
            # which way each map's logit was pushed and went (averaged over a logging interval:
            # the net push, and the distance moved per step).
            for j, (g, u) in enumerate(zip(beta_grads.reshape(-1), updates.reshape(-1))):
                metrics[f"beta_grad/{j}"] = jnp.abs(g)
                metrics[f"beta_grad_signed/{j}"] = g
                metrics[f"beta_update/{j}"] = u
            if new_part.size > 1:
                metrics["alpha_entropy"] = normalised_entropy(jax.nn.softmax(new_part))
            beta = {**beta, beta_key: new_part}
            beta_opt_state = {**beta_opt_state, beta_key: part_opt_state}
            beta_grad_norm = optax.global_norm(beta_grads)
            metrics.update({f"val/{k}": v for k, v in beta_metrics.items()})
            metrics["val/loss"] = beta_loss
            metrics["beta_grad_norm"] = beta_grad_norm
            finite &= jnp.isfinite(beta_loss) & jnp.isfinite(beta_grad_norm)

        (loss, (batch_stats, w_metrics)), grads = jax.value_and_grad(w_loss_fn, has_aux=True)(
            state.params, state.batch_stats, beta, batch, rng_w, aux
        )
        updates, opt_state = w_tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if w_trainable is not None:
            params = keep_untrained(params, state.params, w_trainable)
            opt_state = keep_untrained(opt_state, state.opt_state, w_trainable)
        grad_norm = optax.global_norm(grads)
        metrics.update(w_metrics)
        metrics["loss"] = loss
        metrics["grad_norm"] = grad_norm
        metrics["finite"] = finite & jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            beta=beta,
            beta_opt_state=beta_opt_state,
        )
        return new_state, metrics

    return step
