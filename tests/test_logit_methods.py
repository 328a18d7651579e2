"""The later logit baselines: DKD, DIST and logit standardisation (KD+LS, DKD+LS).

Each pure loss is checked against a NumPy reference written here from the papers' and the
reference code's semantics, and against a small PyTorch transcription of the reference forward
(mdistiller's DKD, DIST_KD's DIST, logit-standardization-KD's normalize + KD); then the methods
train through `distill.build_stage`, their config checks reach `validate`, DKD's warm-up and
per-pair beta are as mdistiller's, and the report keeps the paper's Table 2.
"""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfa_jax import (
    config_lib,
    distill,
    errors,
    inputs,
    losses,
    method_registry,
    methods,
    paper_results,
    parallel,
    report,
)
from dfa_jax import teacher as teacher_lib
from dfa_jax.data import loader, sources
from dfa_jax.methods import logit_targets

NEW = ("dkd", "dist", "kd_ls", "dkd_ls")

# ------------------------------------------------------------------------- NumPy references


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _np_standardize(z):
    z = np.asarray(z, np.float64)
    k = z.shape[1]
    mean = z.mean(axis=1, keepdims=True)
    std = np.sqrt(((z - mean) ** 2).sum(axis=1, keepdims=True) / (k - 1))  # Unbiased.
    return (z - mean) / (1e-7 + std)


def _np_kl(p, q):
    """sum p log(p / q) with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum()


def _np_kd(s, t, temperature):
    p_s, p_t = _softmax(s / temperature), _softmax(t / temperature)
    return _np_kl(p_t, p_s) * temperature**2 / s.shape[0]


def _np_dkd(s, t, labels, alpha, beta, temperature):
    """DKD from its definition: TCKD on (p_target, 1 - p_target), NCKD on the non-target
    classes renormalised (the reference's `- 1000 * gt` leaves e^-1000 ~ 0 on the target)."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    b, k = s.shape
    p_s, p_t = _softmax(s / temperature), _softmax(t / temperature)
    rows = np.arange(b)
    bs = np.stack([p_s[rows, labels], 1 - p_s[rows, labels]], 1)
    bt = np.stack([p_t[rows, labels], 1 - p_t[rows, labels]], 1)
    tckd = _np_kl(bt, bs)
    other = np.ones((b, k), bool)
    other[rows, labels] = False
    ns = _softmax(np.where(other, s / temperature, -np.inf))
    nt = _softmax(np.where(other, t / temperature, -np.inf))
    nckd = _np_kl(nt, np.where(other, ns, 1.0))
    return (alpha * tckd + beta * nckd) * temperature**2 / b


def _np_pearson(a, b):
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-8)


def _np_dist(s, t, beta, gamma, temperature):
    y_s = _softmax(np.asarray(s, np.float64) / temperature)
    y_t = _softmax(np.asarray(t, np.float64) / temperature)
    inter = 1 - _np_pearson(y_s, y_t).mean()
    intra = 1 - _np_pearson(y_s.T, y_t.T).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def _cases():
    """(name, student [B, K], teacher [B, K], labels [B]) float32: random, ties, large."""
    rng = np.random.default_rng(0)
    b, k = 8, 10
    labels = rng.integers(0, k, b).astype(np.int32)
    normal = (rng.normal(size=(b, k)) * 3, rng.normal(size=(b, k)) * 3)
    ties = (rng.integers(-2, 3, (b, k)).astype(float), rng.integers(-2, 3, (b, k)).astype(float))
    ties[0][0] = 1.0  # A constant row: its standard deviation is 0.
    ties[1][1] = ties[0][1]  # Teacher equal to student.
    large = (rng.normal(size=(b, k)) * 12, rng.normal(size=(b, k)) * 12)
    out = []
    for name, (s, t) in (("random", normal), ("ties", ties), ("large", large)):
        out.append((name, s.astype(np.float32), t.astype(np.float32), labels))
    return out


CASES = _cases()
_IDS = [c[0] for c in CASES]


def _close(value, expected, tol=1e-5):
    np.testing.assert_allclose(float(value), float(expected), rtol=tol, atol=tol)


@pytest.mark.parametrize("name,s,t,labels", CASES, ids=_IDS)
def test_losses_equal_numpy_references(name, s, t, labels):
    del name
    np.testing.assert_allclose(losses.standardize(s), _np_standardize(s), rtol=1e-5, atol=1e-5)
    for alpha, beta, temperature in ((1.0, 8.0, 4.0), (1.0, 6.0, 4.0), (9.0, 81.0, 4.0)):
        _close(
            losses.dkd_loss(s, t, labels, alpha, beta, temperature),
            _np_dkd(s, t, labels, alpha, beta, temperature),
        )
    _close(losses.dist_loss(s, t, 2.0, 2.0, 4.0), _np_dist(s, t, 2.0, 2.0, 4.0))
    _close(losses.dist_loss(s, t, 1.0, 1.0, 1.0), _np_dist(s, t, 1.0, 1.0, 1.0))
    # beta (inter-class) and gamma (intra-class) apart, so that swapped weights show.
    _close(losses.dist_loss(s, t, 1.0, 3.0, 4.0), _np_dist(s, t, 1.0, 3.0, 4.0))
    # Logit standardisation as its reference applies it: both logits, then the temperature.
    ls_s, ls_t = _np_standardize(s), _np_standardize(t)
    _close(losses.kd_loss(losses.standardize(s), losses.standardize(t), 2.0), _np_kd(ls_s, ls_t, 2))
    _close(
        losses.dkd_loss(losses.standardize(s), losses.standardize(t), labels, 9.0, 81.0, 4.0),
        _np_dkd(ls_s, ls_t, labels, 9.0, 81.0, 4.0),
    )


# ------------------------------------------------------------------ PyTorch transcriptions


def _torch_refs():
    """The reference forwards in PyTorch, transcribed from their semantics (mdistiller DKD,
    DIST_KD DIST, logit-standardization-KD normalize and KD)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional

    def normalize(z):
        return (z - z.mean(dim=-1, keepdim=True)) / (1e-7 + z.std(dim=-1, keepdim=True))

    def kd(s, t, temperature):
        log_p_s = F.log_softmax(s / temperature, dim=1)
        p_t = F.softmax(t / temperature, dim=1)
        return F.kl_div(log_p_s, p_t, reduction="none").sum(1).mean() * temperature**2

    def dkd(s, t, labels, alpha, beta, temperature):
        gt = torch.zeros_like(s).scatter_(1, labels[:, None], 1).bool()
        other = ~gt
        p_s, p_t = F.softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)

        def binary(p):
            return torch.cat([(p * gt).sum(1, keepdim=True), (p * other).sum(1, keepdim=True)], 1)

        n = labels.shape[0]
        tckd = F.kl_div(torch.log(binary(p_s)), binary(p_t), reduction="sum") / n
        nt = F.softmax(t / temperature - 1000.0 * gt, dim=1)
        log_ns = F.log_softmax(s / temperature - 1000.0 * gt, dim=1)
        nckd = F.kl_div(log_ns, nt, reduction="sum") / n
        return (alpha * tckd + beta * nckd) * temperature**2

    def pearson(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)

    def dist(s, t, beta, gamma, temperature):
        y_s, y_t = (s / temperature).softmax(dim=1), (t / temperature).softmax(dim=1)
        inter = 1 - pearson(y_s, y_t).mean()
        intra = 1 - pearson(y_s.t(), y_t.t()).mean()
        return temperature**2 * (beta * inter + gamma * intra)

    return torch, normalize, kd, dkd, dist


@pytest.mark.parametrize("name,s,t,labels", CASES, ids=_IDS)
def test_losses_equal_torch_transcriptions(name, s, t, labels):
    del name
    torch, normalize, kd, dkd, dist = _torch_refs()
    ts, tt = torch.from_numpy(s), torch.from_numpy(t)
    tl = torch.from_numpy(labels.astype(np.int64))
    np.testing.assert_allclose(losses.standardize(s), normalize(ts).numpy(), rtol=1e-5, atol=1e-5)
    _close(losses.dkd_loss(s, t, labels, 1.0, 8.0, 4.0), dkd(ts, tt, tl, 1.0, 8.0, 4.0))
    _close(losses.dist_loss(s, t, 2.0, 2.0, 4.0), dist(ts, tt, 2.0, 2.0, 4.0))
    _close(losses.dist_loss(s, t, 1.0, 3.0, 4.0), dist(ts, tt, 1.0, 3.0, 4.0))
    ls_s, ls_t = losses.standardize(s), losses.standardize(t)
    _close(losses.kd_loss(ls_s, ls_t, 2.0), kd(normalize(ts), normalize(tt), 2.0))
    _close(
        losses.dkd_loss(ls_s, ls_t, labels, 9.0, 81.0, 4.0),
        dkd(normalize(ts), normalize(tt), tl, 9.0, 81.0, 4.0),
    )


@pytest.mark.parametrize("name,s,t,labels", CASES, ids=_IDS)
def test_gradients_are_finite(name, s, t, labels):
    del name
    fns = {
        "dkd": lambda z: losses.dkd_loss(z, t, labels, 1.0, 8.0, 4.0),
        "dist": lambda z: losses.dist_loss(z, t, 2.0, 2.0, 4.0),
        "kd_ls": lambda z: losses.kd_loss(losses.standardize(z), losses.standardize(t), 2.0),
        "dkd_ls": lambda z: losses.dkd_loss(
            losses.standardize(z), losses.standardize(t), labels, 9.0, 81.0, 4.0
        ),
    }
    for method, fn in fns.items():
        value, grad = jax.jit(jax.value_and_grad(fn))(jnp.asarray(s))
        assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all(), method


@pytest.mark.parametrize("rows", [[0], [1, 1]], ids=["one", "twins"])
def test_dist_gradients_equal_torchs_where_a_centred_row_is_zero(rows):
    """A batch of one, or a class equally likely for every sample, centres a row of DIST's
    intra-class term to zero: torch's norm has gradient 0 there, and so must ours (not NaN)."""
    torch, *_, dist = _torch_refs()
    logits = np.random.default_rng(7).normal(scale=3.0, size=(2, 2, 10)).astype(np.float32)
    s, t = logits[0][rows], logits[1][rows]  # [B, 10] each.
    grad = jax.grad(lambda z: losses.dist_loss(z, t, 2.0, 2.0, 4.0))(jnp.asarray(s))
    ts = torch.from_numpy(s).requires_grad_()
    dist(ts, torch.from_numpy(t), 2.0, 2.0, 4.0).backward()
    # Entries up to ~2: a few ulp of either side's kernels (torch's differ per CPU) are 1e-6.
    np.testing.assert_allclose(np.asarray(grad), ts.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_loss_inputs_are_checked():
    s = np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError, match="must both be"):
        losses.dist_loss(s, s[:, :3], 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        losses.dkd_loss(s, s, np.zeros(4, np.int32), 1.0, 8.0, 0.0)


# -------------------------------------------------------------------------- DKD's warm-up


def test_dkd_warmup_is_mdistillers_epoch_factor():
    """min(epoch / 20, 1) with mdistiller's 1-based epoch, 10 steps an epoch."""
    expected = {0: 1 / 20, 9: 1 / 20, 10: 2 / 20, 189: 19 / 20, 190: 1.0, 10**6: 1.0}
    for step, factor in expected.items():
        _close(losses.dkd_warmup(step, 10, 20), factor, 1e-7)
    traced = jax.jit(lambda s: losses.dkd_warmup(s, 10, 20))(jnp.int32(25))
    _close(traced, 3 / 20, 1e-7)
    _close(losses.dkd_warmup(0, 10, 1), 1.0, 1e-7)  # warmup 1: no warm-up.


# --------------------------------------------------------------------------- per-pair beta


def test_dkd_beta_per_pair_as_mdistillers_configs():
    assert logit_targets.MDISTILLER_DKD_BETA[("resnet32x4", "resnet8x4")] == 8.0
    assert logit_targets.MDISTILLER_DKD_BETA[("resnet56", "resnet20")] == 2.0
    assert logit_targets.MDISTILLER_DKD_BETA[("vgg13", "vgg8")] == 6.0
    # Only its WRN pairs have both networks among ours.
    assert logit_targets.DKD_BETA == logit_targets.MDISTILLER_DKD_BETA  # Their names are ours.
    assert logit_targets.dkd_beta("resnet110", "resnet32") == 2.0
    assert set(logit_targets.DKD_BETA) <= set(config_lib.CRD_PAIRS)
    assert logit_targets.dkd_beta("wrn_40_2", "wrn_16_2") == 6.0
    assert logit_targets.dkd_beta("wrn_28_4", "wrn_16_2") == 8.0  # mdistiller's default.
    config = config_lib.base_config()
    config.teacher.model, config.student.model = "wrn_40_2", "wrn_40_1"
    assert config.baselines.dkd_beta is None
    assert logit_targets.resolved_dkd_beta(config) == 6.0
    config.baselines.dkd_beta = 3.5  # Set: it wins over the pair's.
    assert logit_targets.resolved_dkd_beta(config) == 3.5


# ----------------------------------------------------------------------- training, config


def _tiny_config(**overrides):
    config = config_lib.tiny(config_lib.base_config())
    config.data.dataset, config.data.source = "digits", "bundled"
    config.stages = ("teacher", "distill")
    config.teacher.model = "wrn_10_1"
    config.distill.method = "none"
    config.checkpoint_every_steps = 1000
    for path, value in overrides.items():
        section, field = path.split(".")
        config[section][field] = value
    return config


def _data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32, 3), np.uint8)
    labels = rng.integers(0, 10, 16).astype(np.int32)
    return inputs.RunData(
        info=sources.DATASETS["cifar10"],
        train=loader.ArrayExamples(images, labels),
        test=loader.ArrayExamples(images[:8], labels[:8]),
    )


@pytest.mark.parametrize("method", NEW)
def test_method_trains_through_build_stage(method):
    config = _tiny_config(**{"distill.method": method, "baselines.dkd_warmup": 1})
    config.data.dataset = "cifar10"  # Its arrays come from _data(), not from the source.
    config.distill.optim.schedule, config.distill.optim.lr = "constant", 0.05
    mesh, data = parallel.make_mesh(), _data()
    pair = distill.pair_of(config, data)
    teacher_vars = teacher_lib.init_variables(pair.teacher, 1, mesh)
    stage = distill.build_stage(config, mesh, data, "unused", teacher_vars, [(method, 0)])
    # §4.1: the student distils on the whole training set (the search's 7:3 parts together).
    assert stage.train_data is data.train and stage.val_data is None
    batch = {
        "image": jnp.asarray(data.train.images[:8]),
        "label": jnp.asarray(data.train.labels[:8]),
    }
    state, history = stage.state, []
    for _ in range(5):
        state, metrics = stage.step_fn(state, batch, None, teacher_vars)
        history.append(float(metrics["loss"]))
    assert np.isfinite(history).all() and history[-1] < history[0], history
    part = {"dkd": "dkd_loss", "dkd_ls": "dkd_loss", "dist": "dist_loss", "kd_ls": "kd_loss"}
    assert float(metrics[part[method]]) > 0.0
    if method in ("dkd", "dkd_ls"):
        assert int(state.batch_stats[logit_targets.CLOCK]["steps"]) == 5
        assert float(metrics["dkd_warmup"]) == 1.0


def test_dkd_loss_applies_the_warmup_of_its_clock():
    """The DKD loss at clock values 0, 9, 10 and 200 with 10 steps an epoch: the CE plus
    min(epoch / 20, 1) times the pair's DKD (beta 8 for wrn_10_1 -> wrn_10_1)."""
    config = _tiny_config(**{"distill.method": "dkd"})
    config.data.dataset = "cifar10"
    mesh, data = parallel.make_mesh(), _data()
    pair = distill.pair_of(config, data)
    teacher_vars = teacher_lib.init_variables(pair.teacher, 1, mesh)
    student = teacher_lib.init_variables(pair.student, 0, mesh)
    loss_fn = jax.jit(methods.make_loss_fn("dkd", pair, config, 10))
    images = jnp.asarray(data.train.images[:8], jnp.float32) / 255
    batch = {"image": images, "label": jnp.asarray(data.train.labels[:8])}
    t_logits = pair.teacher.apply(teacher_vars, images, train=False)
    for steps, factor in ((0, 1 / 20), (9, 1 / 20), (10, 2 / 20), (200, 1.0)):
        params = {"student": student["params"]}
        stats = {"student": student["batch_stats"], "dkd_clock": {"steps": jnp.int32(steps)}}
        loss, (new_stats, parts) = loss_fn(params, stats, None, batch, None, teacher_vars)
        assert int(new_stats["dkd_clock"]["steps"]) == steps + 1
        _close(parts["dkd_warmup"], factor, 1e-7)
        _close(loss, parts["ce_loss"] + factor * parts["dkd_loss"], 1e-5)
    s_logits = pair.student.apply(student, images, train=True, mutable=["batch_stats"])[0]
    expected = losses.dkd_loss(s_logits, t_logits, batch["label"], 1.0, 8.0, 4.0)
    _close(parts["dkd_loss"], expected, 1e-5)


def _np_ce(logits, labels):
    z = logits - logits.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -log_p[np.arange(len(labels)), labels].mean()


# Each method's loss from images, against its paper's formula in NumPy on the networks' logits:
# the weights set apart from each other and from their defaults, so a dropped or swapped one
# shows. (DKD and DKD+LS past their warm-up: the clock at 200 epochs of 10 steps.)
_COMPOSED = {
    "kd_ls": (
        {"ls_kd_ce_weight": 0.7, "ls_kd_weight": 5.0, "ls_kd_temperature": 3.0},
        lambda s, t, y, b: (
            b.ls_kd_ce_weight * _np_ce(s, y)
            + b.ls_kd_weight * _np_kd(_np_standardize(s), _np_standardize(t), b.ls_kd_temperature)
        ),
    ),
    "dist": (
        {"dist_ce_weight": 0.7, "dist_beta": 1.0, "dist_gamma": 3.0, "dist_temperature": 3.0},
        lambda s, t, y, b: (
            b.dist_ce_weight * _np_ce(s, y)
            + _np_dist(s, t, b.dist_beta, b.dist_gamma, b.dist_temperature)
        ),
    ),
    "dkd": (
        {"dkd_ce_weight": 0.7, "dkd_alpha": 2.0, "dkd_beta": 5.0, "dkd_temperature": 3.0},
        lambda s, t, y, b: (
            b.dkd_ce_weight * _np_ce(s, y)
            + _np_dkd(s, t, y, b.dkd_alpha, b.dkd_beta, b.dkd_temperature)
        ),
    ),
    "dkd_ls": (
        {"dkd_ce_weight": 0.7, "ls_dkd_alpha": 2.0, "ls_dkd_beta": 5.0, "dkd_temperature": 3.0},
        lambda s, t, y, b: (
            b.dkd_ce_weight * _np_ce(s, y)
            + _np_dkd(
                _np_standardize(s),
                _np_standardize(t),
                y,
                b.ls_dkd_alpha,
                b.ls_dkd_beta,
                b.dkd_temperature,
            )
        ),
    ),
}


@pytest.mark.parametrize("method", sorted(_COMPOSED))
def test_method_loss_from_images_is_its_formula(method):
    fields, formula = _COMPOSED[method]
    config = _tiny_config(**{"distill.method": method})
    config.data.dataset = "cifar10"
    with config.unlocked():
        for field, value in fields.items():
            config.baselines[field] = value
    mesh, data = parallel.make_mesh(), _data()
    pair = distill.pair_of(config, data)
    teacher_vars = teacher_lib.init_variables(pair.teacher, 1, mesh)
    student = teacher_lib.init_variables(pair.student, 0, mesh)
    images = jnp.asarray(data.train.images[:8], jnp.float32) / 255
    labels = np.asarray(data.train.labels[:8])
    batch = {"image": images, "label": jnp.asarray(labels)}
    stats = {"student": student["batch_stats"]}
    if method in ("dkd", "dkd_ls"):
        stats[logit_targets.CLOCK] = {"steps": jnp.int32(2000)}
    loss_fn = jax.jit(methods.make_loss_fn(method, pair, config, 10))
    loss, _ = loss_fn({"student": student["params"]}, stats, None, batch, None, teacher_vars)
    s_logits = pair.student.apply(student, images, train=True, mutable=["batch_stats"])[0]
    t_logits = pair.teacher.apply(teacher_vars, images, train=False)
    want = formula(
        np.asarray(s_logits, np.float64),
        np.asarray(t_logits, np.float64),
        labels,
        config.baselines,
    )
    _close(loss, want, 1e-5)


@pytest.mark.parametrize("method", ["dkd", "dkd_ls"])
def test_dkd_warmup_counts_the_distill_stages_steps_per_epoch(method):
    """The warm-up's epoch length is the distill stage's (`distill.optim.batch_size`), not the
    teacher's or the search's: 100 examples, 16 a batch -> 6 steps an epoch."""
    config = _tiny_config(**{"distill.method": method})
    config.distill.optim.batch_size = 16
    config.teacher.optim.batch_size = config.search.batch_size = 32
    setup = types.SimpleNamespace(
        config=config, data=types.SimpleNamespace(train=types.SimpleNamespace(labels=[0] * 100))
    )
    start = methods.Start(student={}, helpers=({}, {}), aux=None)
    assert methods.implementation(method).start(setup, start).constants == 6


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("dkd_temperature", 0.0, r"baselines.dkd_temperature = 0.0: must be positive"),
        ("dkd_warmup", 0, r"baselines.dkd_warmup = 0: must be a positive number of epochs"),
        ("dkd_beta", -1.0, r"baselines.dkd_beta = -1.0: must be >= 0, or None"),
        ("dkd_alpha", -1.0, r"baselines.dkd_alpha = -1.0: must be >= 0"),
        ("dkd_ce_weight", -0.5, r"baselines.dkd_ce_weight = -0.5: must be >= 0"),
        ("dist_temperature", -4.0, r"baselines.dist_temperature = -4.0: must be positive"),
        ("dist_gamma", -2.0, r"baselines.dist_gamma = -2.0: must be >= 0"),
        ("ls_kd_temperature", 0.0, r"baselines.ls_kd_temperature = 0.0: must be positive"),
        ("ls_kd_weight", -9.0, r"baselines.ls_kd_weight = -9.0: must be >= 0"),
        ("ls_dkd_beta", -81.0, r"baselines.ls_dkd_beta = -81.0: must be >= 0"),
        ("dkd_beta", float("inf"), r"baselines.dkd_beta = inf: must be None or a finite number"),
    ],
)
def test_config_checks_reach_validate(field, value, message):
    config = _tiny_config(**{"distill.method": "dkd", "distill.compare_with": NEW})
    config_lib.validate(config, device_count=2)
    with config.unlocked():
        config.baselines[field] = value
    with pytest.raises(errors.ConfigError, match=message):
        config_lib.validate(config, device_count=2)


def test_methods_are_registered_and_settable():
    for name in NEW:
        assert name in config_lib.METHODS and method_registry.get(name).table == report.LOGITS
    assert config_lib.METHODS[-1] == "dfa"
    base = config_lib.base_config().baselines
    assert (base.dkd_ce_weight, base.dkd_alpha, base.dkd_temperature, base.dkd_warmup) == (
        1.0,
        1.0,
        4.0,
        20,
    )
    # DIST: the DIST paper's CIFAR-100 setting (which `methods.logit_targets` cites), the label
    # cross-entropy at weight 1.
    assert (base.dist_ce_weight, base.dist_beta, base.dist_gamma, base.dist_temperature) == (
        1.0,
        2.0,
        2.0,
        4.0,
    )
    assert (base.ls_kd_weight, base.ls_kd_temperature, base.ls_kd_ce_weight) == (9.0, 2.0, 1.0)
    assert (base.ls_dkd_alpha, base.ls_dkd_beta) == (9.0, 81.0)
    config = config_lib.base_config()
    config.baselines.dkd_beta = 6.0  # The placeholder takes a float from the command line.
    assert config.baselines.dkd_beta == 6.0 and config_lib.base_config().baselines.dkd_beta is None
    # A workdir written before these fields existed held their defaults (dkd_beta None).
    saved = config_lib.base_config().to_dict()
    for field in ("dkd_beta", "dkd_warmup", "dist_beta", "ls_kd_weight"):
        del saved["baselines"][field]
    assert config_lib.changed_fields(saved, config_lib.base_config().to_dict()) == []


def test_report_keeps_table2_and_gives_logit_methods_their_table():
    table2 = {label for label, _ in report.TABLE2_COLUMNS}
    assert not table2 & set(NEW)
    assert all(set(row) == table2 for row in paper_results.TABLE2.values())
    assert [label for label, _ in report.logit_columns()] == ["teacher", "none", "kd", *NEW]
    summary = {
        "dataset": "cifar100",
        "teacher_model": "wrn_40_2",
        "student_model": "wrn_16_2",
        "seed": 0,
        "stages": {
            "teacher": {"last_accuracy": 0.75},
            "distill/kd": {"last_accuracy": 0.74, "best_accuracy": 0.745},
            "distill/dkd": {"last_accuracy": 0.76, "best_accuracy": 0.765},
        },
    }
    markdown, rows = report.logit_table([summary])
    assert "| Teacher | Student | KD | DKD | DIST | KD+LS | DKD+LS |" in markdown
    dkd = next(r for r in rows if r["method"] == "dkd")
    assert (dkd["table"], dkd["median_last"], dkd["paper"]) == ("logits", 76.0, None)
    _, table2_rows = report.table2([summary])
    assert {r["method"] for r in table2_rows} == table2
    # Without a run of its own methods the table is empty, and `--table all` writes none.
    del summary["stages"]["distill/dkd"]
    assert report.logit_table([summary])[1] == []


def test_report_cli_writes_the_logit_table(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    summary = {
        "dataset": "cifar100",
        "teacher_model": "wrn_28_4",
        "student_model": "wrn_16_2",
        "seed": 0,
        "stages": {"distill/dist": {"last_accuracy": 0.7}, "distill/kd": {"last_accuracy": 0.6}},
    }
    (run / report.SUMMARY_FILE).write_text(json.dumps(summary))
    out = tmp_path / "out"
    assert report.main([str(run), "--out", str(out), "--table", "logits"]) == 0
    assert sorted(os.listdir(out)) == ["logits.csv", "logits.md"]
    assert "| cifar100 | (3) wrn_28_4 → wrn_16_2 |" not in (out / "logits.md").read_text()
    assert "70.00" in (out / "logits.md").read_text()


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_dkd_cohort_keeps_a_clock_per_student(mode):
    """Two DKD students in one step (the cohort path): each advances its own clock."""
    config = _tiny_config(**{"distill.method": "dkd", "distill.cohort": mode})
    config.data.dataset = "cifar10"
    config.distill.optim.schedule, config.distill.optim.lr = "constant", 0.05
    mesh, data = parallel.make_mesh(), _data()
    pair = distill.pair_of(config, data)
    teacher_vars = teacher_lib.init_variables(pair.teacher, 1, mesh)
    stage = distill.build_stage(
        config, mesh, data, "unused", teacher_vars, [("dkd", 0), ("dkd", 1)]
    )
    batch = {
        "image": jnp.asarray(data.train.images[:8]),
        "label": jnp.asarray(data.train.labels[:8]),
    }
    state = stage.state
    for _ in range(3):
        state, metrics = stage.step_fn(state, batch, None, teacher_vars)
    np.testing.assert_array_equal(state.batch_stats[logit_targets.CLOCK]["steps"], [3, 3])
    # 16 examples, batches of 16: one step an epoch, so the third step is epoch 3 of 20.
    np.testing.assert_allclose(metrics["dkd_warmup"], 3 / 20, rtol=1e-6)
