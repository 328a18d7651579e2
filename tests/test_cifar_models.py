"""RepDistiller's CIFAR ResNets and VGGs: parameter counts equal a PyTorch transcription of their
models for every name, their checkpoints import with the same logits and `is_feat` features,
export round trips exactly, and the feature contract holds (sown names, stop/resume)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cifar_mobile_models import assert_starts_as
from test_config import load_config, write_alpha_file

from dfa_jax import config_lib, interop, models, parallel, teacher

torch = pytest.importorskip("torch")
nn = torch.nn

RESNETS = {
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet14": (14, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet44": (44, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}
VGGS = {  # Their cfg S, A, B, D, E.
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}
# With 100 classes; equal to the PyTorch models' (checked below), as in CRD's tables (0.86M
# resnet56, 7.43M resnet32x4, 9.46M vgg13, ...).
PARAM_COUNTS = {
    "resnet8": 83892,
    "resnet14": 181108,
    "resnet20": 278324,
    "resnet32": 472756,
    "resnet44": 667188,
    "resnet56": 861620,
    "resnet110": 1736564,
    "resnet8x4": 1233540,
    "resnet32x4": 7433860,
    "vgg8": 3965028,
    "vgg11": 9277284,
    "vgg13": 9462180,
    "vgg16": 14774436,
    "vgg19": 20086692,
}
NUMERIC = ("resnet8", "resnet8x4", "vgg8")  # Small ones: one per kind of block layout.
# Groups of several blocks (resnet14) or conv layers (vgg13, its stem too): what happens between
# a group's blocks, and which of its BatchNorms ends it.
SEVERAL_BLOCKS = ("resnet14", "vgg13")
NUM_CLASSES = 7


# --------------------------------------------------------------------------- PyTorch reference


class TorchBlock(nn.Module):
    """Post-activation basic block; returns (relu(sum), sum)."""

    def __init__(self, inplanes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        pre = out + (x if self.downsample is None else self.downsample(x))
        return torch.relu(pre), pre


class TorchResNet(nn.Module):
    """RepDistiller's CIFAR ResNet: forward -> (logits, [f0, f1..f3], [f1_pre..f3_pre])."""

    def __init__(self, depth, widths, num_classes):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        for g in (1, 2, 3):
            stride = 1 if g == 1 else 2
            blocks = [
                TorchBlock(
                    widths[g - 1] if i == 0 else widths[g], widths[g], stride if i == 0 else 1
                )
                for i in range(n)
            ]
            setattr(self, f"layer{g}", nn.Sequential(*blocks))
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        feats, pres = [x], []
        for g in (1, 2, 3):
            for block in getattr(self, f"layer{g}"):
                x, pre = block(x)
            feats.append(x)
            pres.append(pre)
        return self.fc(x.mean(dim=(2, 3))), feats, pres


class TorchVGG(nn.Module):
    """RepDistiller's `vgg*_bn` (32x32 inputs): forward -> (logits, [f0..f4], [f1_pre..f4_pre])."""

    def __init__(self, cfg, num_classes):
        super().__init__()
        in_channels = 3
        for b, widths in enumerate(cfg):
            layers = []
            for v in widths:
                layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
                in_channels = v
            setattr(self, f"block{b}", nn.Sequential(*layers[:-1]))
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        x = torch.relu(self.block0(x))
        feats, pres = [x], []
        for b in (1, 2, 3, 4):
            if b < 4:
                x = nn.functional.max_pool2d(x, 2, 2)
            pre = getattr(self, f"block{b}")(x)
            x = torch.relu(pre)
            feats.append(x)
            pres.append(pre)
        return self.classifier(x.mean(dim=(2, 3))), feats, pres


def torch_model(name, num_classes, seed=0):
    """Their network in eval mode, random weights, BN affine parameters and running statistics."""
    torch.manual_seed(seed)
    if name in RESNETS:
        net = TorchResNet(*RESNETS[name], num_classes)
    else:
        net = TorchVGG(VGGS[name], num_classes)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(240)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0.0, 0.1)
    return net.eval()


def images(n=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 3, 32, 32)).astype(np.float32)


def nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


@functools.cache
def jitted_apply(name, num_classes, start_group=0, stop_group=None):
    model = models.get_model(name, num_classes)
    return jax.jit(
        functools.partial(
            model.apply,
            train=False,
            start_group=start_group,
            stop_group=stop_group,
            mutable=[models.FEATURES],
        )
    )


@functools.cache
def imported(name):
    """(torch net, its state_dict, the imported Flax variables)."""
    net = torch_model(name, NUM_CLASSES)
    state = net.state_dict()
    return net, state, interop.from_torch({"model": state}, name, NUM_CLASSES)


# ------------------------------------------------------------------------------ architectures


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_parameter_counts_equal_theirs(name):
    assert name in models.MODEL_NAMES and models.is_valid_model_name(name)
    model = models.get_model(name, 100)
    shapes = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    params = jax.eval_shape(model.init, jax.random.key(0), shapes)["params"]
    ours = sum(leaf.size for leaf in jax.tree.leaves(params))
    net = TorchResNet(*RESNETS[name], 100) if name in RESNETS else TorchVGG(VGGS[name], 100)
    theirs = sum(p.numel() for p in net.parameters())
    assert ours == theirs == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", NUMERIC + SEVERAL_BLOCKS)
def test_imported_checkpoint_gives_their_logits_and_features(name):
    net, _, variables = imported(name)
    x = images()
    with torch.no_grad():
        logits, feats, pres = net(torch.from_numpy(x))
    model = models.get_model(name, NUM_CLASSES)
    ours, mutated = jitted_apply(name, NUM_CLASSES)(variables, nhwc(x))
    sown = {k: np.asarray(v[0]) for k, v in mutated[models.FEATURES].items()}
    np.testing.assert_allclose(np.asarray(ours), logits.numpy(), rtol=1e-4, atol=1e-4)
    # Their is_feat features (f0, f1..): the stem's raw map and the raw group ends.
    raw = (model.stem_features()[1],) + model.raw_group_ends()
    for got, want in zip(raw, feats, strict=True):
        np.testing.assert_allclose(sown[got], nhwc(want), rtol=1e-4, atol=1e-4)
    # Their preact=True features: the group boundaries (the last candidate of each group).
    for group, want in zip(model.feature_groups(), pres, strict=True):
        np.testing.assert_allclose(sown[group[-1]], nhwc(want), rtol=1e-4, atol=1e-4)
    stem_pre, stem_raw = model.stem_features()
    np.testing.assert_array_equal(sown[stem_raw], np.maximum(sown[stem_pre], 0.0))


@pytest.mark.parametrize("name", NUMERIC)
def test_export_round_trip_is_exact_and_loads_strictly(name):
    net, state, variables = imported(name)
    back = interop.to_torch(variables, name, NUM_CLASSES)
    assert list(back) == list(state)  # Their keys, in their order.
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue  # Not imported: exported as 0.
        assert torch.equal(back[key], value), key
    net.load_state_dict(back, strict=True)
    again = interop.from_torch(back, name, NUM_CLASSES)
    for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(variables), strict=True):
        assert np.array_equal(got, want)


def test_wrong_model_or_classes_names_the_tensor_and_dataparallel_loads():
    _, state, variables = imported("resnet8")
    with pytest.raises(interop.InteropError, match=r"key 'fc\.weight' has shape \(7, 64\)"):
        interop.from_torch(state, "resnet8", 10)
    with pytest.raises(interop.InteropError, match=r"look like resnet8 with 7 classes"):
        interop.from_torch(state, "resnet8", 10)
    with pytest.raises(interop.InteropError, match=r"missing key 'layer1\.1\.conv1\.weight'"):
        interop.from_torch(state, "resnet14", NUM_CLASSES)
    vgg_state = imported("vgg8")[1]
    with pytest.raises(interop.InteropError, match=r"look like vgg8 with 7 classes"):
        interop.from_torch(vgg_state, "vgg13", NUM_CLASSES)
    wrapped = {"model": {f"module.{k}": v for k, v in state.items()}}
    loaded = interop.from_torch(wrapped, "resnet8", NUM_CLASSES)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables), strict=True):
        assert np.array_equal(got, want)
    with pytest.raises(interop.InteropError, match="'resnet_50' cannot be converted"):
        interop.from_torch(state, "resnet_50", NUM_CLASSES)


def test_cli_imports_a_checkpoint_as_teacher_variables(tmp_path, capsys):
    _, state, variables = imported("vgg8")
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": state, "epoch": 240}, path)
    out = tmp_path / "vgg8"
    interop.main(["import", "--model", "vgg8", "--num-classes", "7", str(path), str(out)])
    assert "--config.teacher.model=vgg8" in capsys.readouterr().out
    model = models.get_model("vgg8", NUM_CLASSES)
    restored = teacher.load_variables(str(out), model, parallel.make_mesh())
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(variables), strict=True):
        assert np.array_equal(np.asarray(got), want)


# ----------------------------------------------------------------------------- feature contract


@pytest.mark.parametrize("name", NUMERIC)
def test_feature_contract_names_and_stop_resume(name):
    _, _, variables = imported(name)
    model = models.get_model(name, NUM_CLASSES)
    assert isinstance(model, models.FeatureModel)
    family = models.family_of(name)
    assert family is models.family_of(model) and family.has_stem
    x = nhwc(images(2, seed=1))
    logits, mutated = jitted_apply(name, NUM_CLASSES)(variables, x)
    sown = mutated[models.FEATURES]
    groups = model.feature_groups()
    assert len(groups) == len(model.raw_group_ends()) == model.num_groups
    assert set(sown) == {n for g in groups for n in g} | set(model.extra_feature_names())
    for g in range(1, model.num_groups + 1):
        boundary, _ = jitted_apply(name, NUM_CLASSES, stop_group=g)(variables, x)
        # Two programs (the model stopped at g, the whole model): float rounding apart at most.
        np.testing.assert_allclose(boundary, sown[groups[g - 1][-1]][0], rtol=1e-6, atol=1e-6)
        resumed, _ = jitted_apply(name, NUM_CLASSES, start_group=g)(variables, boundary)
        np.testing.assert_allclose(resumed, logits, rtol=1e-5, atol=1e-5)
    # One BN per group end (Margin's margins), of the group end's width.
    bns = family.group_end_bns(model, variables["params"], True)
    widths = [sown[model.stem_features()[0]][0].shape[-1]] + [
        sown[g[-1]][0].shape[-1] for g in groups
    ]
    assert [bn["scale"].shape[0] for bn in bns] == widths
    assert all(head in variables["params"] for head in family.head)


def test_train_mode_updates_batch_statistics():
    _, _, variables = imported("resnet8")
    model = models.get_model("resnet8", NUM_CLASSES)
    step = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    _, updates = step(variables, nhwc(images(4)))
    old, new = variables["batch_stats"]["bn1"]["mean"], updates["batch_stats"]["bn1"]["mean"]
    assert not np.allclose(old, new)


@pytest.mark.parametrize("teacher, student", [("resnet32x4", "resnet8x4"), ("vgg13", "vgg8")])
def test_validate_accepts_a_pair_of_them(teacher, student, tmp_path):
    config = load_config("cifar100_pair1")
    config.teacher.model, config.student.model = teacher, student
    if config.distill.aggregation == "file":
        config.distill.alpha_file = write_alpha_file(tmp_path / "a.json", teacher)
    config_lib.validate(config, device_count=2)
    config.student.model = "resnet_8"
    with pytest.raises(config_lib.ConfigError, match="student.model = 'resnet_8' is unknown"):
        config_lib.validate(config, device_count=2)


@pytest.mark.parametrize("name", ["resnet8x4", "vgg8"])
def test_networks_start_as_theirs(name):
    """Their constructors: He-normal fan_out convs (VGG: N(0, sqrt(2/n)), zero bias), BN 1/0; the
    ResNet's fc left at nn.Linear's default (uniform weight and bias), VGG's N(0, 0.01), bias 0."""
    torch.manual_seed(0)
    net = TorchResNet(*RESNETS[name], 100) if name in RESNETS else TorchVGG(VGGS[name], 100)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Linear) and name in VGGS:
                m.weight.normal_(0, 0.01)
                m.bias.zero_()
    model = models.get_model(name, 100)
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3))
    )
    assert_starts_as(interop.to_torch(variables, name, 100), net.state_dict())


@pytest.mark.parametrize("name", SEVERAL_BLOCKS)
def test_group_end_bns_are_the_batchnorms_their_get_bn_before_relu_names(name):
    """On an imported checkpoint, `group_end_bns` holds the BatchNorms of their
    `get_bn_before_relu()` (a ResNet group's last block's bn2, a VGG block's last BN), after the
    stem's."""
    net, _, variables = imported(name)
    model = models.get_model(name, NUM_CLASSES)
    if name in RESNETS:
        theirs = [net.bn1] + [getattr(net, f"layer{g}")[-1].bn2 for g in (1, 2, 3)]
    else:
        theirs = [getattr(net, f"block{b}")[-1] for b in range(5)]
    bns = models.family_of(name).group_end_bns(model, variables["params"], True)
    for bn, want in zip(bns, theirs, strict=True):
        np.testing.assert_array_equal(bn["scale"], want.weight.detach().numpy())
        np.testing.assert_array_equal(bn["bias"], want.bias.detach().numpy())
