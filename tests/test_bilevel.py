"""The one step factory: beta and w updates stay apart, frozen beta is a plain w step, group-wise
beta updates touch one group only, and second order is the exact unrolled gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dfa_jax import bilevel

X = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
Y = np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32)


def toy_w_loss(params, batch_stats, beta, batch, rng, aux):
    """A tiny 'network': y = x W, aggregated by softmax(beta) weights over 3 outputs per group."""
    del rng, aux
    out = batch["x"] @ params["W"]
    mix = jax.nn.softmax(beta["g1"]) * out + jax.nn.softmax(beta["g2"]).mean() * out**2
    loss = jnp.mean((mix - batch["y"]) ** 2) + 0.1 * jnp.mean(params["W"] ** 2)
    return loss, (batch_stats, {"mix": jnp.mean(mix)})


def toy_beta_loss(beta, params, batch_stats, batch, rng, aux):
    loss, (_, metrics) = toy_w_loss(params, batch_stats, beta, batch, rng, aux)
    return loss, metrics


def toy_state(w_tx, beta_tx=None):
    params = {"W": jnp.asarray(np.random.default_rng(2).normal(size=(5, 3)), jnp.float32)}
    beta = {"g1": jnp.array([0.0, 0.5, 1.0]), "g2": jnp.array([0.3, -0.2, 0.0])}
    return bilevel.create_state(params, {}, w_tx, beta, beta_tx)


BATCH = {"x": jnp.asarray(X), "y": jnp.asarray(Y)}
VAL = {"x": jnp.asarray(X[::-1].copy()), "y": jnp.asarray(Y[::-1].copy())}


def run_step(state, w_tx, beta_tx=None, beta_key=None, order=1):
    step = bilevel.make_bilevel_step(
        toy_w_loss,
        w_tx,
        seed=0,
        beta_loss_fn=toy_beta_loss if beta_tx is not None else None,
        beta_tx=beta_tx,
        beta_key=beta_key,
        order=order,
    )
    return jax.jit(step)(state, BATCH, VAL, None)


def test_beta_step_leaves_w_and_w_step_leaves_beta():
    # Only the beta half moves when w's optimizer is a no-op...
    beta_tx = optax.adam(0.1)
    state = toy_state(optax.set_to_zero(), beta_tx)
    new, _ = run_step(state, optax.set_to_zero(), beta_tx, "g1")
    np.testing.assert_array_equal(new.params["W"], state.params["W"])
    assert not np.allclose(new.beta["g1"], state.beta["g1"])
    # ...and only w moves when beta's optimizer is a no-op.
    state = toy_state(optax.sgd(0.1), optax.set_to_zero())
    new, _ = run_step(state, optax.sgd(0.1), optax.set_to_zero(), "g1")
    jax.tree.map(np.testing.assert_array_equal, new.beta, state.beta)
    assert not np.allclose(new.params["W"], state.params["W"])


def test_one_step_moves_beta_on_the_validation_batch_then_w_with_the_new_beta():
    """Algorithm 1's order, by hand: beta takes the first-order gradient of the loss on the
    validation batch at the current w, then w the gradient of the training batch's loss at the
    updated beta (not the beta the step started from)."""
    # A validation batch of other images (VAL's rows are BATCH's reversed: the same mean loss).
    val = {"x": BATCH["x"][:4] * 2.0 + 1.0, "y": BATCH["y"][4:]}
    state = toy_state(optax.sgd(0.1), optax.sgd(1.0))
    step = bilevel.make_bilevel_step(
        toy_w_loss,
        optax.sgd(0.1),
        seed=0,
        beta_loss_fn=toy_beta_loss,
        beta_tx=optax.sgd(1.0),
        beta_key="g1",
    )
    new, _ = jax.jit(step)(state, BATCH, val, None)
    grad_beta = jax.grad(
        lambda b: toy_w_loss(state.params, {}, {**state.beta, "g1": b}, val, None, None)[0]
    )(state.beta["g1"])
    np.testing.assert_allclose(new.beta["g1"], state.beta["g1"] - grad_beta, rtol=1e-5)
    np.testing.assert_array_equal(new.beta["g2"], state.beta["g2"])
    # Not the training batch's gradient (the two batches pull beta apart here).
    on_train = jax.grad(
        lambda b: toy_w_loss(state.params, {}, {**state.beta, "g1": b}, BATCH, None, None)[0]
    )(state.beta["g1"])
    assert not np.allclose(grad_beta, on_train, rtol=1e-3)

    def w_after(beta):
        grad = jax.grad(lambda p: toy_w_loss(p, {}, beta, BATCH, None, None)[0])(state.params)
        return state.params["W"] - 0.1 * grad["W"]

    np.testing.assert_allclose(new.params["W"], w_after(new.beta), rtol=1e-5, atol=1e-7)
    # The beta the step started from would have given another w.
    assert not np.allclose(w_after(state.beta), w_after(new.beta), rtol=1e-4, atol=1e-6)


def test_the_searchs_beta_optimizer_is_adam_with_coupled_l2():
    """`search.beta_optimizer` (what the search runs), against Adam in NumPy on g + lambda*beta
    (the paper's lambda R(beta) as DARTS' architect couples it): two steps, so that swapped
    b1 and b2 show (Adam's first step is +-lr whatever they are)."""
    from dfa_jax import search  # pylint: disable=g-import-not-at-top
    import ml_collections  # pylint: disable=g-import-not-at-top

    cfg = ml_collections.ConfigDict(
        {"beta_lr": 0.02, "beta_b1": 0.6, "beta_b2": 0.95, "beta_weight_decay": 0.3}
    )
    tx = search.beta_optimizer(cfg)
    beta = np.array([0.5, -1.0, 2.0], np.float32)
    grads = [np.array([0.3, -0.1, 0.05], np.float32), np.array([-0.2, 0.4, 0.1], np.float32)]
    got, opt = jnp.asarray(beta), tx.init(jnp.asarray(beta))
    want, m, v = beta.astype(np.float64), 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        updates, opt = tx.update(jnp.asarray(g), opt, got)
        got = optax.apply_updates(got, updates)
        coupled = g + 0.3 * want
        m = 0.6 * m + 0.4 * coupled
        v = 0.95 * v + 0.05 * coupled**2
        want = want - 0.02 * (m / (1 - 0.6**t)) / (np.sqrt(v / (1 - 0.95**t)) + 1e-8)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_frozen_beta_is_a_plain_w_step():
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    state = toy_state(tx)
    new, metrics = run_step(state, tx)
    jax.tree.map(np.testing.assert_array_equal, new.beta, state.beta)
    assert new.beta_opt_state == {}
    # The same update done by hand.
    grads = jax.grad(lambda p: toy_w_loss(p, {}, state.beta, BATCH, None, None)[0])(state.params)
    updates, _ = tx.update(grads, tx.init(state.params), state.params)
    expected = optax.apply_updates(state.params, updates)
    np.testing.assert_allclose(new.params["W"], expected["W"], rtol=1e-6)
    assert int(new.step) == 1 and bool(metrics["finite"])


def test_only_the_searched_group_beta_moves_even_with_weight_decay():
    beta_tx = optax.chain(
        optax.add_decayed_weights(1e-3), optax.scale_by_adam(0.5, 0.999), optax.scale(-1e-3)
    )
    state = toy_state(optax.sgd(0.1), beta_tx)
    for _ in range(3):
        state, _ = run_step(state, optax.sgd(0.1), beta_tx, "g2")
    np.testing.assert_array_equal(state.beta["g1"], np.array([0.0, 0.5, 1.0], np.float32))
    assert not np.allclose(state.beta["g2"], np.array([0.3, -0.2, 0.0]))
    # g1's Adam state was never advanced either.
    assert int(state.beta_opt_state["g1"][1].count) == 0
    assert int(state.beta_opt_state["g2"][1].count) == 3


@pytest.mark.parametrize("momentum, weight_decay", [(None, 0.0), (0.9, 0.05)])
def test_second_order_is_the_exact_unrolled_gradient(momentum, weight_decay):
    """d L_val(w', beta) / d beta with w' the step w is about to take, as DARTS' unrolled model:
    w' = w - xi * (momentum * buffer + grad + wd * w), checked by central differences in NumPy
    terms (a momentum buffer left by an earlier step; plain SGD: w' = w - xi * grad). The
    virtual step is taken on the training batch and only L_val reads the validation batch, here
    no reordering of the training one (a mean over rows cannot tell a permuted batch apart)."""
    xi = 0.3
    with jax.enable_x64(True):
        params = {"W": jnp.asarray(np.random.default_rng(2).normal(size=(5, 3)))}
        beta = {"g1": jnp.array([0.0, 0.5, 1.0]), "g2": jnp.array([0.3, -0.2, 0.0])}
        batch = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), BATCH)
        rng = np.random.default_rng(4)
        val = {"x": jnp.asarray(rng.normal(size=(8, 5))), "y": jnp.asarray(rng.normal(size=(8, 3)))}
        w_tx = optax.chain(
            optax.add_decayed_weights(weight_decay), optax.sgd(xi, momentum=momentum)
        )
        state = bilevel.create_state(params, {}, w_tx, beta, optax.sgd(1.0))
        earlier = {"W": jnp.asarray(np.random.default_rng(3).normal(size=(5, 3)))}
        _, opt_state = w_tx.update(earlier, state.opt_state, params)  # Fills the buffer.
        state = state.replace(opt_state=opt_state)
        buffer = earlier["W"] + weight_decay * params["W"] if momentum else 0.0

        def unrolled(b1):
            full = {**beta, "g1": b1}
            g = jax.grad(lambda p: toy_w_loss(p, {}, full, batch, None, None)[0])(params)["W"]
            velocity = g + weight_decay * params["W"] + (momentum or 0.0) * buffer
            virtual = {"W": params["W"] - xi * velocity}
            return toy_w_loss(virtual, {}, full, val, None, None)[0]

        eps = 1e-6
        fd = np.array(
            [
                (unrolled(beta["g1"].at[j].add(eps)) - unrolled(beta["g1"].at[j].add(-eps)))
                / (2 * eps)
                for j in range(3)
            ]
        )
        # The step's beta gradient, read off a plain SGD(lr=1) beta update.
        steps = {
            order: bilevel.make_bilevel_step(
                toy_w_loss,
                w_tx,
                seed=0,
                beta_loss_fn=toy_beta_loss,
                beta_tx=optax.sgd(1.0),
                beta_key="g1",
                order=order,
            )
            for order in (1, 2)
        }
        new, _ = steps[2](state, batch, val, None)
        grad2 = np.asarray(beta["g1"] - new.beta["g1"])
        np.testing.assert_allclose(grad2, fd, rtol=1e-6, atol=1e-9)
        # And it is not the first-order gradient.
        new1, _ = steps[1](state, batch, val, None)
        assert not np.allclose(np.asarray(beta["g1"] - new1.beta["g1"]), fd, rtol=1e-3)


def test_factory_rejects_half_configured_beta():
    with pytest.raises(ValueError, match="together"):
        bilevel.make_bilevel_step(toy_w_loss, optax.sgd(0.1), 0, beta_loss_fn=toy_beta_loss)
    with pytest.raises(ValueError, match="order"):
        bilevel.make_bilevel_step(
            toy_w_loss, optax.sgd(0.1), 0, toy_beta_loss, optax.sgd(1.0), "g1", order=3
        )


def test_untrained_parameters_and_their_optimizer_state_stay_exactly_as_they_are():
    """A parameter marked untrained does not move, though weight decay and momentum would move
    it with a zero gradient (PyTorch's SGD skips a parameter without a gradient)."""
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
    params = {
        "W": jnp.asarray(np.random.default_rng(2).normal(size=(5, 3)), jnp.float32),
        "unused": jnp.ones((4,), jnp.float32),  # Not in the loss: a zero gradient.
    }
    trainable = {"W": True, "unused": False}
    state = bilevel.create_state(params, {}, tx, {"g1": jnp.zeros(3), "g2": jnp.zeros(3)})
    # A momentum buffer already holding a value, as after earlier training of that parameter.
    trace = state.opt_state[1][0].trace
    state = state.replace(
        opt_state=(
            state.opt_state[0],
            (state.opt_state[1][0]._replace(trace={**trace, "unused": jnp.full((4,), 0.5)}),)
            + tuple(state.opt_state[1][1:]),
        )
    )
    masked = bilevel.make_bilevel_step(toy_w_loss, tx, seed=0, w_trainable=trainable)
    plain = bilevel.make_bilevel_step(toy_w_loss, tx, seed=0)
    new, _ = jax.jit(masked)(state, BATCH, None, None)
    new, _ = jax.jit(masked)(new, BATCH, None, None)
    moved, _ = jax.jit(plain)(state, BATCH, None, None)
    assert not np.array_equal(moved.params["unused"], params["unused"])  # What it guards against.
    np.testing.assert_array_equal(new.params["unused"], params["unused"])
    np.testing.assert_array_equal(new.opt_state[1][0].trace["unused"], 0.5)
    # The trained parameter gets the unmasked step's update (another program: to rounding).
    ref, _ = jax.jit(plain)(state, BATCH, None, None)
    ref, _ = jax.jit(plain)(ref, BATCH, None, None)
    np.testing.assert_allclose(new.params["W"], ref.params["W"], rtol=1e-6, atol=1e-7)


def test_beta_gradient_diagnostics():
    """Per element |dL/dbeta_j|, the signed gradient, the step Adam applied, the entropy of the
    new alpha, and the ST part's share of the gradient's norm against the rest (a NumPy
    re-derivation on a loss whose two parts have known gradients)."""
    a = jnp.array([0.3, -1.0, 2.0])

    def beta_loss(beta, params, batch_stats, batch, rng, aux):
        del params, batch_stats, batch, rng, aux
        b = beta["g1"]
        st_part = jnp.sum(a * b)  # gradient a
        rest = jnp.sum(b**2)  # gradient 2b
        return st_part + rest, {bilevel.BETA_GRAD_ST: a}

    beta_tx = optax.adam(0.1)
    state = toy_state(optax.sgd(0.1), beta_tx)
    step = bilevel.make_bilevel_step(
        toy_w_loss, optax.sgd(0.1), seed=0, beta_loss_fn=beta_loss, beta_tx=beta_tx, beta_key="g1"
    )
    # beta_1 = 0.2: its gradient -1 + 0.4 is negative, so a magnitude alone would hide its sign.
    state = state.replace(beta={**state.beta, "g1": jnp.array([0.0, 0.2, 1.0])})
    new, metrics = jax.jit(step)(state, BATCH, VAL, None)
    b = np.array([0.0, 0.2, 1.0])
    total = np.array(a) + 2 * b
    moved = np.asarray(new.beta["g1"]) - b
    for j in range(3):
        assert float(metrics[f"beta_grad/{j}"]) == pytest.approx(abs(total[j]), rel=1e-6)
        assert float(metrics[f"beta_grad_signed/{j}"]) == pytest.approx(total[j], rel=1e-6)
        # Adam's first step is -lr * sign(gradient) (to its epsilon).
        assert float(metrics[f"beta_update/{j}"]) == pytest.approx(moved[j], rel=1e-5, abs=1e-7)
        assert moved[j] == pytest.approx(-0.1 * np.sign(total[j]), rel=1e-4)
    alpha = np.exp(np.asarray(new.beta["g1"])) / np.exp(np.asarray(new.beta["g1"])).sum()
    entropy = -np.sum(alpha * np.log(alpha)) / np.log(3)
    assert float(metrics["alpha_entropy"]) == pytest.approx(entropy, rel=1e-5)
    st, ts = np.linalg.norm(a), np.linalg.norm(2 * b)
    assert float(metrics["beta_share_st"]) == pytest.approx(st / (st + ts), rel=1e-6)
    assert float(metrics["beta_share_ts"]) == pytest.approx(ts / (st + ts), rel=1e-6)
    assert bilevel.BETA_GRAD_ST not in metrics and f"val/{bilevel.BETA_GRAD_ST}" not in metrics


def test_each_step_augments_with_fresh_draws_the_same_for_the_same_step():
    """The augmentation key is the seed folded with the step: every step (and the training and
    validation batch of one step) draws anew, and a step taken again (a resumed run) draws
    the same."""

    def preprocess(batch, rng):  # Records the step's draw in the batch it augments.
        return {**batch, "draw": jax.random.uniform(rng, ())}

    def w_loss(params, batch_stats, beta, batch, rng, aux):
        loss, (batch_stats, metrics) = toy_w_loss(params, batch_stats, beta, batch, rng, aux)
        return loss, (batch_stats, {**metrics, "draw": batch["draw"]})

    def beta_loss(beta, params, batch_stats, batch, rng, aux):
        loss, (_, metrics) = w_loss(params, batch_stats, beta, batch, rng, aux)
        return loss, metrics

    def draws(seed, state):
        step = bilevel.make_bilevel_step(
            w_loss,
            optax.sgd(0.1),
            seed=seed,
            beta_loss_fn=beta_loss,
            beta_tx=optax.sgd(0.1),
            beta_key="g1",
            preprocess_fn=preprocess,
        )
        new, metrics = jax.jit(step)(state, BATCH, VAL, None)
        return new, (float(metrics["draw"]), float(metrics["val/draw"]))

    start = toy_state(optax.sgd(0.1), optax.sgd(0.1))
    after_one, first = draws(0, start)
    _, second = draws(0, after_one)
    assert len(set(first + second)) == 4  # per step, per batch
    assert draws(0, start)[1] == first  # the same step, the same draws
    assert draws(1, start)[1] != first  # another seed, others


def test_untrained_parameters_leave_the_schedules_step_count_running():
    """With `w_trainable`, the optimizer's step count still advances: the second step takes the
    schedule's second rate (the search's cosine must decay though each group leaves the other
    groups' connectors untrained). By hand: plain SGD at 0.1, then 0.05 from step 1 on."""
    tx = optax.sgd(optax.piecewise_constant_schedule(0.1, {1: 0.5}))
    params = {
        "W": jnp.asarray(np.random.default_rng(2).normal(size=(5, 3)), jnp.float32),
        "unused": jnp.ones((4,), jnp.float32),
    }
    state = bilevel.create_state(params, {}, tx, {"g1": jnp.zeros(3), "g2": jnp.zeros(3)})
    step = jax.jit(
        bilevel.make_bilevel_step(toy_w_loss, tx, seed=0, w_trainable={"W": True, "unused": False})
    )
    rates = []
    for _ in range(2):
        grad = jax.grad(lambda p: toy_w_loss(p, {}, state.beta, BATCH, None, None)[0])(
            state.params
        )["W"]
        new, _ = step(state, BATCH, None, None)
        moved = np.asarray(state.params["W"] - new.params["W"])
        rates.append(float(np.sum(moved * grad) / np.sum(grad * grad)))
        np.testing.assert_allclose(moved, rates[-1] * np.asarray(grad), rtol=1e-4, atol=1e-7)
        state = new
    assert rates == pytest.approx([0.1, 0.05], rel=1e-4)
