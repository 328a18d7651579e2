"""Every baseline's whole loss from images equals the peer's own assembly on the same weights.

The JAX side is what a run trains: `methods.make_loss_fn` (and the first-stage losses of FT and
AB in `methods`) through the Flax student, teacher and helpers. The PyTorch side restates, from
reading them, the peers' models, helpers and loops: RepDistiller's WRN
(`forward(is_feat=True, preact=...)`, `models/wrn.py`), its `models/util.py` helpers (ConvReg,
Paraphraser, Translator, Connector), `distiller_zoo` losses and `train_student.py` /
`helper/loops.py` / `helper/pretrain.py` assembly; overhaul-distillation's `distiller.py` and
`train_with_distillation.py` for Margin; Knowledge-Distillation-Zoo's `kd_losses/sobolev.py` and
`train_kd.py` for Jacobian. Flax weights are ported with `dfa_jax.interop` (the networks) and by
hand (the helpers); BatchNorm parameters and running statistics are randomised so that every
train/eval mode choice shows in the numbers.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfa_jax import config_lib
from dfa_jax import interop
from dfa_jax import methods
from dfa_jax import parallel
from dfa_jax import teacher as teacher_lib

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

RTOL = 1e-4
BATCH = 4
# Teacher wider than the student, so connectors and regressors map between channel counts.
TEACHER, STUDENT = (16, 2), (10, 1)


# ------------------------------------------------------------------------- the peers, restated


class _Block(tnn.Module):
    """RepDistiller's `BasicBlock`: bn1-relu, conv, bn2-relu, conv; 1x1 projection of the
    activated input where the width or stride changes, else the raw input."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1 = tnn.BatchNorm2d(cin)
        self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(cout)
        self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout and stride == 1
        if not self.equal:
            self.convShortcut = tnn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.equal else self.convShortcut(act))


class _Group(tnn.Module):
    def __init__(self, n, cin, cout, stride):
        super().__init__()
        self.layer = tnn.Sequential(
            *[_Block(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x):
        return self.layer(x)


class PeerWRN(tnn.Module):
    """RepDistiller's `WideResNet` with its `forward(x, is_feat, preact)` feature list
    [conv1 out, block1 out, block2 out, block3 out, pooled], pre-activated on request by the BN
    that consumes each block output, and `get_feat_modules` / `get_bn_before_relu`."""

    def __init__(self, depth, width, num_classes):
        super().__init__()
        n, widths = (depth - 4) // 6, [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = tnn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.block1 = _Group(n, widths[0], widths[1], 1)
        self.block2 = _Group(n, widths[1], widths[2], 2)
        self.block3 = _Group(n, widths[2], widths[3], 2)
        self.bn1 = tnn.BatchNorm2d(widths[3])
        self.fc = tnn.Linear(widths[3], num_classes)

    def get_feat_modules(self):
        return tnn.ModuleList([self.conv1, self.block1, self.block2, self.block3])

    def get_bn_before_relu(self):
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]

    def forward(self, x, is_feat=False, preact=False):
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        f4 = F.relu(self.bn1(f3)).mean(dim=(2, 3))
        logits = self.fc(f4)
        if not is_feat:
            return logits
        if preact:
            f1, f2, f3 = [bn(f) for bn, f in zip(self.get_bn_before_relu(), (f1, f2, f3))]
        return [f0, f1, f2, f3, f4], logits


def conv_reg(cin, cout, use_relu):
    """RepDistiller `ConvReg` for maps of one spatial size: 1x1 conv (bias), BN, ReLU if asked."""
    layers = [tnn.Conv2d(cin, cout, 1), tnn.BatchNorm2d(cout)]
    return tnn.Sequential(*layers, *([tnn.ReLU()] if use_relu else []))


def _conv_act(cin, cout, bn, transpose=False):
    conv = tnn.ConvTranspose2d(cin, cout, 3, 1, 1) if transpose else tnn.Conv2d(cin, cout, 3, 1, 1)
    return [conv, tnn.BatchNorm2d(cout) if bn else tnn.Identity(), tnn.LeakyReLU(0.1)]


class PeerParaphraser(tnn.Module):
    """RepDistiller `Paraphraser(t_shape)`, `use_bn=False`: conv encoder, conv-transpose decoder."""

    def __init__(self, c, k=0.5):
        super().__init__()
        f = int(c * k)
        self.encoder = tnn.Sequential(
            *_conv_act(c, c, False), *_conv_act(c, f, False), *_conv_act(f, f, False)
        )
        self.decoder = tnn.Sequential(
            *_conv_act(f, f, False, True),
            *_conv_act(f, c, False, True),
            *_conv_act(c, c, False, True),
        )

    def forward(self, x, is_factor=False):
        factor = self.encoder(x)
        return factor if is_factor else (factor, self.decoder(factor))


def peer_translator(cs, ct, k=0.5):
    """RepDistiller `Translator(s_shape, t_shape)`, `use_bn=True`: Cs -> Cs -> F -> F."""
    f = int(ct * k)
    return tnn.Sequential(*_conv_act(cs, cs, True), *_conv_act(cs, f, True), *_conv_act(f, f, True))


def distill_kl(s, t, temperature):
    """RepDistiller `DistillKL`: KL(p_t || p_s) at T, summed, * T^2 / B."""
    log_p_s = F.log_softmax(s / temperature, dim=1)
    p_t = F.softmax(t / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="sum") * temperature**2 / s.shape[0]


def _pool_to_smaller(f_s, f_t):
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


def _attention(f, p):
    return F.normalize(f.pow(p).mean(1).view(f.size(0), -1))


def attention_loss(f_s, f_t, p=2):
    """RepDistiller `Attention.at_loss`."""
    f_s, f_t = _pool_to_smaller(f_s, f_t)
    return (_attention(f_s, p) - _attention(f_t, p)).pow(2).mean()


def similarity_loss(f_s, f_t):
    """RepDistiller `Similarity.similarity_loss`."""
    b = f_s.shape[0]
    g_s = F.normalize(f_s.view(b, -1) @ f_s.view(b, -1).t())
    g_t = F.normalize(f_t.view(b, -1) @ f_t.view(b, -1).t())
    return ((g_t - g_s) ** 2).sum() / (b * b)


def factor_loss(f_s, f_t):
    """RepDistiller `FactorTransfer` (p1 = 2, p2 = 1)."""
    f_s, f_t = _pool_to_smaller(f_s, f_t)
    return (_attention(f_s, 2) - _attention(f_t, 2)).abs().mean()


def ab_losses(g_s, g_t, margin=1.0):
    """RepDistiller `ABLoss(len(g_s))`: per position w_i * alternative-L2 / B * 3 / 1000."""
    n, b = len(g_s), g_s[0].shape[0]
    out = []
    for i, (s, t) in enumerate(zip(g_s, g_t)):
        loss = (s + margin) ** 2 * ((s > -margin) & (t <= 0)).float() + (s - margin) ** 2 * (
            (s <= margin) & (t > 0)
        ).float()
        out.append(2 ** (i - n + 1) * loss.abs().sum() / b / 1000 * 3)
    return out


def overhaul_margin(bn):
    """overhaul-distillation `get_margin_from_BN`: E[x | x < 0] of N(bias, scale^2) per channel."""
    from scipy.stats import norm  # pylint: disable=g-import-not-at-top

    out = []
    for s, m in zip(bn.weight.detach().numpy(), bn.bias.detach().numpy()):
        s = abs(float(s))
        m = float(m)
        if norm.cdf(-m / s) > 0.001:
            out.append(
                -s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / norm.cdf(-m / s) + m
            )
        else:
            out.append(-3 * s)
    return torch.tensor(out, dtype=torch.float32).view(1, -1, 1, 1)


def overhaul_distillation_loss(source, target, margin):
    """overhaul-distillation `distillation_loss`: partial L2 above the teacher's margin, summed."""
    target = torch.max(target, margin)
    loss = F.mse_loss(source, target, reduction="none")
    return (loss * ((source > target) | (target > 0)).float()).sum()


def sobolev(out_s, out_t, img, target):
    """Knowledge-Distillation-Zoo `Sobolev`: MSE of the L2-normalised input gradients of the
    true-class logits (the student's with its graph kept, the teacher's detached)."""
    grads = []
    for out in (out_s, out_t):
        picked = torch.gather(out, 1, target.view(-1, 1))
        (g,) = torch.autograd.grad(picked, img, torch.ones_like(picked), create_graph=True)
        grads.append(F.normalize(g.view(g.size(0), -1), p=2, dim=1))
    return F.mse_loss(grads[0], grads[1].detach())


# ------------------------------------------------------------------------------- the set-up


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x), (0, 3, 1, 2))))


def _randomise_bn(variables, seed):
    """Random BN scale/bias (some scales negative) and running statistics, as a trained net has."""
    rng = np.random.default_rng(seed)

    def visit(tree, stats):
        for key, value in tree.items():
            if isinstance(value, dict) and "scale" in value:
                c = value["scale"].shape
                value["scale"] = jnp.asarray(
                    rng.uniform(0.5, 1.5, c) * rng.choice([1, -1], c, p=[0.9, 0.1]), jnp.float32
                )
                value["bias"] = jnp.asarray(rng.normal(0, 0.3, c), jnp.float32)
                stats[key]["mean"] = jnp.asarray(rng.normal(0, 0.3, c), jnp.float32)
                stats[key]["var"] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
            elif isinstance(value, dict) and key in stats:
                visit(value, stats[key])

    params = jax.tree_util.tree_map(lambda x: x, variables["params"])
    stats = jax.tree_util.tree_map(lambda x: x, variables["batch_stats"])
    visit(params, stats)
    return {"params": params, "batch_stats": stats}


def _set_conv(conv, kernel, bias=None, transpose=False):
    """A Flax conv kernel [kh, kw, in, out] into a torch Conv2d ([out, in, kh, kw]) or a stride-1
    ConvTranspose2d ([in, out, kh, kw], spatially flipped)."""
    k = np.asarray(kernel)
    w = k[::-1, ::-1].transpose(2, 3, 0, 1) if transpose else k.transpose(3, 2, 0, 1)
    conv.weight.data = torch.from_numpy(np.ascontiguousarray(w))
    if bias is not None:
        conv.bias.data = torch.from_numpy(np.asarray(bias).copy())
    elif conv.bias is not None:  # A bias the Flax helper leaves out: BN's batch mean cancels it.
        conv.bias.data = torch.linspace(-0.5, 0.5, conv.bias.numel())


def _set_bn(bn, params, stats):
    bn.weight.data = torch.from_numpy(np.asarray(params["scale"]).copy())
    bn.bias.data = torch.from_numpy(np.asarray(params["bias"]).copy())
    bn.running_mean.data = torch.from_numpy(np.asarray(stats["mean"]).copy())
    bn.running_var.data = torch.from_numpy(np.asarray(stats["var"]).copy())


def _port_connector(module, params, stats):
    """A Flax `models.Connector` (conv1x1 + BN) into a torch conv_reg."""
    _set_conv(module[0], params["conv"]["kernel"])
    _set_bn(module[1], params["bn"], stats["bn"])


def _torch_net(variables, depth, width, num_classes, train):
    net = PeerWRN(depth, width, num_classes)
    state = interop.wrn_to_torch(variables, depth, width, num_classes)
    net.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})
    return net.train(train)


@pytest.fixture(scope="module")
def setting():
    """A teacher and a student with randomised BN, a batch, and the base config."""
    mesh = parallel.make_mesh()
    config = config_lib.base_config()
    t_model = teacher_lib.build_model("wrn_%d_%d" % TEACHER, 10, "float32")
    s_model = teacher_lib.build_model("wrn_%d_%d" % STUDENT, 10, "float32")
    t_vars = _randomise_bn(teacher_lib.init_variables(t_model, 0, mesh), 1)
    s_vars = _randomise_bn(teacher_lib.init_variables(s_model, 2, mesh), 3)
    rng = np.random.default_rng(4)
    batch = {
        "image": jnp.asarray(rng.normal(size=(BATCH, 32, 32, 3)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, 10, BATCH), jnp.int32),
    }
    return {
        "mesh": mesh,
        "config": config,
        "pair": methods.Pair(t_model, s_model),
        "t_vars": t_vars,
        "s_vars": s_vars,
        "batch": batch,
        "images": _nchw(batch["image"]),
        "labels": torch.from_numpy(np.asarray(batch["label"]).astype(np.int64)),
    }


def _jax_loss(setting, label, helper_params=None, helper_stats=None, aux_extra=None, margins=None):
    params = {"student": setting["s_vars"]["params"], **(helper_params or {})}
    stats = {"student": setting["s_vars"]["batch_stats"], **(helper_stats or {})}
    aux = {**setting["t_vars"], **(aux_extra or {})}
    loss_fn = methods.make_loss_fn(label, setting["pair"], setting["config"], margins)
    loss, (_, metrics) = jax.jit(loss_fn)(params, stats, {}, setting["batch"], None, aux)
    return float(loss), metrics


def _torch_models(setting, teacher_train=False):
    student = _torch_net(setting["s_vars"], *STUDENT, 10, train=True)
    teacher = _torch_net(setting["t_vars"], *TEACHER, 10, train=teacher_train)
    return student, teacher


def _forward(setting, preact=False, teacher_train=False):
    """RepDistiller's `train_distill` forward: student in train mode, teacher under no_grad."""
    student, teacher = _torch_models(setting, teacher_train)
    feat_s, logit_s = student(setting["images"], is_feat=True, preact=preact)
    with torch.no_grad():
        feat_t, logit_t = teacher(setting["images"], is_feat=True, preact=preact)
    return feat_s, logit_s, feat_t, logit_t


def _close(actual, expected):
    expected = float(expected.detach()) if torch.is_tensor(expected) else float(expected)
    assert actual == pytest.approx(expected, rel=RTOL), (actual, expected)


def _init_helpers(setting, label, seed=5):
    params, stats = methods.init_helpers(
        label, setting["pair"], setting["config"], seed, setting["mesh"]
    )
    return _randomise_bn({"params": params, "batch_stats": stats}, seed)


# ------------------------------------------------------------------------------------ the tests


def test_none_and_ab_main_stage_are_the_cross_entropy(setting):
    """RepDistiller's `train_distill` for `abound` (after its init stage) and the student alone:
    gamma * CE with gamma = 1 (`-a 0`, `loss_kd = 0`)."""
    _, logit_s, _, _ = _forward(setting)
    ce = F.cross_entropy(logit_s, setting["labels"])
    for label in ("none", "ab"):
        _close(_jax_loss(setting, label)[0], ce)


def test_kd_is_repdistillers(setting):
    """`-r 0.1 -a 0.9 -b 0 --kd_T 4`: 0.1 CE + 0.9 DistillKL."""
    _, logit_s, _, logit_t = _forward(setting)
    base = setting["config"].baselines
    want = base.kd_ce_weight * F.cross_entropy(logit_s, setting["labels"]) + base.kd_weight * (
        distill_kl(logit_s, logit_t, base.kd_temperature)
    )
    _close(_jax_loss(setting, "kd")[0], want)


def test_fitnets_is_repdistillers(setting):
    """`--distill hint -a 0 -b 100`: CE + 100 HintLoss(ConvReg(feat_s[2]), feat_t[2])."""
    helpers = _init_helpers(setting, "fitnets")
    feat_s, logit_s, feat_t, _ = _forward(setting)
    regressor = conv_reg(feat_s[2].shape[1], feat_t[2].shape[1], use_relu=True).train()
    _port_connector(regressor, helpers["params"]["regressor"], helpers["batch_stats"]["regressor"])
    hint = F.mse_loss(regressor(feat_s[2]), feat_t[2])
    assert (feat_t[2] < 0).any()  # The raw target keeps its negative values.
    want = F.cross_entropy(logit_s, setting["labels"]) + 100 * hint
    loss, metrics = _jax_loss(setting, "fitnets", helpers["params"], helpers["batch_stats"])
    _close(float(metrics["fitnets_loss"]), hint)
    _close(loss, want)


def test_at_is_repdistillers(setting):
    """`--distill attention -a 0 -b 1000`: CE + 1000 sum of at_loss over feat[1:-1]."""
    feat_s, logit_s, feat_t, _ = _forward(setting)
    at = sum(attention_loss(s, t) for s, t in zip(feat_s[1:-1], feat_t[1:-1]))
    loss, metrics = _jax_loss(setting, "at")
    _close(float(metrics["at_loss"]), at)
    _close(loss, F.cross_entropy(logit_s, setting["labels"]) + 1000 * at)


def test_sp_is_repdistillers(setting):
    """`--distill similarity -a 0 -b 3000`: CE + 3000 Similarity on feat[-2]."""
    feat_s, logit_s, feat_t, _ = _forward(setting)
    sp = similarity_loss(feat_s[-2], feat_t[-2])
    loss, metrics = _jax_loss(setting, "sp")
    _close(float(metrics["sp_loss"]), sp)
    _close(loss, F.cross_entropy(logit_s, setting["labels"]) + 3000 * sp)


def _paraphraser(setting, seed=6):
    pair, base = setting["pair"], setting["config"].baselines
    module = methods.Paraphraser(pair.t_shapes()[-1][-1], base.ft_rate)
    params, _ = methods.init_module(module, seed, setting["mesh"], pair.t_shapes()[-1])
    peer = PeerParaphraser(pair.t_shapes()[-1][-1], base.ft_rate)
    convs = [m for m in peer.encoder if isinstance(m, tnn.Conv2d)]
    deconvs = [m for m in peer.decoder if isinstance(m, tnn.ConvTranspose2d)]
    for i, conv in enumerate(convs):
        _set_conv(conv, params[f"enc_{i}"]["conv"]["kernel"], params[f"enc_{i}"]["conv"]["bias"])
    for i, conv in enumerate(deconvs):
        layer = params[f"dec_{i}"]["conv"]
        _set_conv(conv, layer["kernel"], layer["bias"], transpose=True)
    return {"params": params, "batch_stats": {}}, peer


def test_ft_pretraining_is_repdistillers(setting):
    """`helper/pretrain.py` for `factor`: MSELoss(paraphraser(feat_t[-2])[1], feat_t[-2])."""
    variables, peer = _paraphraser(setting)
    _, _, feat_t, _ = _forward(setting)
    _, rec = peer.eval()(feat_t[-2])
    want = F.mse_loss(rec, feat_t[-2])
    _, loss_fn = methods.make_paraphraser_loss(setting["pair"], setting["config"].baselines)
    loss, _ = loss_fn(variables["params"], {}, {}, setting["batch"], None, setting["t_vars"])
    _close(float(loss), want)


def test_ft_is_repdistillers(setting):
    """`--distill factor -a 0 -b 200`: CE + 200 FactorTransfer(translator(feat_s[-2]),
    paraphraser(feat_t[-2], is_factor=True)), the paraphraser in eval mode."""
    variables, peer = _paraphraser(setting)
    helpers = _init_helpers(setting, "ft")
    feat_s, logit_s, feat_t, _ = _forward(setting)
    translator = peer_translator(feat_s[-2].shape[1], feat_t[-2].shape[1]).train()
    p, b = helpers["params"]["translator"], helpers["batch_stats"]["translator"]
    for i, (conv, bn) in enumerate(zip(translator[0::3], translator[1::3])):
        _set_conv(conv, p[f"_ConvAct_{i}"]["conv"]["kernel"])
        _set_bn(bn, p[f"_ConvAct_{i}"]["bn"], b[f"_ConvAct_{i}"]["bn"])
    with torch.no_grad():
        factor_t = peer.eval()(feat_t[-2], is_factor=True)
    ft = factor_loss(translator(feat_s[-2]), factor_t)
    loss, metrics = _jax_loss(
        setting, "ft", helpers["params"], helpers["batch_stats"], {"paraphraser": variables}
    )
    _close(float(metrics["ft_loss"]), ft)
    _close(loss, F.cross_entropy(logit_s, setting["labels"]) + 200 * ft)


@pytest.mark.parametrize("same_widths", [False, True])
def test_ab_initialisation_is_repdistillers(setting, same_widths):
    """`helper/pretrain.py` for `abound`: `model_s.eval()`, its feature modules and the
    connectors back in train mode, preact features, sum(ABLoss(3)) over feat[1:-1]; a connector
    is the identity where the shapes agree (`models/util.py` `Connector`)."""
    if same_widths:  # The student against a teacher of its own widths.
        t_model = teacher_lib.build_model("wrn_16_1", 10, "float32")
        t_vars = _randomise_bn(teacher_lib.init_variables(t_model, 7, setting["mesh"]), 8)
        setting = {
            **setting,
            "pair": methods.Pair(t_model, setting["pair"].student),
            "t_vars": t_vars,
        }
        t_shape = (16, 1)
    else:
        t_shape = TEACHER
    pair = setting["pair"]
    helpers = _init_helpers(setting, "ab")
    assert len(helpers["params"]["st"]) == (0 if same_widths else 3)

    student = _torch_net(setting["s_vars"], *STUDENT, 10, train=False)
    student.get_feat_modules().train()
    teacher = _torch_net(setting["t_vars"], *t_shape, 10, train=False)
    feat_s, _ = student(setting["images"], is_feat=True, preact=True)
    with torch.no_grad():
        feat_t, _ = teacher(setting["images"], is_feat=True, preact=True)
    g_s = feat_s[1:-1]
    if not same_widths:
        connectors = [
            conv_reg(s.shape[1], t.shape[1], use_relu=False).train()
            for s, t in zip(g_s, feat_t[1:-1])
        ]
        for i, connector in enumerate(connectors):
            key = methods.group_key(i + 1)
            _port_connector(
                connector, helpers["params"]["st"][key], helpers["batch_stats"]["st"][key]
            )
        g_s = [c(s) for c, s in zip(connectors, g_s)]
    want = sum(ab_losses(g_s, feat_t[1:-1]))

    params = {"student": setting["s_vars"]["params"], **helpers["params"]}
    stats = {"student": setting["s_vars"]["batch_stats"], **helpers["batch_stats"]}
    loss_fn = methods.make_ab_init_loss(
        pair, setting["config"].baselines, methods.ab_connectors(pair)
    )
    loss, (new_stats, _) = jax.jit(loss_fn)(
        params, stats, {}, setting["batch"], None, setting["t_vars"]
    )
    _close(float(loss), want)
    # The final BN ran on its running statistics, which therefore stay as they were.
    np.testing.assert_array_equal(
        new_stats["student"]["bn1"]["mean"], stats["student"]["bn1"]["mean"]
    )
    trainable = methods.ab_init_trainable(pair, params)
    assert not trainable["student"]["fc"]["kernel"] and not trainable["student"]["bn1"]["scale"]
    assert trainable["student"]["conv1"]["kernel"]


def test_jacobian_is_knowledge_distillation_zoos(setting):
    """`train_kd.py --kd_mode sobolev --lambda_kd 20`: CE + 20 Sobolev, teacher in eval mode."""
    student, teacher = _torch_models(setting)
    img = setting["images"].clone().requires_grad_(True)
    out_s, out_t = student(img), teacher(img)
    want = F.cross_entropy(out_s, setting["labels"]) + 20.0 * sobolev(
        out_s, out_t, img, setting["labels"]
    )
    assert setting["config"].baselines.jacobian_weight == 20.0
    loss, metrics = _jax_loss(setting, "jacobian")
    _close(loss, want)


def test_jacobian_term_is_sobolevs_at_its_weight(setting):
    """The Jacobian term alone: at the default weight it is about 1 % of the loss above, under
    that test's 1e-4 tolerance, so there a student input gradient taken in eval mode (or a
    weight that ignores `jacobian_weight`) would pass."""
    config = config_lib.base_config()
    config.baselines.jacobian_weight = 3.0
    student, teacher = _torch_models(setting)
    img = setting["images"].clone().requires_grad_(True)
    out_s, out_t = student(img), teacher(img)
    term = sobolev(out_s, out_t, img, setting["labels"])
    loss, metrics = _jax_loss({**setting, "config": config}, "jacobian")
    _close(float(metrics["jacobian_loss"]), term)
    _close(loss, F.cross_entropy(out_s, setting["labels"]) + 3.0 * term)


def test_margin_is_overhauls(setting):
    """overhaul's `Distiller` and `train_with_distillation.py`: teacher and student in train mode,
    pre-ReLU features, connectors conv1x1 + BN, margins from the teacher's BNs; CE +
    sum_i partial_L2_i / 2^(G-i) / B / 1000."""
    helpers = _init_helpers(setting, "margin")
    pair = setting["pair"]
    feat_s, logit_s, feat_t, _ = _forward(setting, preact=True, teacher_train=True)
    teacher = _torch_net(setting["t_vars"], *TEACHER, 10, train=True)
    margins = [overhaul_margin(bn) for bn in teacher.get_bn_before_relu()]
    total = 0.0
    for i, (s, t) in enumerate(zip(feat_s[1:-1], feat_t[1:-1])):
        key = methods.group_key(i + 1)
        connector = conv_reg(s.shape[1], t.shape[1], use_relu=False).train()
        _port_connector(connector, helpers["params"]["st"][key], helpers["batch_stats"]["st"][key])
        total = total + overhaul_distillation_loss(connector(s), t, margins[i]) / 2 ** (2 - i)
    want = F.cross_entropy(logit_s, setting["labels"]) + total / BATCH / 1000
    jax_margins = methods.teacher_margins(pair, setting["t_vars"])
    loss, _ = _jax_loss(
        setting, "margin", helpers["params"], helpers["batch_stats"], margins=jax_margins
    )
    _close(loss, want)


# ------------------------------------------------- the DFA authors' baselines ('authors' preset)


def _authors_features(net, images, preact):
    """github.com/PkuDavidGuan/Distillation's WRN features: [g0, g1, g2, g3], the stem and the
    three block outputs, each through the BN that consumes it with `--preReLU`."""
    f0 = net.conv1(images)
    f1 = net.block1(f0)
    f2 = net.block2(f1)
    f3 = net.block3(f2)
    feats = [f0, f1, f2, f3]
    if preact:
        bns = [net.block1.layer[0].bn1] + net.get_bn_before_relu()
        feats = [bn(f) for bn, f in zip(bns, feats)]
    return feats


def _authors_setting(setting, **changes):
    config = config_lib.base_config()
    config.baselines.preset = "authors"
    for field, value in changes.items():
        section, name = field.split(".")
        config[section][name] = value
    return {**setting, "config": config}


def _authors_script(table2_student):
    """What scripts/cifar100.wrn_28_4_<student>.at.sh passes: `--preReLU` for wrn_16_2 only."""
    return "wrn_16_2" == table2_student


def _authors_forward(setting, preact):
    student, teacher = _torch_models(setting)
    logit_s = student(setting["images"])
    feat_s = _authors_features(student, setting["images"], preact)
    with torch.no_grad():
        logit_t = teacher(setting["images"])
        feat_t = _authors_features(teacher, setting["images"], preact)
    return feat_s, logit_s, feat_t, logit_t


@pytest.mark.parametrize("dataset, temperature", [("cifar100", 4), ("cinic10", 16)])
def test_authors_kd(setting, dataset, temperature):
    """`kd_loss.py`: 0.8 CE + 0.2 T^2 soft-CE — the KL here plus the teacher's entropy — at the T
    their scripts pass: 4 on CIFAR-100 (`cifar100.*.kd.sh`), 16 on CINIC-10 (`cinic10.*.kd.sh`)."""
    setting = _authors_setting(setting, **{"data.dataset": dataset})
    _, logit_s, _, logit_t = _authors_forward(setting, preact=False)
    p_t = F.softmax(logit_t / temperature, dim=1)
    soft_ce = -(p_t * F.log_softmax(logit_s / temperature, dim=1)).sum(1).mean()
    scale = 0.2 * temperature**2
    want = 0.8 * F.cross_entropy(logit_s, setting["labels"]) + scale * soft_ce
    entropy = -(p_t * torch.log(p_t)).sum(1).mean()
    _close(_jax_loss(setting, "kd")[0], want - scale * entropy)


@pytest.mark.parametrize("student", ["wrn_16_4", "wrn_28_2", "wrn_16_2"])
def test_authors_at(setting, student):
    """`at_loss.py` as each of Table 2's AT scripts runs it: CE + 60/2 sum over the 4 positions
    of mse(normalize(sum_c f_s), normalize(sum_c f_t)), each sample normalised by its own norm,
    on the pre-ReLU maps where the script passes `--preReLU` (WRN_28_4 -> WRN_16_2), else on
    the raw residual stream."""
    setting = _authors_setting(setting, **{"teacher.model": "wrn_28_4", "student.model": student})
    feat_s, logit_s, feat_t, _ = _authors_forward(setting, preact=_authors_script(student))

    def q(f):
        return F.normalize(f.sum(1).view(f.shape[0], -1), dim=1)

    at = sum(F.mse_loss(q(s), q(t)) for s, t in zip(feat_s, feat_t))
    loss, metrics = _jax_loss(setting, "at")
    _close(float(metrics["at_loss"]), at)
    _close(loss, F.cross_entropy(logit_s, setting["labels"]) + 30 * at)


def test_authors_sp(setting):
    """`similarity_loss.py`: CE + 3000 sum over the 4 raw positions of ||G_t - G_s||_F^2 / B^2."""
    setting = _authors_setting(setting)
    feat_s, logit_s, feat_t, _ = _authors_forward(setting, preact=False)

    def gram(f):
        f = f.view(f.shape[0], -1)
        g = f @ f.t()
        return g / torch.norm(g, dim=1, keepdim=True)

    sp = sum(torch.norm(gram(t) - gram(s), p="fro") ** 2 for s, t in zip(feat_s, feat_t))
    sp = sp / BATCH**2
    loss, metrics = _jax_loss(setting, "sp")
    _close(float(metrics["sp_loss"]), sp)
    _close(loss, F.cross_entropy(logit_s, setting["labels"]) + 3000 * sp)


def _connected(setting, label, feat_s, feat_t):
    helpers = _init_helpers(setting, label)
    keys = [methods.STEM] + [methods.group_key(i + 1) for i in range(3)]
    assert sorted(helpers["params"]["st"]) == sorted(keys)
    out = []
    for key, s, t in zip(keys, feat_s, feat_t):
        connector = conv_reg(s.shape[1], t.shape[1], use_relu=False).train()
        _port_connector(connector, helpers["params"]["st"][key], helpers["batch_stats"]["st"][key])
        out.append(connector(s))
    return helpers, out


def test_authors_margin(setting):
    """`margin_ReLU_loss.py` with `--preReLU`: the teacher in eval mode, the 4 positions weighted
    1/8 .. 1, margins from the teacher's BNs (the stem's from block1.layer[0].bn1); CE + 1e-3 *
    sum / B."""
    setting = _authors_setting(setting)
    feat_s, logit_s, feat_t, _ = _authors_forward(setting, preact=True)
    helpers, mapped = _connected(setting, "margin", feat_s, feat_t)
    teacher = _torch_net(setting["t_vars"], *TEACHER, 10, train=False)
    bns = [teacher.block1.layer[0].bn1] + teacher.get_bn_before_relu()
    total = sum(
        overhaul_distillation_loss(s, t, overhaul_margin(bn)) / 2 ** (3 - i)
        for i, (s, t, bn) in enumerate(zip(mapped, feat_t, bns))
    )
    want = F.cross_entropy(logit_s, setting["labels"]) + 1e-3 * total / BATCH
    margins = methods.teacher_margins(setting["pair"], setting["t_vars"], with_stem=True)
    loss, _ = _jax_loss(
        setting, "margin", helpers["params"], helpers["batch_stats"], margins=margins
    )
    _close(loss, want)


def test_last_with_the_stem_position(setting):
    """`distill.positions='stem_and_groups'`: Last distils the pre-ReLU stem too, weight 1/8,
    with the partial L2 at the constant margin -1 (overhaul's loss on clamped targets)."""
    setting = _authors_setting(setting, **{"distill.positions": "stem_and_groups"})
    setting["config"].baselines.preset = "peers"
    feat_s, logit_s, feat_t, _ = _authors_forward(setting, preact=True)
    helpers, mapped = _connected(setting, "last", feat_s, feat_t)
    minus_one = torch.tensor(-1.0)
    total = sum(
        overhaul_distillation_loss(s, t, minus_one) / 2 ** (3 - i)
        for i, (s, t) in enumerate(zip(mapped, feat_t))
    )
    want = F.cross_entropy(logit_s, setting["labels"]) + 1e-3 * total / BATCH
    pair = setting["pair"]
    beta = methods.frozen_beta(
        methods.aggregation_alpha("last", pair.teacher, setting["config"], "")
    )
    params = {"student": setting["s_vars"]["params"], **helpers["params"]}
    stats = {"student": setting["s_vars"]["batch_stats"], **helpers["batch_stats"]}
    loss_fn = methods.make_loss_fn("last", pair, setting["config"])
    loss, _ = jax.jit(loss_fn)(params, stats, beta, setting["batch"], None, setting["t_vars"])
    _close(float(loss), want)


def test_authors_preset_refuses_a_weight_set_against_it():
    config = config_lib.base_config()
    config.baselines.preset = "authors"
    config.baselines.at_weight = 50.0
    with pytest.raises(config_lib.ConfigError, match=r"baselines.at_weight = 50.0 .*'authors'"):
        config_lib.validate(config, device_count=1)


def _spread(values) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    return float(np.abs(values).max()), float(values.std())


@pytest.mark.parametrize(
    "case", ["same_size", "halve", "double", "shrink", "paraphraser", "translator"]
)
def test_helpers_start_as_pytorch_initialises_repdistillers(case):
    """RepDistiller's ConvReg (FitNets, AB), paraphraser and translator keep PyTorch's default
    initialisation: each of our kernels and biases is uniform over the range PyTorch gives the
    same layer (its fan_in as PyTorch counts it)."""
    from dfa_jax import models  # pylint: disable=g-import-not-at-top
    from dfa_jax.methods import feature_maps  # pylint: disable=g-import-not-at-top

    torch.manual_seed(0)
    c_in, c_out = 64, 96
    if case in ("paraphraser", "translator"):
        if case == "paraphraser":
            module, ours_in = feature_maps.Paraphraser(c_in, 0.5), (1, 8, 8, c_in)
            # encoder C->C->F->F (convs), decoder F->F->C->C (stride-1 transposed convs)
            theirs = [tnn.Conv2d(c_in, c_in, 3, 1, 1), tnn.Conv2d(c_in, 32, 3, 1, 1)]
            theirs += [tnn.Conv2d(32, 32, 3, 1, 1), tnn.ConvTranspose2d(32, 32, 3, 1, 1)]
            theirs += [tnn.ConvTranspose2d(32, c_in, 3, 1, 1)]
            theirs += [tnn.ConvTranspose2d(c_in, c_in, 3, 1, 1)]
        else:
            module, ours_in = feature_maps.Translator(c_out), (1, 8, 8, c_in)
            theirs = [tnn.Conv2d(c_in, c_in, 3, 1, 1), tnn.Conv2d(c_in, c_out, 3, 1, 1)]
            theirs += [tnn.Conv2d(c_out, c_out, 3, 1, 1)]
        params = module.init(jax.random.key(0), jnp.zeros(ours_in))["params"]
        if case == "paraphraser":  # setup() names them enc_0..2, dec_0..2.
            ours = [params[f"{part}_{i}"]["conv"] for part in ("enc", "dec") for i in range(3)]
        else:
            ours = [params[f"_ConvAct_{i}"]["conv"] for i in range(3)]
    else:
        in_hw, out_hw = {
            "same_size": ((8, 8), (8, 8)),
            "halve": ((16, 16), (8, 8)),
            "double": ((4, 4), (8, 8)),
            "shrink": ((10, 10), (8, 8)),
        }[case]
        module = models.Connector(c_out, out_hw=out_hw, initialiser="torch")
        params = module.init(jax.random.key(0), jnp.zeros((1, *in_hw, c_in)))["params"]
        ours = [params["conv"]]
        theirs = [
            {
                "same_size": tnn.Conv2d(c_in, c_out, 1),
                "halve": tnn.Conv2d(c_in, c_out, 3, stride=2, padding=1),
                "double": tnn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1),
                "shrink": tnn.Conv2d(c_in, c_out, 3),
            }[case]
        ]
    assert len(ours) == len(theirs)
    for mine, layer in zip(ours, theirs):
        # PyTorch's default: kernel and bias U(-b, b), b = 1 / sqrt(fan_in), fan_in as PyTorch
        # counts it for the layer (a transposed conv's from its outputs).
        fan_in, _ = tnn.init._calculate_fan_in_and_fan_out(layer.weight)  # pylint: disable=protected-access
        bound = fan_in**-0.5
        parts = [("kernel", layer.weight)] + ([("bias", layer.bias)] if "bias" in mine else [])
        for name, reference in parts:
            assert _spread(reference.detach().numpy())[0] <= bound  # PyTorch's own draws.
            top, spread = _spread(mine[name])
            assert 0.8 * bound <= top <= bound, (case, name, top, bound)
            # 64-96 biases, thousands of kernel entries: the spread to 15 % and 3 %.
            rel = 0.15 if name == "bias" else 0.03
            assert spread == pytest.approx(bound / math.sqrt(3), rel=rel), (case, name)


def test_fitnets_and_ab_build_their_regressors_as_pytorch_initialises():
    """FitNets' and AB's `ConvReg`s take PyTorch's initialisation, DFA's and Margin's connectors
    overhaul's He-normal one."""
    from dfa_jax import models  # pylint: disable=g-import-not-at-top
    from dfa_jax.methods import boundaries, feature_maps  # pylint: disable=g-import-not-at-top

    pair = methods.Pair(
        teacher_lib.build_model("wrn_16_2", 10, "float32"),
        teacher_lib.build_model("resnet8", 10, "float32"),
    )
    regressors = [feature_maps.fitnets_regressor(pair, jnp.float32)]
    regressors += [c for c in boundaries.ab_connectors(pair) if c is not None]
    assert regressors and all(r.initialiser == "torch" for r in regressors)
    assert models.Connector(8).initialiser == "he"
