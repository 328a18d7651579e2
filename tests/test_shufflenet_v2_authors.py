"""The paper's ShuffleNetV2 (Table 4) against a PyTorch transcription of the DFA authors' model
(PkuDavidGuan/Distillation, `framework/modeling/backbone/shufflenetV2.py`; same modules, same
state_dict keys): parameter counts, logits and group maps after `interop.from_torch`, the export
round trip, and the initialisation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfa_jax import interop, models

torch = pytest.importorskip("torch")
from test_cifar_mobile_models import assert_starts_as

tnn = torch.nn

# Their out_channels per width ratio, and their `prime_idx`: the stem, each stage's last unit and
# conv5 among the 18 maps their forward collects.
THEIR_WIDTHS = {
    "0.5": (48, 96, 192, 1024),
    "1.0": (116, 232, 464, 1024),
    "2.0": (244, 488, 976, 2048),
}
PRIME_IDX = (0, 4, 12, 16, 17)
TABLE4_PARAMS_M = {"0.5": 0.36, "1.0": 1.27, "2.0": 5.37}  # With 10 classes (CINIC-10).


# --------------------------------------------------------------------------- PyTorch reference


class TUnit(tnn.Module):
    """Their ShuffleUnit: ReLU-led `residual` (and, at stride 2, `shortcut`) Sequentials; output
    cat([shortcut, residual]) shuffled with 2 groups."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.split = stride == 1 and c_in == c_out
        mid = c_in // 2 if self.split else c_in
        self.residual = tnn.Sequential(
            tnn.ReLU(),
            tnn.Conv2d(mid, mid, 1),
            tnn.BatchNorm2d(mid),
            tnn.ReLU(),
            tnn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid),
            tnn.BatchNorm2d(mid),
            tnn.Conv2d(mid, c_out // 2, 1),
            tnn.BatchNorm2d(c_out // 2),
        )
        if self.split:
            self.shortcut = tnn.Sequential(tnn.ReLU())
        else:
            self.shortcut = tnn.Sequential(
                tnn.ReLU(),
                tnn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in),
                tnn.BatchNorm2d(c_in),
                tnn.Conv2d(c_in, c_out // 2, 1),
                tnn.BatchNorm2d(c_out // 2),
            )

    def forward(self, x):
        left, right = x.chunk(2, dim=1) if self.split else (x, x)
        out = torch.cat([self.shortcut(left), self.residual(right)], dim=1)
        n, c, h, w = out.shape
        return out.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class TShuffleNetV2(tnn.Module):
    """Their ShuffleNetV2: forward -> (logits, [18 maps] or the 5 at PRIME_IDX)."""

    def __init__(self, ratio, num_classes):
        super().__init__()
        widths = THEIR_WIDTHS[ratio]
        self.pre = tnn.Sequential(tnn.Conv2d(3, 24, 3, padding=1), tnn.BatchNorm2d(24))
        for s, (c_in, c_out, repeat) in enumerate(
            zip((24,) + widths[:2], widths[:3], (3, 7, 3)), start=2
        ):
            units = [TUnit(c_in, c_out, 2)] + [TUnit(c_out, c_out, 1) for _ in range(repeat)]
            setattr(self, f"stage{s}", tnn.Sequential(*units))
        self.conv5 = tnn.Sequential(
            tnn.ReLU(), tnn.Conv2d(widths[2], widths[3], 1), tnn.BatchNorm2d(widths[3])
        )
        self.relu = tnn.ReLU()
        self.fc = tnn.Linear(widths[3], num_classes)

    def forward(self, x, prime=True):
        g = [self.pre(x)]
        for unit in (*self.stage2, *self.stage3, *self.stage4, self.conv5):
            g.append(unit(g[-1]))
        out = self.fc(self.relu(g[-1]).mean((2, 3)))
        return out, [g[i] for i in PRIME_IDX] if prime else g


def randomised_net(ratio, num_classes=10, seed=0):
    """Their network in eval mode with random BN affine parameters and statistics."""
    torch.manual_seed(seed)
    net = TShuffleNetV2(ratio, num_classes)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, tnn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _name(ratio):
    return f"shufflenet_v2_{ratio}"


def _abstract(model):
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)


def _nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)


# ----------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("ratio", sorted(THEIR_WIDTHS))
def test_param_count_and_keys_equal_theirs_and_table4(ratio):
    model = models.get_model(_name(ratio), 10)
    ours = sum(leaf.size for leaf in jax.tree.leaves(_abstract(model)["params"]))
    net = TShuffleNetV2(ratio, 10)
    assert ours == sum(p.numel() for p in net.parameters())
    assert round(ours / 1e6, 2) == TABLE4_PARAMS_M[ratio]
    exported = interop.to_torch(
        jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), _abstract(model)), _name(ratio), 10
    )
    assert list(exported) == list(net.state_dict())  # Their keys, in their order.


@pytest.mark.parametrize("ratio", ["0.5", "1.0"])
def test_their_weights_give_their_logits_and_maps(ratio):
    net = randomised_net(ratio)
    images = np.random.RandomState(0).randn(2, 3, 32, 32).astype(np.float32)
    with torch.no_grad():
        logits, prime = net(torch.from_numpy(images))
        _, every = net(torch.from_numpy(images), prime=False)
    variables = interop.from_torch({"state_dict": net.state_dict()}, _name(ratio), 10)
    model = models.get_model(_name(ratio), 10)
    run = jax.jit(lambda v, x: model.apply(v, x, mutable=[models.FEATURES]))
    ours, mutated = run(variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
    sown = mutated[models.FEATURES]
    np.testing.assert_allclose(ours, logits.numpy(), atol=1e-4, rtol=1e-4)
    groups = model.feature_groups()
    assert len(groups) == len(prime)
    for group, theirs in zip(groups, prime, strict=True):  # Their prime_idx maps: group ends.
        np.testing.assert_allclose(sown[group[-1]][0], _nhwc(theirs), atol=1e-4, rtol=1e-4)
    names = [n for group in groups for n in group]  # Every unit's output (prime=False).
    for name, theirs in zip(names, every, strict=True):
        np.testing.assert_allclose(sown[name][0], _nhwc(theirs), atol=1e-4, rtol=1e-4)


def test_export_round_trip_is_exact_and_loads_strictly():
    net = randomised_net("0.5", seed=1)
    variables = interop.from_torch(net.state_dict(), "shufflenet_v2_0.5", 10)
    exported = interop.to_torch(variables, "shufflenet_v2_0.5", 10)
    fresh = TShuffleNetV2("0.5", 10)
    fresh.load_state_dict(exported, strict=True)
    for key, value in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    jax.tree.map(
        np.testing.assert_array_equal,
        interop.from_torch(exported, "shufflenet_v2_0.5", 10),
        variables,
    )


def test_wrong_width_names_the_tensor_and_the_model_it_looks_like():
    state = TShuffleNetV2("0.5", 7).state_dict()
    with pytest.raises(interop.InteropError, match=r"look like shufflenet_v2_0\.5 with 7 classes"):
        interop.from_torch(state, "shufflenet_v2_1.0", 10)
    with pytest.raises(interop.InteropError, match=r"key 'fc\.weight' has shape \(7, 1024\)"):
        interop.from_torch(state, "shufflenet_v2_0.5", 10)


def test_fresh_network_starts_as_theirs():
    """Their constructor never calls its `reset_parameters`: PyTorch's default init."""
    model = models.get_model("shufflenet_v2_1.0", 10)
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
    ours = interop.to_torch(variables, "shufflenet_v2_1.0", 10)
    torch.manual_seed(0)
    assert_starts_as(ours, TShuffleNetV2("1.0", 10).state_dict())
