"""A whole training step against the peers' PyTorch loop on the same weights and images: the
teacher's (cross-entropy) step of the paper's recipe — normalisation, a train-mode forward,
SGD with Nesterov momentum and coupled weight decay on every parameter (BN's too), BatchNorm's
running averages — equals `torch.optim.SGD` over two steps (the second uses the momentum)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfa_jax import bilevel
from dfa_jax import config_lib
from dfa_jax import inputs
from dfa_jax import interop
from dfa_jax import optimizers
from dfa_jax import teacher
from dfa_jax.data import DATASETS
from test_interop import torch_wrn

torch = pytest.importorskip("torch")


def _torch_logits(net, x):
    """The WRN's forward, each BN applied once (the test helper's forward also re-reads the
    group ends' BNs for features, which in train mode would move their statistics twice)."""
    out = net.block3(net.block2(net.block1(net.conv1(x))))
    return net.fc(torch.relu(net.bn1(out)).mean(dim=(2, 3)))


def test_two_teacher_steps_equal_pytorchs_sgd():
    info = DATASETS["cifar10"]
    config = config_lib.base_config()  # The paper's recipe: SGD 0.1, Nesterov, wd 5e-4.
    optim = config.teacher.optim
    assert (optim.lr, optim.momentum, optim.nesterov, optim.weight_decay) == (0.1, 0.9, True, 5e-4)
    config.data.pad, config.data.flip = 0, False  # No augmentation: the same images both sides.
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
            "label": rng.integers(0, 10, 8).astype(np.int32),
        }
        for _ in range(2)
    ]

    net = torch_wrn(10, 1, 10, seed=3).train()
    variables = interop.from_torch({"model": net.state_dict()}, "wrn_10_1", 10)
    model = teacher.build_model("wrn_10_1", 10, "float32")
    tx = optimizers.sgd(optim, steps_per_epoch=100)
    state = bilevel.create_state(variables["params"], variables["batch_stats"], tx)
    step = jax.jit(
        bilevel.make_bilevel_step(
            teacher.cross_entropy_loss_fn(model),
            tx,
            seed=0,
            preprocess_fn=inputs.make_train_preprocess(config.data, info),
        )
    )
    losses = []
    for batch in batches:
        state, metrics = step(state, jax.tree.map(jnp.asarray, batch), None, None)
        losses.append(float(metrics["loss"]))

    sgd = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    torch_losses = []
    for batch in batches:
        x = (torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).float() / 255 - mean) / std
        loss = torch.nn.functional.cross_entropy(
            _torch_logits(net, x), torch.from_numpy(batch["label"]).long()
        )
        sgd.zero_grad()
        loss.backward()
        sgd.step()
        torch_losses.append(float(loss.detach()))

    np.testing.assert_allclose(losses, torch_losses, rtol=1e-5)
    theirs = interop.from_torch({"model": net.state_dict()}, "wrn_10_1", 10)
    for ours, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(theirs["params"])):
        np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-4, atol=2e-6)
    stats, want_stats = state.batch_stats, theirs["batch_stats"]
    for path, ours in jax.tree_util.tree_leaves_with_path(stats):
        want = want_stats
        for key in path:
            want = want[key.key]
        # The running variance takes PyTorch's unbiased batch variance there, the biased one
        # here (docs/design.md): n / (n - 1) apart, n = 8 x 8 x 8 = 512 rows at the last group.
        rtol = 3e-3 if path[-1].key == "var" else 1e-4
        np.testing.assert_allclose(np.asarray(ours), want, rtol=rtol, atol=1e-5, err_msg=str(path))
