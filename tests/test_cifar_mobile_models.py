"""RepDistiller's CIFAR MobileNetV2, ShuffleV1, ShuffleV2 and ResNet50: a PyTorch transcription
of their architectures (same state_dict keys) against ours: parameter counts, logits after
`interop.from_torch`, the export round trip and the feature contract (raw group ends = their
`is_feat` features, group-end pre-ReLU maps = their `preact` features, stop/resume)."""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfa_jax import config_lib, interop, models

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

NAMES = ("MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50")
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


# --------------------------------------------------------------------------- PyTorch reference


def _shuffle(x, g):
    n, c, h, w = x.shape
    return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class TInvertedResidual(tnn.Module):
    def __init__(self, inp, oup, stride, t):
        super().__init__()
        hidden = inp * t
        self.residual = stride == 1 and inp == oup
        self.conv = tnn.Sequential(
            tnn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            tnn.BatchNorm2d(hidden),
            tnn.ReLU(),
            tnn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            tnn.BatchNorm2d(hidden),
            tnn.ReLU(),
            tnn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            tnn.BatchNorm2d(oup),
        )

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class TMobileNetV2(tnn.Module):
    """mobile_half: T = 6, width 0.5. forward -> (feats f1..f4, preact feats, logits, f0)."""

    def __init__(self, num_classes, t=6, w=0.5):
        super().__init__()
        setting = [[1, 16, 1, 1], [t, 24, 2, 1], [t, 32, 3, 2], [t, 64, 4, 2]]
        setting += [[t, 96, 3, 1], [t, 160, 3, 2], [t, 320, 1, 1]]
        c_in = int(32 * w)
        self.conv1 = tnn.Sequential(
            tnn.Conv2d(3, c_in, 3, 2, 1, bias=False), tnn.BatchNorm2d(c_in), tnn.ReLU()
        )
        self.blocks = tnn.ModuleList()
        for e, c, n, s in setting:
            c_out = int(c * w)
            stage = []
            for i in range(n):
                stage.append(TInvertedResidual(c_in, c_out, s if i == 0 else 1, e))
                c_in = c_out
            self.blocks.append(tnn.Sequential(*stage))
        self.conv2 = tnn.Sequential(
            tnn.Conv2d(c_in, 1280, 1, 1, 0, bias=False), tnn.BatchNorm2d(1280), tnn.ReLU()
        )
        self.classifier = tnn.Sequential(tnn.Linear(1280, num_classes))

    def forward(self, x):
        out = f0 = self.conv1(x)
        feats = []
        for i, stage in enumerate(self.blocks):
            out = stage(out)
            if i in (1, 2, 4, 6):
                feats.append(out)
        out = F.avg_pool2d(self.conv2(out), 2, ceil_mode=True).flatten(1)
        return feats, feats, self.classifier(out), f0


class TShuffleV1Block(tnn.Module):
    def __init__(self, in_planes, out_planes, stride, groups):
        super().__init__()
        mid = out_planes // 4
        g = 1 if in_planes == 24 else groups
        self.stride, self.g = stride, g
        self.conv1 = tnn.Conv2d(in_planes, mid, 1, groups=g, bias=False)
        self.bn1 = tnn.BatchNorm2d(mid)
        self.conv2 = tnn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = tnn.BatchNorm2d(mid)
        self.conv3 = tnn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
        self.bn3 = tnn.BatchNorm2d(out_planes)

    def forward(self, x):
        out = _shuffle(F.relu(self.bn1(self.conv1(x))), self.g)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        if self.stride == 2:
            return torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1)
        return out + x


class TShuffleV1(tnn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(24)
        c_in = 24
        for layer, (c_out, n) in enumerate(zip((240, 480, 960), (4, 8, 4)), start=1):
            blocks = []
            for i in range(n):
                cat = c_in if i == 0 else 0
                blocks.append(TShuffleV1Block(c_in, c_out - cat, 2 if i == 0 else 1, 3))
                c_in = c_out
            setattr(self, f"layer{layer}", tnn.Sequential(*blocks))
        self.linear = tnn.Linear(960, num_classes)

    def forward(self, x):
        out = f0 = F.relu(self.bn1(self.conv1(x)))
        feats, pre = [], []
        for layer in (self.layer1, self.layer2, self.layer3):
            for block in layer:
                p = block(out)
                out = F.relu(p)
            feats.append(out)
            pre.append(p)
        return feats, pre, self.linear(out.mean(dim=(2, 3))), f0


class TShuffleV2Down(tnn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        mid = c_out // 2
        self.conv1 = tnn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False)
        self.bn1 = tnn.BatchNorm2d(c_in)
        self.conv2 = tnn.Conv2d(c_in, mid, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(mid)
        self.conv3 = tnn.Conv2d(c_in, mid, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(mid)
        self.conv4 = tnn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = tnn.BatchNorm2d(mid)
        self.conv5 = tnn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = tnn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return _shuffle(torch.cat([left, right], 1), 2), None


class TShuffleV2Basic(tnn.Module):
    def __init__(self, c):
        super().__init__()
        c = int(c * 0.5)
        self.conv1 = tnn.Conv2d(c, c, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(c)
        self.conv2 = tnn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = tnn.BatchNorm2d(c)
        self.conv3 = tnn.Conv2d(c, c, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(c)

    def forward(self, x):
        c = int(x.shape[1] * 0.5)
        x1, x2 = x[:, :c], x[:, c:]
        p = self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2)))))))
        return _shuffle(torch.cat([x1, F.relu(p)], 1), 2), torch.cat([x1, p], 1)


class TShuffleV2(tnn.Module):
    def __init__(self, num_classes):
        super().__init__()
        widths = (116, 232, 464, 1024)
        self.conv1 = tnn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(24)
        c_in = 24
        for layer, n in enumerate((3, 7, 3), start=1):
            c = widths[layer - 1]
            blocks = [TShuffleV2Down(c_in, c)] + [TShuffleV2Basic(c) for _ in range(n)]
            setattr(self, f"layer{layer}", tnn.Sequential(*blocks))
            c_in = c
        self.conv2 = tnn.Conv2d(464, 1024, 1, 1, 0, bias=False)
        self.bn2 = tnn.BatchNorm2d(1024)
        self.linear = tnn.Linear(1024, num_classes)

    def forward(self, x):
        out = f0 = F.relu(self.bn1(self.conv1(x)))
        feats, pre = [], []
        for layer in (self.layer1, self.layer2, self.layer3):
            for block in layer:
                out, p = block(out)
            feats.append(out)
            pre.append(p)
        out = F.relu(self.bn2(self.conv2(out)))
        return feats, pre, self.linear(out.mean(dim=(2, 3))), f0


class TBottleneck(tnn.Module):
    def __init__(self, c_in, planes, stride):
        super().__init__()
        self.conv1 = tnn.Conv2d(c_in, planes, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv3 = tnn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(4 * planes)
        self.shortcut = tnn.Sequential()
        if stride != 1 or c_in != 4 * planes:
            self.shortcut = tnn.Sequential(
                tnn.Conv2d(c_in, 4 * planes, 1, stride, bias=False), tnn.BatchNorm2d(4 * planes)
            )

    def forward(self, x):
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.bn3(self.conv3(out)) + self.shortcut(x)


class TResNet50(tnn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(64)
        c_in = 64
        for layer, (planes, n) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
            blocks = []
            for i in range(n):
                stride = (1 if layer == 1 else 2) if i == 0 else 1
                blocks.append(TBottleneck(c_in, planes, stride))
                c_in = 4 * planes
            setattr(self, f"layer{layer}", tnn.Sequential(*blocks))
        self.linear = tnn.Linear(2048, num_classes)

    def forward(self, x):
        out = f0 = F.relu(self.bn1(self.conv1(x)))
        feats, pre = [], []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                p = block(out)
                out = F.relu(p)
            feats.append(out)
            pre.append(p)
        return feats, pre, self.linear(out.mean(dim=(2, 3))), f0


TORCH = {"MobileNetV2": TMobileNetV2, "ShuffleV1": TShuffleV1, "ShuffleV2": TShuffleV2}
TORCH["ResNet50"] = TResNet50


@functools.cache
def torch_net(name, num_classes=10, seed=0):
    """Their architecture in eval mode with random weights, BN affines and running statistics."""
    torch.manual_seed(seed)
    net = TORCH[name](num_classes)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, tnn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.0)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _nhwc(t):
    return np.asarray(t.detach().numpy()).transpose(0, 2, 3, 1)


def _images(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, 32, 32)).astype(np.float32)


def nn_relu(x):
    return np.maximum(np.asarray(x), 0.0)


def _abstract(model):
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)


# ----------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", NAMES)
def test_param_count_and_keys_equal_theirs(name):
    model = models.get_model(name, 100)
    ours = sum(leaf.size for leaf in jax.tree.leaves(_abstract(model)["params"]))
    net = TORCH[name](100)
    assert ours == sum(p.numel() for p in net.parameters())
    # The exported keys are theirs, in their order (what load_state_dict's errors list).
    exported = interop.to_torch(
        jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), _abstract(model)), name, 100
    )
    assert list(exported) == list(net.state_dict())
    net.load_state_dict(exported, strict=True)


# One image for ResNet50 (the largest); the round trip and the contract on every family.
@pytest.mark.parametrize("name, batch", [(n, 1 if n == "ResNet50" else 2) for n in NAMES])
def test_logits_features_and_round_trip_match_theirs(name, batch):
    net = torch_net(name)
    images = _images(batch)
    with torch.no_grad():
        feats, pre, logits, f0 = net(torch.from_numpy(images))
    checkpoint = {"model": net.state_dict()}  # As both repositories save them.
    variables = interop.from_torch(checkpoint, name, 10)
    model = models.get_model(name, 10)
    assert isinstance(model, models.FeatureModel)

    x = jnp.asarray(images.transpose(0, 2, 3, 1))
    run = jax.jit(lambda v, x: model.apply(v, x, mutable=[models.FEATURES]))
    ours, mutated = run(variables, x)
    sown = mutated[models.FEATURES]
    np.testing.assert_allclose(ours, logits.numpy(), atol=1e-4, rtol=1e-4)

    # Feature contract: every named map is sown; raw ends and pre-ReLU ends are theirs.
    names = [n for group in model.feature_groups() for n in group]
    assert set(names) | set(model.extra_feature_names()) == set(sown)
    assert len(model.raw_group_ends()) == len(model.feature_groups()) == model.num_groups
    stem_pre, stem_raw = model.stem_features()
    np.testing.assert_allclose(sown[stem_raw][0], _nhwc(f0), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(nn_relu(sown[stem_pre][0]), _nhwc(f0), atol=1e-4, rtol=1e-4)
    for raw, theirs in zip(model.raw_group_ends(), feats, strict=True):
        np.testing.assert_allclose(sown[raw][0], _nhwc(theirs), atol=1e-4, rtol=1e-4)
    for group, theirs in zip(model.feature_groups(), pre, strict=True):
        np.testing.assert_allclose(sown[group[-1]][0], _nhwc(theirs), atol=1e-4, rtol=1e-4)

    # Stop at a group's boundary and resume from it: the same logits.
    k = model.num_groups // 2
    stop = jax.jit(lambda v, x: model.apply(v, x, stop_group=k))
    resume = jax.jit(lambda v, b: model.apply(v, b, start_group=k))
    boundary = stop(variables, x)
    np.testing.assert_allclose(boundary, sown[model.feature_groups()[k - 1][-1]][0], atol=1e-6)
    np.testing.assert_allclose(resume(variables, boundary), ours, atol=1e-5, rtol=1e-5)

    # Export round trip: their model loads ours strictly, and the import of it is exact.
    exported = interop.to_torch(variables, name, 10)
    net2 = TORCH[name](10)
    net2.load_state_dict(exported, strict=True)
    again = interop.from_torch(exported, name, 10)
    jax.tree.map(np.testing.assert_array_equal, again, variables)


def test_group_end_bns_follow_get_bn_before_relu():
    """One BatchNorm per group and the stem's (which ones:
    `test_group_end_bns_are_the_batchnorms_their_get_bn_before_relu_names`); the ShuffleNets,
    whose `get_bn_before_relu` RepDistiller leaves unimplemented, have none."""
    for name in ("MobileNetV2", "ResNet50"):
        model = models.get_model(name, 10)
        params = _abstract(model)["params"]
        family = models.family_of(name)
        bns = family.group_end_bns(model, params, True)
        assert len(bns) == model.num_groups + 1
        assert set(bns[1]) == {"scale", "bias"}
    assert models.family_of("ShuffleV1").group_end_bns is None
    assert models.family_of("ShuffleV2").group_end_bns is None


def test_wrong_checkpoint_names_the_problem():
    state = torch_net("ShuffleV1").state_dict()
    with pytest.raises(interop.InteropError, match=r"ShuffleV2 with 10 classes.*key"):
        interop.from_torch(state, "ShuffleV2", 10)
    with pytest.raises(interop.InteropError, match=r"linear.weight.*shape"):
        interop.from_torch(state, "ShuffleV1", 100)
    with pytest.raises(interop.InteropError, match="cannot be converted: only Wide ResNets"):
        interop.from_torch(state, "resnet_50", 10)


def _load_config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(None)


def test_names_and_config_validate():
    for name in NAMES:
        assert name in models.MODEL_NAMES and models.is_valid_model_name(name)
        assert models.family_of(name).presets == (name,)
    config = _load_config("cifar100_teacher")
    config.teacher.model, config.student.model = "ShuffleV2", "ShuffleV1"  # Both 16/8/4.
    config_lib.validate(config, device_count=1)
    config.teacher.model, config.student.model = "ResNet50", "MobileNetV2"  # 32/16/8/4, 16/8/4/2.
    config_lib.validate(config, device_count=1)
    config.teacher.model, config.student.model = "MobileNetV2", "ResNet50"  # The student larger.
    with pytest.raises(config_lib.ConfigError, match="spatial sizes"):
        config_lib.validate(config, device_count=1)


@pytest.mark.parametrize("name", NAMES)
def test_train_mode_and_bfloat16_trace(name):
    """Shapes only (eval_shape): train mode updates every BN's statistics; bf16 maps, f32 logits."""
    model = models.get_model(name, 10, dtype=jnp.bfloat16)
    variables = _abstract(model)
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    logits, mutated = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats", models.FEATURES]),
        variables,
        images,
    )
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert jax.tree.structure(mutated["batch_stats"]) == jax.tree.structure(
        variables["batch_stats"]
    )
    assert mutated[models.FEATURES]["g1_b1"][0].dtype == jnp.bfloat16


# ------------------------------------------------------------------------- initialisation


def _kurtosis(x):
    x = x - x.mean()
    return float(np.mean(x**4) / np.mean(x**2) ** 2)


def assert_starts_as(ours: dict, theirs: dict) -> None:
    """Each tensor of our exported initial state_dict is drawn as their fresh network's is: the
    same constant, or (for a tensor of >= 100 values) the same scale (std within 25 %) and, with
    >= 1000 values, the same shape of distribution (kurtosis: 1.8 uniform, 3 normal)."""
    checked = 0
    for key, want in theirs.items():
        if key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked"):
            continue
        got, want = np.asarray(ours[key], np.float64), want.double().numpy()
        if want.std() == 0 or want.size < 100:
            if want.std() == 0:
                np.testing.assert_array_equal(got, want, err_msg=key)
            else:  # A small bias of PyTorch's default: not zero, within its range.
                assert got.any() and np.abs(got).max() <= 1.05 * np.abs(want).max() + 0.05, key
            continue
        ratio = got.std() / want.std()
        assert 0.8 < ratio < 1.25, (key, ratio)
        if want.size >= 1000:
            shape = _kurtosis(got) - _kurtosis(want)
            assert abs(shape) < 0.6, (key, shape)
        checked += 1
    assert checked >= 5


def repdistiller_initialised(name, num_classes=100, seed=0):
    """Their network as its constructor leaves it: MobileNetV2's `_initialize_weights`
    (N(0, sqrt(2/n)) convs, N(0, 0.01) classifier, zero biases); ShuffleV1 and ShuffleV2 have no
    init code, so PyTorch's defaults."""
    torch.manual_seed(seed)
    net = TORCH[name](num_classes)
    with torch.no_grad():
        if name == "MobileNetV2":
            for m in net.modules():
                if isinstance(m, tnn.Conv2d):
                    n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                    m.weight.normal_(0, (2.0 / n) ** 0.5)
                elif isinstance(m, tnn.Linear):
                    m.weight.normal_(0, 0.01)
                    m.bias.zero_()
    return net.state_dict()


@pytest.mark.parametrize("name", ["MobileNetV2", "ShuffleV1", "ShuffleV2"])
def test_networks_start_as_theirs(name):
    model = models.get_model(name, 100)
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3))
    )
    assert_starts_as(interop.to_torch(variables, name, 100), repdistiller_initialised(name))


def test_group_end_bns_are_the_batchnorms_their_get_bn_before_relu_names():
    """On their imported weights, MobileNetV2's and ResNet50's `group_end_bns` hold the affine
    parameters of the BatchNorms RepDistiller's `get_bn_before_relu()` returns (MobileNetV2:
    `blocks[i][-1].conv[-1]` for stages 1, 2, 4, 6; ResNet50: `layer{g}[-1].bn3`), after the stem's
    BatchNorm."""
    for name in ("MobileNetV2", "ResNet50"):
        net = torch_net(name)
        variables = interop.from_torch({"model": net.state_dict()}, name, 10)
        model = models.get_model(name, 10)
        if name == "MobileNetV2":
            theirs = [net.conv1[1]] + [net.blocks[i][-1].conv[-1] for i in (1, 2, 4, 6)]
        else:
            theirs = [net.bn1] + [getattr(net, f"layer{g}")[-1].bn3 for g in (1, 2, 3, 4)]
        bns = models.family_of(name).group_end_bns(model, variables["params"], True)
        assert len(bns) == len(theirs), name
        for bn, want in zip(bns, theirs, strict=True):
            np.testing.assert_array_equal(bn["scale"], want.weight.detach().numpy())
            np.testing.assert_array_equal(bn["bias"], want.bias.detach().numpy())


@pytest.mark.parametrize("name", NAMES)
def test_the_stem_map_is_their_stem_batchnorms_output_before_the_relu(name):
    """The sown 'stem' is the stem BatchNorm's output (negative values kept), the map their
    `preact` stem would be; 'stem_out' is its ReLU, their f0."""
    net = torch_net(name)
    images = _images(1)
    with torch.no_grad():
        if name == "MobileNetV2":
            theirs = net.conv1[1](net.conv1[0](torch.from_numpy(images)))
        else:
            theirs = net.bn1(net.conv1(torch.from_numpy(images)))
    variables = interop.from_torch({"model": net.state_dict()}, name, 10)
    model = models.get_model(name, 10)
    x = jnp.asarray(images.transpose(0, 2, 3, 1))
    _, mutated = model.apply(variables, x, stop_group=1, mutable=[models.FEATURES])
    stem_pre, _ = model.stem_features()
    assert float(theirs.min()) < 0
    sown = mutated[models.FEATURES][stem_pre][0]
    np.testing.assert_allclose(sown, _nhwc(theirs), atol=1e-4, rtol=1e-4)
