"""A teacher and a student whose groups end at other sizes (RepDistiller's cross-architecture
pairs): RepDistiller's resnet14 (32/16/8) teaching its ShuffleV1 (16/8/4), both their PyTorch
architectures with random weights and BN statistics, imported with `dfa_jax.interop`.

Each loss is computed from the same images through their models and the peers' helpers:
FitNets' and AB's regressors resize by RepDistiller's `ConvReg` rule (`models/util.py`: 3x3
stride-2 conv, 4x4 stride-2 transposed conv, or a valid conv); AT and FT pool the larger map (or
factor) to the smaller, as RepDistiller's losses do; Margin, DFA's distillation and
the search's bridge loss average-pool the teacher's maps to the student's size, as mdistiller's
OFD does (`distillers/OFD.py`: `F.adaptive_avg_pool2d(feature_teacher[i], student's size)`).
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cifar_mobile_models import torch_net
from test_cifar_models import torch_model
from test_methods_against_peers import (
    _nchw,
    _paraphraser,
    _set_bn,
    _set_conv,
    ab_losses,
    attention_loss,
    factor_loss,
    overhaul_distillation_loss,
    overhaul_margin,
    peer_translator,
)

from dfa_jax import config_lib, features, interop, losses, methods, models, parallel, search

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

TEACHER, STUDENT = "resnet14", "ShuffleV1"
BATCH = 4
RTOL = 1e-4


# ----------------------------------------------------------------------------- the set-up


def conv_reg(s_shape, t_shape, use_relu):
    """RepDistiller's `ConvReg(s_shape, t_shape, use_relu)` (NCHW shapes), as written there."""
    s_c, s_h, s_w = s_shape[1:]
    t_c, t_h, t_w = t_shape[1:]
    if s_h == 2 * t_h:
        conv = tnn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
    elif s_h * 2 == t_h:
        conv = tnn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
    elif s_h >= t_h:
        conv = tnn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
    else:
        raise NotImplementedError((s_h, t_h))
    return tnn.Sequential(conv, tnn.BatchNorm2d(t_c), *([tnn.ReLU()] if use_relu else []))


def port_connector(module, params, stats=None):
    """A Flax `models.Connector` into a torch (conv, BN, ...) sequence. A transposed conv's Flax
    kernel ([kh, kw, out, in], `transpose_kernel`) maps to torch's [in, out, kh, kw] as a plain
    conv's does, unflipped."""
    _set_conv(module[0], params["conv"]["kernel"])
    if stats is None:  # Train mode reads no running statistics.
        module[1].weight.data = torch.from_numpy(np.asarray(params["bn"]["scale"]).copy())
        module[1].bias.data = torch.from_numpy(np.asarray(params["bn"]["bias"]).copy())
    else:
        _set_bn(module[1], params["bn"], stats["bn"])
    return module.train()


@pytest.fixture(scope="module")
def pair():
    """Their teacher and student (eval-mode originals; forwards use copies), ours imported, a batch."""
    t_net, s_net = torch_model(TEACHER, 10, seed=11), torch_net(STUDENT, 10, seed=12)
    t_vars = interop.from_torch({"model": t_net.state_dict()}, TEACHER, 10)
    s_vars = interop.from_torch({"model": s_net.state_dict()}, STUDENT, 10)
    rng = np.random.default_rng(13)
    batch = {
        "image": jnp.asarray(rng.normal(size=(BATCH, 32, 32, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, BATCH), jnp.int32),
    }
    return {
        "pair": methods.Pair(models.get_model(TEACHER, 10), models.get_model(STUDENT, 10)),
        "t_net": t_net,
        "s_net": s_net,
        "t_vars": t_vars,
        "s_vars": s_vars,
        "batch": batch,
        "images": _nchw(batch["image"]),
        "labels": torch.from_numpy(np.asarray(batch["label"]).astype(np.int64)),
        "mesh": parallel.make_mesh(),
    }


def teacher_forward(setting, train=False):
    """resnet14's per-block pre-ReLU maps by group, its raw group outputs, and its logits."""
    net = copy.deepcopy(setting["t_net"]).train(train)
    with torch.no_grad():
        x = torch.relu(net.bn1(net.conv1(setting["images"])))
        blocks, raw = [], []
        for g in (1, 2, 3):
            pres = []
            for block in getattr(net, f"layer{g}"):
                x, pre = block(x)
                pres.append(pre)
            blocks.append(pres)
            raw.append(x)
        logits = net.fc(x.mean(dim=(2, 3)))
    return blocks, raw, logits


def student_net(setting):
    return copy.deepcopy(setting["s_net"]).train()


def _close(actual, expected):
    expected = float(expected.detach()) if torch.is_tensor(expected) else float(expected)
    assert float(actual) == pytest.approx(expected, rel=RTOL), (float(actual), expected)


def _helpers(setting, label, config):
    return methods.init_helpers(label, setting["pair"], config, 5, setting["mesh"])


def _loss(setting, label, config, helpers, beta=None, margins=None):
    params = {"student": setting["s_vars"]["params"], **helpers[0]}
    stats = {"student": setting["s_vars"]["batch_stats"], **helpers[1]}
    loss_fn = methods.make_loss_fn(label, setting["pair"], config, margins)
    loss, _ = jax.jit(loss_fn)(params, stats, beta or {}, setting["batch"], None, setting["t_vars"])
    return loss


# ------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize(
    "in_hw, out_hw", [((8, 8), (4, 4)), ((4, 4), (8, 8)), ((8, 8), (5, 5)), ((6, 6), (6, 6))]
)
def test_connector_resizes_as_convreg(in_hw, out_hw):
    """conv + BN in train mode, to 1e-5 of `ConvReg(use_relu=False)` on the same weights."""
    x = np.random.default_rng(0).normal(size=(3, *in_hw, 6)).astype(np.float32)
    connector = models.Connector(5, out_hw=out_hw)
    variables = connector.init(jax.random.key(1), jnp.asarray(x))
    ours, _ = connector.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
    theirs = conv_reg((3, 6, *in_hw), (3, 5, *out_hw), use_relu=False)
    theirs = port_connector(theirs, variables["params"])(_nchw(x))
    assert ours.shape == (3, *out_hw, 5)
    np.testing.assert_allclose(_nchw(ours).numpy(), theirs.detach().numpy(), atol=1e-5)


def test_connector_and_validate_refuse_what_convreg_cannot_resize(pair):
    assert "never enlarges" in models.resize_problem((4, 4), (12, 12))
    with pytest.raises(ValueError, match="4x4 map cannot become 12x12"):
        models.Connector(5, out_hw=(12, 12)).init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))
    # resnet14 -> ShuffleV1 pools 2x; a ResNet50 teacher at 32/16/8/4 against MobileNetV2's
    # 16/8/4/2 too. A student map a quarter of the teacher's: FitNets' ConvReg cannot go there.
    assert models.resize_problem((8, 8), (16, 16)) is None
    np.testing.assert_array_equal(
        losses.adaptive_avg_pool(jnp.arange(16.0).reshape(1, 4, 4, 1), (2, 2))[0, :, :, 0],
        [[2.5, 4.5], [10.5, 12.5]],
    )


def test_fitnets_regresses_the_student_up_to_the_teachers_hint(pair):
    """`--distill hint`: CE + 100 MSE(ConvReg(feat_s[2]), feat_t[2]), the student's 8x8 map
    through a 4x4 stride-2 transposed conv to the teacher's 16x16 (student train, teacher eval)."""
    config = config_lib.base_config()
    helpers = _helpers(pair, "fitnets", config)
    student = student_net(pair)
    feats, _, logit_s, _ = student(pair["images"])
    _, raw_t, _ = teacher_forward(pair)
    regressor = port_connector(
        conv_reg(feats[1].shape, raw_t[1].shape, use_relu=True),
        helpers[0]["regressor"],
        helpers[1]["regressor"],
    )
    assert isinstance(regressor[0], tnn.ConvTranspose2d)
    hint = F.mse_loss(regressor(feats[1]), raw_t[1])
    want = F.cross_entropy(logit_s, pair["labels"]) + config.baselines.fitnets_weight * hint
    _close(_loss(pair, "fitnets", config, helpers), want)


def test_at_pools_the_larger_map_as_repdistiller(pair):
    """`--distill attention -a 0 -b 1000`: CE + 1000 sum of at_loss over every group's raw
    output, the teacher's 32/16/8 maps average-pooled to the student's 16/8/4 inside at_loss."""
    config = config_lib.base_config()
    feats, _, logit_s, _ = student_net(pair)(pair["images"])
    _, raw_t, _ = teacher_forward(pair)
    assert [f.shape[2] for f in feats] == [t.shape[2] // 2 for t in raw_t]
    at = sum(attention_loss(s, t) for s, t in zip(feats, raw_t))
    want = F.cross_entropy(logit_s, pair["labels"]) + config.baselines.at_weight * at
    _close(_loss(pair, "at", config, _helpers(pair, "at", config)), want)


def test_ft_translates_at_the_students_size_and_pools_the_teachers_factor(pair):
    """`--distill factor -a 0 -b 200`: the translator on the student's last 4x4 map, the
    paraphraser (eval mode) on the teacher's last 8x8 map, its factor pooled to 4x4 by
    FactorTransfer; CE + 200 L1 of the normalised factors."""
    config = config_lib.base_config()
    setting = {**pair, "config": config}
    paraphraser, peer = _paraphraser(setting)
    helpers = _helpers(pair, "ft", config)
    feats, _, logit_s, _ = student_net(pair)(pair["images"])
    _, raw_t, _ = teacher_forward(pair)
    translator = peer_translator(feats[-1].shape[1], raw_t[-1].shape[1]).train()
    p, b = helpers[0]["translator"], helpers[1]["translator"]
    for i, (conv, bn) in enumerate(zip(translator[0::3], translator[1::3])):
        _set_conv(conv, p[f"_ConvAct_{i}"]["conv"]["kernel"])
        _set_bn(bn, p[f"_ConvAct_{i}"]["bn"], b[f"_ConvAct_{i}"]["bn"])
    with torch.no_grad():
        factor_t = peer.eval()(raw_t[-1], is_factor=True)
    factor_s = translator(feats[-1])
    assert (factor_s.shape[2], factor_t.shape[2]) == (4, 8)
    ft = factor_loss(factor_s, factor_t)
    want = F.cross_entropy(logit_s, pair["labels"]) + config.baselines.ft_weight * ft
    params = {"student": pair["s_vars"]["params"], **helpers[0]}
    stats = {"student": pair["s_vars"]["batch_stats"], **helpers[1]}
    aux = {**pair["t_vars"], "paraphraser": paraphraser}
    loss_fn = methods.make_loss_fn("ft", pair["pair"], config, None)
    loss, _ = jax.jit(loss_fn)(params, stats, {}, pair["batch"], None, aux)
    _close(loss, want)


def test_ab_initialisation_resizes_every_group(pair):
    """`helper/pretrain.py` for `abound`: ConvReg without ReLU on every group (all three differ
    in size), sum(ABLoss) over the pre-ReLU group ends; ShuffleV1 has no final BN after its body,
    so the whole student runs in train mode."""
    config = config_lib.base_config()
    params, stats = _helpers(pair, "ab", config)
    assert sorted(params["st"]) == ["g1", "g2", "g3"]
    student = student_net(pair)
    _, pre_s, _, _ = student(pair["images"])
    blocks_t, _, _ = teacher_forward(pair)
    g_s = [
        port_connector(conv_reg(s.shape, t[-1].shape, use_relu=False), params["st"][k])(s)
        for s, t, k in zip(pre_s, blocks_t, ("g1", "g2", "g3"))
    ]
    want = sum(ab_losses(g_s, [t[-1] for t in blocks_t]))
    loss_fn = methods.make_ab_init_loss(
        pair["pair"], config.baselines, methods.ab_connectors(pair["pair"])
    )
    all_params = {"student": pair["s_vars"]["params"], **params}
    all_stats = {"student": pair["s_vars"]["batch_stats"], **stats}
    loss, _ = jax.jit(loss_fn)(all_params, all_stats, {}, pair["batch"], None, pair["t_vars"])
    _close(loss, want)


@pytest.mark.parametrize("student, head_bn", [("MobileNetV2", "conv2_1"), ("ShuffleV2", "bn2")])
def test_ab_initialisation_keeps_the_heads_bn_statistics(pair, student, head_bn):
    """`helper/pretrain.py` runs the student in eval mode with only `get_feat_modules()` back in
    train mode: a BN of the head (after the body) keeps its running statistics; the body's move."""
    config = config_lib.base_config()
    ab_pair = methods.Pair(models.get_model(TEACHER, 10), models.get_model(student, 10))
    s_vars = jax.jit(functools.partial(ab_pair.student.init, train=False))(
        jax.random.key(3), pair["batch"]["image"][:1]
    )
    helpers = methods.init_helpers("ab", ab_pair, config, 5, pair["mesh"])
    loss_fn = methods.make_ab_init_loss(ab_pair, config.baselines, methods.ab_connectors(ab_pair))
    params = {"student": s_vars["params"], **helpers[0]}
    stats = {"student": s_vars["batch_stats"], **helpers[1]}
    _, (new_stats, _) = jax.jit(loss_fn)(params, stats, {}, pair["batch"], None, pair["t_vars"])
    kept, old = new_stats["student"], s_vars["batch_stats"]
    jax.tree.map(np.testing.assert_array_equal, kept[head_bn], old[head_bn])
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), kept, old)
    assert sum(jax.tree.leaves(moved)) > 10  # The body's BNs took the batch's statistics.


def test_margin_pools_the_teacher_to_the_student_as_mdistiller(pair):
    """overhaul's loss (1x1 conv + BN connectors, margins from the teacher's BNs, teacher and
    student in train mode), each teacher map adaptive-average-pooled to the student's size."""
    config = config_lib.base_config()
    assert config.baselines.margin_teacher_bn == "batch"
    helpers = _helpers(pair, "margin", config)
    student = student_net(pair)
    _, pre_s, logit_s, _ = student(pair["images"])
    blocks_t, _, _ = teacher_forward(pair, train=True)
    t_net = pair["t_net"]
    margins = [overhaul_margin(getattr(t_net, f"layer{g}")[-1].bn2) for g in (1, 2, 3)]
    total = 0.0
    for i, (s, t) in enumerate(zip(pre_s, blocks_t)):
        key = methods.group_key(i + 1)
        connector = port_connector(
            conv_reg(s.shape, (1, t[-1].shape[1], *s.shape[2:]), use_relu=False),
            helpers[0]["st"][key],
        )
        target = F.adaptive_avg_pool2d(t[-1], s.shape[-2:])
        total = total + overhaul_distillation_loss(connector(s), target, margins[i]) / 2 ** (2 - i)
    want = F.cross_entropy(logit_s, pair["labels"]) + total / BATCH / 1000
    jax_margins = methods.teacher_margins(pair["pair"], pair["t_vars"])
    _close(_loss(pair, "margin", config, helpers, margins=jax_margins), want)


def test_dfa_distillation_pools_the_aggregation(pair):
    """Eq. 4 with a frozen random alpha over each resnet14 group's two blocks: CE + gamma_fd *
    sum_i 2^(i-3) partial_L2(connector(S_i), pool(sum_j alpha_j max(T_i^j, -1))) / B."""
    config = config_lib.base_config()
    helpers = _helpers(pair, "dfa", config)
    rng = np.random.default_rng(14)
    alpha = [rng.dirichlet(np.ones(2)).astype(np.float32) for _ in range(3)]
    beta = {methods.group_key(i + 1): jnp.log(jnp.asarray(a)) for i, a in enumerate(alpha)}
    student = student_net(pair)
    _, pre_s, logit_s, _ = student(pair["images"])
    blocks_t, _, _ = teacher_forward(pair)
    total = 0.0
    for i, (s, maps) in enumerate(zip(pre_s, blocks_t)):
        key = methods.group_key(i + 1)
        connector = port_connector(
            conv_reg(s.shape, (1, maps[0].shape[1], *s.shape[2:]), use_relu=False),
            helpers[0]["st"][key],
        )
        aggregated = sum(float(a) * torch.clamp(m, min=-1.0) for a, m in zip(alpha[i], maps))
        target = F.adaptive_avg_pool2d(aggregated, s.shape[-2:])
        total = total + overhaul_distillation_loss(
            connector(s), target, torch.tensor(-1.0)
        ) / 2 ** (2 - i)
    want = F.cross_entropy(logit_s, pair["labels"]) + config.distill.gamma_fd * total / BATCH
    _close(_loss(pair, "dfa", config, helpers, beta=beta), want)


@pytest.mark.parametrize("group", [1, 3])
def test_search_bridge_loss_pools_the_aggregation(pair, group):
    """Eq. 12 on group `group`: the student's group-end map (its first groups in train mode)
    through the ST connector against the pooled aggregation (L_ST), and the pooled aggregation
    through the TS connector resuming the student's later groups (L_TS, the label CE)."""
    config = config_lib.base_config()
    t_model, s_model = pair["pair"].teacher, pair["pair"].student
    key = methods.group_key(group)
    s_shape = features.group_shapes(s_model)[group - 1]
    t_shape = features.group_shapes(t_model)[group - 1]
    st = models.Connector(t_shape[-1]).init(jax.random.key(2), jnp.zeros(s_shape))
    ts = models.Connector(s_shape[-1]).init(jax.random.key(3), jnp.zeros(s_shape[:3] + t_shape[3:]))
    params = {"student": pair["s_vars"]["params"], "st": {key: st["params"]}}
    params["ts"] = {key: ts["params"]}
    stats = {"student": pair["s_vars"]["batch_stats"], "st": {key: st["batch_stats"]}}
    stats["ts"] = {key: ts["batch_stats"]}
    beta = {key: jnp.asarray([0.3, -0.4])}
    loss_fn, _ = search.make_bridge_loss_fn(t_model, s_model, group, config)
    loss, (_, metrics) = jax.jit(loss_fn)(params, stats, beta, pair["batch"], None, pair["t_vars"])

    alpha = np.asarray(jax.nn.softmax(beta[key]))
    blocks_t, _, _ = teacher_forward(pair)
    aggregated = sum(
        float(a) * torch.clamp(m, min=-1.0) for a, m in zip(alpha, blocks_t[group - 1])
    )
    pooled = F.adaptive_avg_pool2d(aggregated, s_shape[1:3])
    student = student_net(pair)
    x = torch.relu(student.bn1(student.conv1(pair["images"])))
    layers = [student.layer1, student.layer2, student.layer3]
    for layer in layers[:group]:
        for block in layer:
            s_i = block(x)
            x = torch.relu(s_i)
    st_conv = port_connector(
        conv_reg(s_i.shape, (1, t_shape[-1], *s_i.shape[2:]), False), st["params"]
    )
    unit = lambda m: F.normalize(m.flatten(1), dim=1, eps=0.0)
    l_st = ((unit(st_conv(s_i)) - unit(pooled)) ** 2).sum(1).mean()
    ts_conv = port_connector(conv_reg(pooled.shape, s_i.shape, False), ts["params"])
    x = torch.relu(ts_conv(pooled))
    for layer in layers[group:]:
        for block in layer:
            x = torch.relu(block(x))
    l_ts = F.cross_entropy(student.linear(x.mean(dim=(2, 3))), pair["labels"])
    _close(metrics["st_loss"], l_st)
    _close(metrics["ts_loss"], l_ts)
    _close(loss, config.search.gamma_st * l_st + config.search.gamma_ts * l_ts)


def test_a_map_that_shrinks_on_one_side_and_grows_on_the_other_is_refused():
    """ConvReg's valid conv only shrinks: an 8x4 map cannot become 6x6 (its width would grow)."""
    assert "never enlarges" in models.resize_problem((8, 4), (6, 6))
    with pytest.raises(ValueError, match="8x4 map cannot become 6x6"):
        models.Connector(5, out_hw=(6, 6)).init(jax.random.key(0), jnp.zeros((1, 8, 4, 3)))
