"""PyTorch <-> Flax Wide ResNets: a ported PyTorch WRN gives the same logits and group-end
pre-ReLU features, round trips are exact, a wrong architecture or an unsafe file fails with a
message naming the problem, and the command line writes what the pipeline loads."""

import argparse
import errno
import functools
import json
import os
import re
import struct
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from dfa_jax import (
    bilevel,
    checkpointing,
    config_lib,
    errors,
    evaluation,
    files,
    inputs,
    interop,
    models,
    parallel,
    safetensors_io,
    teacher,
    workdir,
)
from dfa_jax.data import augment, loader, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# wrn_10_1: block1.layer.0 keeps 16 channels (identity shortcut, no convShortcut); wrn_16_2:
# block1.layer.0 widens 16 -> 32 at stride 1 (a convShortcut), two blocks per group.
ARCHITECTURES = [(10, 1, 10), (16, 2, 7)]


class Arbitrary:
    """Not a tensor or a plain container: weights_only loading must refuse to build it."""


# --------------------------------------------------------------------------- PyTorch reference


def torch_wrn(depth, width, num_classes, seed=0):
    """The PyTorch pre-activation WRN (WideResNet-pytorch / RepDistiller / overhaul layout) in
    eval mode, with random weights, BN affine parameters and BN running statistics."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class BasicBlock(nn.Module):
        def __init__(self, in_planes, out_planes, stride):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(in_planes)
            self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(out_planes)
            self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
            # As in the reference: projection iff the channel count changes (never on stride
            # alone), and it reads relu(bn1(x)), not x.
            self.equalInOut = in_planes == out_planes
            self.convShortcut = (
                None
                if self.equalInOut
                else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
            )

        def forward(self, x):
            act = torch.relu(self.bn1(x))
            out = self.conv2(torch.relu(self.bn2(self.conv1(act))))
            return out + (x if self.equalInOut else self.convShortcut(act))

    class NetworkBlock(nn.Module):
        def __init__(self, n, in_planes, out_planes, stride):
            super().__init__()
            self.layer = nn.Sequential(
                *[
                    BasicBlock(
                        in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1
                    )
                    for i in range(n)
                ]
            )

        def forward(self, x):
            return self.layer(x)

    class WideResNet(nn.Module):
        def __init__(self):
            super().__init__()
            n = (depth - 4) // 6
            channels = [16, 16 * width, 32 * width, 64 * width]
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
            self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
            self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
            self.bn1 = nn.BatchNorm2d(channels[3])
            self.fc = nn.Linear(channels[3], num_classes)

        def forward(self, x):
            """x [B, 3, 32, 32] -> (logits [B, classes], the 3 group-end pre-ReLU maps, NCHW)."""
            f1 = self.block1(self.conv1(x))
            f2 = self.block2(f1)
            f3 = self.block3(f2)
            pre3 = self.bn1(f3)
            logits = self.fc(torch.relu(pre3).mean(dim=(2, 3)))
            # The pre-ReLU feature of a group is the output of the BN that consumes it.
            return logits, [self.block2.layer[0].bn1(f1), self.block3.layer[0].bn1(f2), pre3]

    torch.manual_seed(seed)
    net = WideResNet()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(123)
    return net.eval()


def flax_forward(depth, width, num_classes, variables, images_nchw):
    """(logits, the 3 group-end sown features as NCHW numpy) of the Flax WRN in eval mode."""
    model = models.get_model(f"wrn_{depth}_{width}", num_classes)
    apply = jax.jit(functools.partial(model.apply, train=False, mutable=[models.FEATURES]))
    logits, mutated = apply(variables, np.transpose(images_nchw, (0, 2, 3, 1)))
    feats = [mutated[models.FEATURES][group[-1]][0] for group in model.feature_groups()]
    return np.asarray(logits), [np.transpose(np.asarray(f), (0, 3, 1, 2)) for f in feats]


def abstract_variables(model):
    """Shapes and dtypes of exactly what `teacher.init_variables` builds (nothing computed)."""
    return jax.eval_shape(lambda: teacher.init_variables(model, 0, parallel.make_mesh()))


def random_flax_variables(depth, width, num_classes, seed=0):
    """Flax WRN variables in the project's tree with every leaf (BN statistics included) random."""
    model = models.get_model(f"wrn_{depth}_{width}", num_classes)
    leaves, tree = jax.tree.flatten(abstract_variables(model))
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        tree, [rng.uniform(0.5, 1.5, x.shape).astype(np.float32) for x in leaves]
    )


def numpy_state_dict(state):
    return {k: np.asarray(v) for k, v in state.items()}


# ------------------------------------------------------------------------------------ numerics


@pytest.mark.parametrize("depth, width, num_classes", ARCHITECTURES)
def test_ported_wrn_matches_pytorch_logits_and_pre_relu_features(depth, width, num_classes):
    torch = pytest.importorskip("torch")
    net = torch_wrn(depth, width, num_classes)
    images = np.random.default_rng(1).normal(size=(4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want_logits, want_feats = net(torch.from_numpy(images))

    variables = interop.wrn_from_torch(net.state_dict(), depth, width, num_classes)
    # The exact tree the project builds and loads.
    reference = abstract_variables(models.get_model(f"wrn_{depth}_{width}", num_classes))
    assert jax.tree.structure(variables) == jax.tree.structure(reference)
    for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(reference)):
        assert got.shape == want.shape and got.dtype == np.float32

    logits, feats = flax_forward(depth, width, num_classes, variables, images)
    assert np.abs(want_logits.numpy()).max() > 0.1  # not a trivially small comparison
    np.testing.assert_allclose(logits, want_logits.numpy(), rtol=1e-4, atol=1e-4)
    assert len(feats) == 3
    for got, want in zip(feats, want_feats):
        assert got.shape == tuple(want.shape)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("depth, width, num_classes", ARCHITECTURES)
def test_torch_to_flax_to_torch_is_bitwise_and_loads_strictly(depth, width, num_classes):
    torch = pytest.importorskip("torch")
    net = torch_wrn(depth, width, num_classes, seed=3)
    original = net.state_dict()
    exported = interop.wrn_to_torch(
        interop.wrn_from_torch(original, depth, width, num_classes), depth, width, num_classes
    )
    assert list(exported) == list(original)  # same keys, in PyTorch's module order
    for key, value in original.items():
        if key.endswith("num_batches_tracked"):
            assert exported[key].dtype == torch.int64 and int(exported[key]) == 0
        else:
            assert exported[key].dtype == torch.float32
            assert torch.equal(exported[key], value), key
    fresh = torch_wrn(depth, width, num_classes, seed=4)
    fresh.load_state_dict(exported, strict=True)


@pytest.mark.parametrize("depth, width, num_classes", ARCHITECTURES)
def test_flax_to_torch_to_flax_is_bitwise_identity(depth, width, num_classes):
    variables = random_flax_variables(depth, width, num_classes)
    state = numpy_state_dict(interop.wrn_to_torch(variables, depth, width, num_classes))
    back = interop.wrn_from_torch(state, depth, width, num_classes)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(variables)):
        assert got.dtype == np.float32 and np.array_equal(got, np.asarray(want))
    conv = "block2.layer.0.conv1.weight"  # OIHW <-> HWIO, not merely the same bytes
    np.testing.assert_array_equal(
        state[conv],
        np.transpose(variables["params"]["block2_layer0"]["conv1"]["kernel"], (3, 2, 0, 1)),
    )
    np.testing.assert_array_equal(state["fc.weight"], variables["params"]["fc"]["kernel"].T)


# ------------------------------------------------------------------------------ layout checks


def test_wrong_width_names_the_first_bad_key_its_shape_and_the_expected_one():
    state = numpy_state_dict(interop.wrn_to_torch(random_flax_variables(16, 2, 10), 16, 2, 10))
    with pytest.raises(interop.InteropError) as info:
        interop.wrn_from_torch(state, 16, 1, 10)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    # conv1.weight and block1.layer.0.bn1.* (16 channels) fit; the first widened conv does not.
    first = "key 'block1.layer.0.conv1.weight' has shape (32, 16, 3, 3), expected (16, 16, 3, 3)"
    assert first in message
    assert message.index(first) < message.index("block1.layer.0.bn2")
    assert "wrn_16_1 with 10 classes" in message
    assert "look like wrn_16_2 with 10 classes" in message


def test_wrong_depth_missing_and_unexpected_keys_are_named():
    state = numpy_state_dict(interop.wrn_to_torch(random_flax_variables(16, 1, 10), 16, 1, 10))
    with pytest.raises(
        interop.InteropError, match=r"unexpected key 'block1\.layer\.1\.bn1\.weight'"
    ):
        interop.wrn_from_torch(state, 10, 1, 10)
    with pytest.raises(
        interop.InteropError, match=r"key 'fc\.weight' has shape \(10, 64\), expected \(100, 64\)"
    ):
        interop.wrn_from_torch(state, 16, 1, 100)
    del state["fc.bias"]
    with pytest.raises(
        interop.InteropError, match=r"missing key 'fc\.bias', expected shape \(10,\)"
    ):
        interop.wrn_from_torch(state, 16, 1, 10)


def test_flax_variables_of_another_model_are_named_in_model_order():
    variables = random_flax_variables(16, 1, 10)
    with pytest.raises(interop.InteropError) as info:
        interop.wrn_to_torch(variables, 16, 2, 10)
    message = str(info.value)
    # Not the alphabetically first leaf (batch_stats/...): the network's first mismatching conv.
    assert message.index(
        "'params/block1_layer0/conv1/kernel' has shape (3, 3, 16, 16), expected (3, 3, 16, 32)"
    ) < message.index("batch_stats")
    assert "look like wrn_16_1 with 10 classes" in message


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {"state_dict": sd, "epoch": 7},
        lambda sd: {"model": sd, "best_acc": np.float32(0.5), "optimizer": {"state": {}}},
        lambda sd: {"net": sd},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        # A trainer's checkpoint with its model's options beside the weights: 'state_dict' is
        # tried before 'model' (NESTED_KEYS' order).
        lambda sd: {"model": {"arch": "wrn_10_1", "depth": 10}, "state_dict": sd},
    ],
    ids=["state_dict", "model", "net", "module.", "state_dict+module.", "state_dict+model_options"],
)
def test_nested_and_data_parallel_state_dicts_load(wrap):
    variables = random_flax_variables(10, 1, 10)
    state = numpy_state_dict(interop.wrn_to_torch(variables, 10, 1, 10))
    loaded = interop.wrn_from_torch(wrap(state), 10, 1, 10)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
        assert np.array_equal(got, np.asarray(want))


def test_non_wrn_model_names_are_refused():
    for name in ("shufflenet_v2_1.0", "wrn_12_1", "resnet56"):
        with pytest.raises(interop.InteropError, match="only Wide ResNets"):
            interop.parse_model_name(name)
    assert interop.parse_model_name("wrn_28_4") == (28, 4)


# ------------------------------------------------------------------------------ optional torch


def test_importing_interop_does_not_import_torch():
    code = "import sys, dfa_jax.interop; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_without_torch_loading_names_the_extra_and_export_gives_numpy(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    pth = tmp_path / "t.pth"
    pth.write_bytes(b"PK\x03\x04" + bytes(60))  # Starts like torch.save's zip archive.
    with pytest.raises(ImportError, match=r"pip install 'dfa_jax\[torch\]'"):
        interop.load_torch_file(str(pth))
    state = interop.wrn_to_torch(random_flax_variables(10, 1, 10), 10, 1, 10)
    assert all(isinstance(v, np.ndarray) for v in state.values())
    assert state["bn1.num_batches_tracked"].dtype == np.int64
    with pytest.raises(SystemExit, match=r"error: .*dfa_jax\[torch\]"):
        interop.main(
            ["import", "--model", "wrn_10_1", "--num-classes", "10", str(pth), str(tmp_path / "o")]
        )


# ----------------------------------------------------------------------------------- files, CLI


def test_weights_only_refuses_a_pickle_holding_an_arbitrary_object(tmp_path):
    torch = pytest.importorskip("torch")
    path = str(tmp_path / "unsafe.pth")
    torch.save({"model": torch_wrn(10, 1, 10).state_dict(), "extra": Arbitrary()}, path)
    with pytest.raises(interop.InteropError, match="weights_only=True"):
        interop.load_torch_file(path)
    with pytest.raises(SystemExit, match=r"^error: .*unsafe\.pth holds objects other than tensors"):
        interop.main(
            ["import", "--model", "wrn_10_1", "--num-classes", "10", path, str(tmp_path / "o")]
        )
    assert not os.path.exists(tmp_path / "o")


def _eval_data(images_nhwc_uint8, labels):
    examples = loader.ArrayExamples(images_nhwc_uint8, labels)
    return inputs.RunData(info=sources.DATASETS["cifar10"], train=examples, test=examples)


def test_cli_import_writes_teacher_variables_that_evaluate_like_pytorch(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    net = torch_wrn(16, 2, 10, seed=5)
    pth = str(tmp_path / "teacher.pth")
    torch.save({"model": net.state_dict(), "epoch": 200}, pth)  # overhaul / RepDistiller style
    out = str(tmp_path / "imported")
    assert interop.main(["import", "--model", "wrn_16_2", "--num-classes", "10", pth, out]) == 0
    assert f"--config.teacher.checkpoint={out}" in capsys.readouterr().out

    mesh = parallel.make_mesh()
    model = teacher.build_model("wrn_16_2", 10, "float32")
    variables = teacher.load_variables(out, model, mesh)

    # 60 CIFAR-sized uint8 images through the project's evaluation (its normalisation, padded
    # last batch) and through PyTorch with the same normalisation.
    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, size=(60, 32, 32, 3), dtype=np.uint8)
    info = sources.DATASETS["cifar10"]
    normalised = np.asarray(augment.normalize(images, info.mean, info.std))
    with torch.no_grad():
        logits, _ = net(torch.from_numpy(normalised.transpose(0, 3, 1, 2).copy()))
    predictions = logits.argmax(-1).numpy()
    # Half the labels are PyTorch's predictions, so the accuracy compared is far from chance.
    labels = np.where(np.arange(60) < 30, predictions, rng.integers(0, 10, size=60))
    want_accuracy = float(np.mean(predictions == labels))
    want_loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)))

    config = config_lib.base_config()
    config.data.eval_batch_size = 16
    result = evaluation.make_model_eval_fn(model, config, _eval_data(images, labels), mesh)(
        variables
    )
    assert round(result["accuracy"] * 60) == round(want_accuracy * 60)  # the same predictions
    assert want_accuracy > 0.5
    assert result["loss"] == pytest.approx(want_loss, rel=1e-4, abs=1e-4)

    # Not overwritten by accident.
    with pytest.raises(SystemExit, match="exists; pass --force"):
        interop.main(["import", "--model", "wrn_16_2", "--num-classes", "10", pth, out])


def test_cli_export_of_a_workdir_teacher_and_a_distilled_student(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    workdir = tmp_path / "run"
    teacher_vars = random_flax_variables(16, 2, 10, seed=7)
    teacher.save_variables(str(workdir / "teacher" / teacher.VARIABLES_DIR), teacher_vars)

    # A distill stage as the shared loop leaves it: orbax checkpoints of the bilevel TrainState,
    # whose params hold the student beside its connectors, and result.json once done.
    student_vars = random_flax_variables(10, 1, 10, seed=8)
    stage = workdir / "distill" / "dfa"
    connectors = {"g1": {"conv": {"kernel": np.ones((1, 1, 16, 32), np.float32)}}}
    state = bilevel.create_state(
        {"student": student_vars["params"], "st": connectors},
        {"student": student_vars["batch_stats"], "st": {}},
        optax.sgd(0.1, momentum=0.9),
    )
    ckpt = checkpointing.Checkpointer(str(stage / "checkpoints"), keep=2)
    older = jax.tree.map(lambda x: x * 0, state)
    ckpt.save(3, older, {"step": 3})
    ckpt.save(6, state, {"step": 6})
    ckpt.close()
    (stage / "result.json").write_text(json.dumps({"stage": "distill/dfa"}))

    cases = [
        (str(workdir), "wrn_16_2", teacher_vars, torch_wrn(16, 2, 10)),
        (str(stage), "wrn_10_1", student_vars, torch_wrn(10, 1, 10)),
    ]
    for source, name, want, net in cases:
        out = str(tmp_path / f"{name}.pth")
        assert interop.main(["export", "--model", name, "--num-classes", "10", source, out]) == 0
        net.load_state_dict(torch.load(out, weights_only=True), strict=True)
        depth, width = interop.parse_model_name(name)
        back = interop.wrn_from_torch(net.state_dict(), depth, width, 10)
        for got, ref in zip(jax.tree.leaves(back), jax.tree.leaves(want)):
            assert np.array_equal(got, np.asarray(ref))  # the latest checkpoint, not step 3
    assert "(the student)" in capsys.readouterr().out

    # A workdir without teacher variables points at its students.
    (workdir / "teacher" / teacher.VARIABLES_DIR).rename(workdir / "teacher" / "moved")
    with pytest.raises(SystemExit, match=r"holds neither teacher variables.*distill/dfa"):
        interop.main(
            [
                "export",
                "--model",
                "wrn_16_2",
                "--num-classes",
                "10",
                str(workdir),
                str(tmp_path / "x.pth"),
            ]
        )


def _cli_import(source, out) -> subprocess.CompletedProcess:
    """`python -m dfa_jax.interop import --model wrn_10_1 --num-classes 10 SOURCE OUT`, as a
    user's shell runs it (what reaches stderr, and the exit code)."""
    command = [sys.executable, "-m", "dfa_jax.interop", "import", "--model", "wrn_10_1"]
    command += ["--num-classes", "10", str(source), str(out)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    pytest.importorskip("torch")
    run = _cli_import(tmp_path / "missing.pth", tmp_path / "out")
    assert run.returncode == 1
    assert "error: " in run.stderr and "missing.pth: no such file" in run.stderr
    assert "Traceback" not in run.stderr
    with pytest.raises(SystemExit, match="error: model 'resnet_50' cannot be converted"):
        interop.main(["export", "--model", "resnet_50", "--num-classes", "10", "a", "b.pth"])
    with pytest.raises(SystemExit) as info:
        interop.main(["--help"])
    assert info.value.code == 0


# ---------------------------------------------------------------------------------- safetensors


def test_safetensors_files_are_the_reference_librarys(tmp_path):
    """Ours load with huggingface's safetensors and its files load here: every dtype, scalars,
    empty tensors and metadata; a damaged file is a named error."""
    st_numpy = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.normal(size=(3, 4, 1, 2)).astype(np.float32),
        "h": rng.normal(size=(5,)).astype(np.float16),
        "d": rng.normal(size=(2, 2)),
        "n": np.zeros((), np.int64),
        "i": rng.integers(-5, 5, (7,)).astype(np.int32),
        "b": np.array([True, False]),
        "u": rng.integers(0, 255, (2, 3), dtype=np.uint8),
        "e": np.zeros((0, 3), np.float32),
    }
    ours = str(tmp_path / "ours.safetensors")
    safetensors_io.save(ours, arrays, {"format": "pt"})
    theirs = st_numpy.load_file(ours)
    assert theirs.keys() == arrays.keys()
    for name, value in arrays.items():
        assert theirs[name].dtype == value.dtype and np.array_equal(theirs[name], value), name

    reference = str(tmp_path / "theirs.safetensors")
    st_numpy.save_file(arrays, reference, metadata={"who": "reference"})
    back, metadata = safetensors_io.load(reference)
    assert metadata == {"who": "reference"}
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value), name

    with open(ours, "rb") as f:
        blob = f.read()
    with open(ours, "wb") as f:
        f.write(blob[: len(blob) - 4])  # A truncated buffer.
    with pytest.raises(safetensors_io.SafetensorsError, match="data_offsets"):
        safetensors_io.load(ours)


_SAFETENSORS_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` raises ImportError: a JAX-only install.
from dfa_jax import interop
for argv in (["export", "--model", "wrn_10_1", "--num-classes", "10", sys.argv[1], sys.argv[2]],
             ["import", "--model", "wrn_10_1", "--num-classes", "10", sys.argv[2], sys.argv[3]]):
    assert interop.main(argv) == 0
"""


def test_a_student_leaves_and_enters_as_safetensors_without_pytorch(tmp_path):
    """Export a student's variables to .safetensors and import them back, PyTorch not
    importable: the same arrays; the file loads into PyTorch's WRN with strict=True."""
    student_vars = random_flax_variables(10, 1, 10, seed=9)
    stage = tmp_path / "run" / "distill" / "dfa" / "seed1"  # A cohort's student exports here.
    teacher.save_variables(str(stage / teacher.VARIABLES_DIR), student_vars)
    out, back = str(tmp_path / "s.safetensors"), str(tmp_path / "back")
    subprocess.run(
        [sys.executable, "-c", _SAFETENSORS_WITHOUT_TORCH, str(stage), out, back],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    restored = teacher.load_variables(
        back, teacher.build_model("wrn_10_1", 10, "float32"), parallel.make_mesh()
    )
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(student_vars)):
        assert np.array_equal(np.asarray(got), np.asarray(want))
    st_torch = pytest.importorskip("safetensors.torch")
    torch_wrn(10, 1, 10).load_state_dict(st_torch.load_file(out), strict=True)


# ------------------------------------------------------------------------- files that are not


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    """A safetensors file built by hand: the header length, the JSON header, the buffer."""
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + data


_LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    b"size 23515011\n"
)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("teacher.pth", _LFS_POINTER, r"is a Git LFS pointer, not the checkpoint: .*git lfs pull"),
        (
            "model.safetensors",
            _LFS_POINTER,
            r"is a Git LFS pointer, not the tensors: .*git lfs pull",
        ),
        ("bytes.pth", b"hello world not a checkpoint", r"is not a PyTorch checkpoint .*b'hello"),
        ("page.pth", b"<!DOCTYPE html><html>404</html>", r"is not a PyTorch checkpoint"),
        ("empty.pth", b"", r"is empty: copy or download the checkpoint again"),
        (
            "weights.pth",
            _safetensors_bytes(
                {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4
            ),
            r"is a safetensors file: give it the \.safetensors suffix",
        ),
        (
            "cut.pth",
            b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P",
            r"not a readable PyTorch file .*EOFError",
        ),
    ],
    ids=["lfs", "lfs-safetensors", "bytes", "html", "empty", "safetensors-as-pth", "cut-pickle"],
)
def test_a_file_that_is_no_checkpoint_is_named_with_its_fix(tmp_path, name, content, expected):
    """One `error:` line naming the file and what it is, never the advice to unpickle it fully
    (unsafe, and useless for these) and never a traceback."""
    pytest.importorskip("torch")
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SystemExit) as info:
        interop.main(
            ["import", "--model", "wrn_10_1", "--num-classes", "10", str(path), str(tmp_path / "o")]
        )
    message = str(info.value.code)
    assert message.startswith(f"error: {path} ")
    assert re.search(expected, message), message
    assert "save its weights alone" not in message and "\n" not in message
    assert not os.path.exists(tmp_path / "o")


def test_a_weights_only_refusal_names_the_refused_object(tmp_path):
    """torch's message opens with general advice (with terminal escapes); the line that says what
    the file holds is the one shown."""
    torch = pytest.importorskip("torch")
    path = str(tmp_path / "unsafe.pth")
    torch.save({"model": torch_wrn(10, 1, 10).state_dict(), "extra": Arbitrary()}, path)
    with pytest.raises(interop.InteropError) as info:
        interop.load_torch_file(path)
    message = str(info.value)
    assert "holds objects other than tensors" in message and "save its weights alone" in message
    assert "Unsupported global" in message and "Arbitrary" in message
    assert "\x1b" not in message and "\n" not in message


# torch warns of any protocol but its default (2) as it reads one.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("zip_format", [True, False])
@pytest.mark.parametrize("protocol, named", [(4, "4"), (5, "5"), (0, "0 or 1")])
def test_a_checkpoint_of_a_pickle_protocol_weights_only_cannot_read_says_so(
    tmp_path, zip_format, protocol, named
):
    """torch.load(weights_only=True) reads pickle protocols 2 and 3 only: a valid file saved
    with another is named with its protocol and how to save it again, not called damaged; one
    of protocol 2 loads."""
    torch = pytest.importorskip("torch")
    state = torch_wrn(10, 1, 10).state_dict()
    path = str(tmp_path / "teacher.pth")
    torch.save(state, path, pickle_protocol=protocol, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(interop.InteropError) as info:
        interop.load_torch_file(path)
    message = str(info.value)
    assert f"saved with pickle protocol {named}," in message and "torch.save(" in message
    assert "damaged" not in message
    torch.save(state, path, pickle_protocol=2, _use_new_zipfile_serialization=zip_format)
    assert set(interop.load_torch_file(path)) == set(state)


def test_a_cli_import_of_arbitrary_bytes_prints_no_traceback(tmp_path):
    pytest.importorskip("torch")
    path = tmp_path / "teacher.pth"
    path.write_bytes(b"hello world not a checkpoint")
    run = _cli_import(path, tmp_path / "out")
    assert run.returncode == 1
    assert run.stderr.startswith(f"error: {path} is not a PyTorch checkpoint"), run.stderr
    assert "Traceback" not in run.stderr


# ----------------------------------------------------------------------------- safetensors BF16


def test_bf16_safetensors_tensors_load_as_bfloat16(tmp_path):
    """bfloat16 is the top 16 bits of float32: 1.5 and -2.0 are exact in it."""
    path = tmp_path / "bf16.safetensors"
    data = (np.float32([1.5, -2.0]).view(np.uint32) >> 16).astype("<u2").tobytes()
    header = {"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}
    path.write_bytes(_safetensors_bytes(header, data))
    arrays, _ = safetensors_io.load(str(path))
    assert arrays["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(arrays["w"].astype(np.float32), [1.5, -2.0])


def test_safetensors_io_stays_numpy_only_with_bf16():
    """ml_dtypes gives NumPy bfloat16 without importing JAX (or PyTorch)."""
    code = "import sys, dfa_jax.safetensors_io; print(sorted({'jax', 'torch'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_an_unsupported_safetensors_dtype_is_named_with_its_tensor(tmp_path):
    path = tmp_path / "f4.safetensors"
    header = {
        "ok": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "packed": {"dtype": "F4", "shape": [2], "data_offsets": [4, 5]},
    }
    path.write_bytes(_safetensors_bytes(header, bytes(5)))
    with pytest.raises(safetensors_io.SafetensorsError) as info:
        safetensors_io.load(str(path))
    message = str(info.value)
    assert "tensor 'packed' has dtype 'F4', which is not supported here" in message
    assert "BF16" in message  # the supported names
    assert "is not a safetensors file" not in message


def test_torch_bf16_weights_import_from_safetensors(tmp_path):
    """bf16 tensors saved by PyTorch's safetensors, and by this module's writer from the same
    bytes, import as their float32 values; the reference reader reads ours as bf16 again."""
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    state = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v
        for k, v in torch_wrn(10, 1, 10, seed=11).state_dict().items()
    }
    theirs, ours = str(tmp_path / "theirs.safetensors"), str(tmp_path / "ours.safetensors")
    st_torch.save_file(state, theirs)
    safetensors_io.save(
        ours,
        {
            k: v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            if v.dtype == torch.bfloat16
            else v.numpy()
            for k, v in state.items()
        },
        {"format": "pt"},
    )
    back = st_torch.load_file(ours)
    assert all(back[k].dtype == v.dtype and torch.equal(back[k], v) for k, v in state.items())

    want = interop.from_torch({k: v.float() for k, v in state.items()}, "wrn_10_1", 10)
    for path in (theirs, ours):
        out = str(tmp_path / f"imported_{os.path.basename(path)}")
        assert (
            interop.main(["import", "--model", "wrn_10_1", "--num-classes", "10", path, out]) == 0
        )
        got = teacher.load_variables(
            out, teacher.build_model("wrn_10_1", 10, "float32"), parallel.make_mesh()
        )
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert np.array_equal(np.asarray(a), b)


def test_a_bf16_or_half_pytorch_state_dict_imports_as_its_float32_values():
    """A state_dict of a network cast with .bfloat16() or .half() in PyTorch (numpy has no
    bfloat16) imports as float32 arrays equal to the tensors' values, each leaf as NumPy
    computes it from the float32 copy (conv OIHW -> HWIO)."""
    torch = pytest.importorskip("torch")
    net = torch_wrn(10, 1, 10, seed=12)
    for dtype in (torch.bfloat16, torch.float16):
        state = {
            k: v.to(dtype) if v.is_floating_point() else v for k, v in net.state_dict().items()
        }
        got = interop.from_torch(state, "wrn_10_1", 10)
        conv = got["params"]["block2_layer0"]["conv1"]["kernel"]
        assert conv.dtype == np.float32
        want = state["block2.layer.0.conv1.weight"].float().numpy().transpose(2, 3, 1, 0)
        np.testing.assert_array_equal(conv, want)
        np.testing.assert_array_equal(
            got["batch_stats"]["bn1"]["var"], state["bn1.running_var"].float().numpy()
        )


# ------------------------------------------------------------------- which teacher is exported


def _export_to_arrays(tmp_path, source, *flags, name="wrn_10_1"):
    """`export` of `source` to .safetensors, read back as Flax variables."""
    out = tmp_path / "exported.safetensors"
    argv = ["export", "--model", name, "--num-classes", "10", "--force", *flags, str(source)]
    assert interop.main([*argv, str(out)]) == 0
    return interop.from_torch(safetensors_io.load(str(out))[0], name, 10)


def _assert_same(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _teacher_workdir(root, distill_from, **teacher_fields):
    """A workdir as a finished teacher stage leaves it: both variable directories, holding
    different values, and the config.json of the run."""
    last, best = (
        random_flax_variables(10, 1, 10, seed=21),
        random_flax_variables(10, 1, 10, seed=22),
    )
    teacher.save_variables(str(root / "teacher" / teacher.VARIABLES_DIR), last)
    teacher.save_variables(str(root / "teacher" / teacher.BEST_VARIABLES_DIR), best)
    config = config_lib.base_config()
    config.teacher.distill_from = distill_from
    for field, value in teacher_fields.items():
        config.teacher[field] = value
    files.write_json_atomic(str(root / workdir.CONFIG_FILE), config.to_dict())
    return last, best


def test_export_of_a_workdir_takes_the_teacher_the_run_distilled_from(tmp_path, capsys):
    run = tmp_path / "run"
    last, best = _teacher_workdir(run, "best")

    _assert_same(_export_to_arrays(tmp_path, run), best)
    printed = capsys.readouterr().out
    assert (
        f"from variables {run / 'teacher' / teacher.BEST_VARIABLES_DIR} (the best epoch's"
        in printed
    )
    assert "teacher.distill_from = 'best'" in printed
    _assert_same(_export_to_arrays(tmp_path, run / "teacher"), best)  # its teacher stage too

    _assert_same(_export_to_arrays(tmp_path, run, "--last"), last)
    assert "(the last epoch's, as --last asks)" in capsys.readouterr().out

    config = files.read_json(str(run / workdir.CONFIG_FILE))
    config["teacher"]["distill_from"] = "last"
    files.write_json_atomic(str(run / workdir.CONFIG_FILE), config)
    _assert_same(_export_to_arrays(tmp_path, run), last)
    _assert_same(_export_to_arrays(tmp_path, run, "--best"), best)
    del config["teacher"]["distill_from"]  # A run from before the field distilled from the last.
    files.write_json_atomic(str(run / workdir.CONFIG_FILE), config)
    _assert_same(_export_to_arrays(tmp_path, run), last)
    (run / workdir.CONFIG_FILE).unlink()
    _assert_same(_export_to_arrays(tmp_path, run), last)
    assert "no config.json records which one" in capsys.readouterr().out

    # A flag that cannot choose anything is refused rather than ignored.
    with pytest.raises(SystemExit, match=r"error: --best chooses between a teacher stage's"):
        _export_to_arrays(tmp_path, run / "teacher" / teacher.VARIABLES_DIR, "--best")
    with pytest.raises(SystemExit) as info:
        _export_to_arrays(tmp_path, run, "--best", "--last")
    assert info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_export_of_a_workdir_that_loaded_its_teacher_takes_that_teacher(tmp_path, capsys):
    trained = tmp_path / "trained"
    last, best = _teacher_workdir(trained, "best")
    run = tmp_path / "run"
    run.mkdir()
    config = config_lib.base_config()
    config.teacher.checkpoint = str(trained)
    files.write_json_atomic(str(run / workdir.CONFIG_FILE), config.to_dict())

    _assert_same(_export_to_arrays(tmp_path, run), best)
    assert f"the teacher the run loaded, teacher.checkpoint = {str(trained)!r}" in (
        capsys.readouterr().out
    )
    _assert_same(_export_to_arrays(tmp_path, run, "--last"), last)


# ------------------------------------------------------------------------------ key prefixes


def _wrn_state(depth=10, width=1, seed=0):
    variables = random_flax_variables(depth, width, 10, seed=seed)
    return variables, numpy_state_dict(interop.wrn_to_torch(variables, depth, width, 10))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: {f"_orig_mod.{k}": v for k, v in sd.items()},
        lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},
        lambda sd: {"model": {f"_orig_mod.module.{k}": v for k, v in sd.items()}},
    ],
    ids=["_orig_mod.", "module._orig_mod.", "model+_orig_mod.module."],
)
def test_torch_compile_prefix_is_stripped_like_data_parallels(wrap):
    variables, state = _wrn_state()
    _assert_same(interop.from_torch(wrap(state), "wrn_10_1", 10), variables)


def test_a_prefix_selects_one_network_of_a_distillers_checkpoint(tmp_path, capsys):
    """mdistiller's whole checkpoint: {'model': the DataParallel distiller's state_dict, holding
    'module.student.*' and 'module.teacher.*'}."""
    student, student_state = _wrn_state(10, 1, seed=31)
    teach, teacher_state = _wrn_state(16, 2, seed=32)
    checkpoint = {
        "epoch": 240,
        "model": {
            **{f"module.student.{k}": v for k, v in student_state.items()},
            **{f"module.teacher.{k}": v for k, v in teacher_state.items()},
        },
        "best_acc": 0.7,
    }
    for prefix in ("student.", "module.student.", "student"):
        _assert_same(interop.from_torch(checkpoint, "wrn_10_1", 10, prefix=prefix), student)
    _assert_same(interop.from_torch(checkpoint, "wrn_16_2", 10, prefix="teacher."), teach)

    with pytest.raises(interop.InteropError) as info:
        interop.from_torch(checkpoint, "wrn_10_1", 10)
    assert "The keys under 'student.', 'teacher.' start like the model's" in str(info.value)
    with pytest.raises(interop.InteropError, match=r"prefix 'stdent\.'.* 'student\.', 'teacher\.'"):
        interop.from_torch(checkpoint, "wrn_10_1", 10, prefix="stdent.")

    source = tmp_path / "checkpoint.safetensors"
    safetensors_io.save(str(source), {f"student.{k}": v for k, v in student_state.items()})
    out = str(tmp_path / "student")
    argv = ["import", "--model", "wrn_10_1", "--num-classes", "10", "--prefix", "student."]
    assert interop.main([*argv, str(source), out]) == 0
    restored = teacher.load_variables(
        out, teacher.build_model("wrn_10_1", 10, "float32"), parallel.make_mesh()
    )
    _assert_same(jax.tree.map(np.asarray, restored), student)


def test_keys_under_one_unknown_prefix_name_it_and_the_option(tmp_path):
    """A Lightning module's checkpoint keeps its network under its attribute ('model.')."""
    _, state = _wrn_state()
    lightning = {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}
    with pytest.raises(interop.InteropError) as info:
        interop.from_torch(lightning, "wrn_10_1", 10)
    message = str(info.value)
    assert "Every key starts with 'model.'" in message and "--prefix model." in message
    source = tmp_path / "lightning.safetensors"
    safetensors_io.save(str(source), lightning["state_dict"])
    argv = ["import", "--model", "wrn_10_1", "--num-classes", "10", str(source)]
    with pytest.raises(SystemExit, match=r"error: .*--prefix model\."):
        interop.main([*argv, str(tmp_path / "o")])
    assert interop.main(["import", "--prefix", "model.", *argv[1:], str(tmp_path / "o")]) == 0


# ------------------------------------------------------------------------ outputs never lost


def _import_argv(source, out, *flags, name="wrn_10_1"):
    return ["import", "--model", name, "--num-classes", "10", *flags, str(source), str(out)]


def _wrn_safetensors(path, seed):
    """A wrn_10_1's random variables, and the .safetensors at `path` holding them."""
    variables, state = _wrn_state(seed=seed)
    safetensors_io.save(str(path), state)
    return variables


def test_import_force_replaces_variables_but_never_another_directory(tmp_path):
    """A mistyped or swapped OUT (a workdir, a file) is refused and left whole; variables are
    replaced, and an empty directory is used."""
    source = tmp_path / "w.safetensors"
    _wrn_safetensors(source, seed=41)
    workdir_like = tmp_path / "run"
    (workdir_like / "teacher").mkdir(parents=True)
    (workdir_like / "config.json").write_text("{}")
    (workdir_like / "teacher" / "metrics.jsonl").write_text("x\n")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for out, what in (
        (workdir_like, "a directory holding config.json, teacher"),
        (a_file, "a file"),
    ):
        with pytest.raises(SystemExit) as info:
            interop.main(_import_argv(source, out, "--force"))
        message = str(info.value.code)
        assert message.startswith(f"error: {out} is {what}, not a variables directory"), message
        assert "_CHECKPOINT_METADATA" in message
    assert (workdir_like / "config.json").read_text() == "{}"
    assert (workdir_like / "teacher" / "metrics.jsonl").exists()
    assert a_file.read_text() == "keep me"

    model, mesh = teacher.build_model("wrn_10_1", 10, "float32"), parallel.make_mesh()
    out = tmp_path / "variables"
    out.mkdir()  # Empty: nothing to lose.
    assert interop.main(_import_argv(source, out, "--force")) == 0
    newer = _wrn_safetensors(source, seed=42)
    assert interop.main(_import_argv(source, out, "--force")) == 0
    _assert_same(jax.tree.map(np.asarray, teacher.load_variables(str(out), model, mesh)), newer)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "run", "variables", "w.safetensors"]


_FAILING_WRITES = """
import resource, signal, sys
import numpy as np
from dfa_jax import interop, teacher
directory, pth = sys.argv[1], sys.argv[2]
# Every write beyond 64 KiB fails (EFBIG), as on a full disk.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
# Random: orbax compresses, and ones would fit.
w = np.random.default_rng(0).random((512, 512), np.float32)
big = {"params": {"w": w}, "batch_stats": {}}
try:
    teacher.save_variables(directory, big)
    print("save_variables: saved")
except Exception as e:
    print("save_variables: failed", type(e).__name__)
argv = ["export", "--model", "wrn_10_1", "--num-classes", "10", "--force", directory, pth]
try:
    interop.main(argv)
except SystemExit as e:
    print("export:", e.code)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="a file size limit (RLIMIT_FSIZE) is POSIX")
def test_a_failed_overwrite_keeps_the_old_variables_and_the_old_export(tmp_path):
    """save_variables over existing variables, and an export over an existing .pth, failing
    midway (under a file size limit, the error a full disk gives) leave the old ones whole and
    no temporary files."""
    pytest.importorskip("torch")
    directory, pth = tmp_path / "vars", tmp_path / "student.pth"
    old = random_flax_variables(10, 1, 10, seed=43)  # About 300 KB, saved without the limit.
    teacher.save_variables(str(directory), old)
    pth.write_bytes(b"the old export")
    run = subprocess.run(
        [sys.executable, "-c", _FAILING_WRITES, str(directory), str(pth)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    # The named error of a full disk (main and interop print it as one line), not tensorstore's.
    assert "save_variables: failed WorkdirError" in run.stdout, run.stdout
    assert f"export: error: cannot write {pth}: " in run.stdout, run.stdout
    _assert_same(interop.read_dfa_variables(str(directory))[0], old)
    assert sorted(os.listdir(tmp_path)) == ["student.pth", "vars"]
    assert pth.read_bytes() == b"the old export"


def test_a_save_killed_between_its_renames_gets_the_old_variables_back(tmp_path, monkeypatch):
    """Killed after moving the old variables aside and before moving the new ones in: the next
    save starts by putting the old ones back under their name, not by deleting them (here that
    save fails too, so they must still be there)."""
    old = random_flax_variables(10, 1, 10, seed=43)
    teacher.save_variables(str(tmp_path / "vars"), old)
    os.rename(tmp_path / "vars", tmp_path / ".vars.replaced")
    (tmp_path / ".vars.saving").mkdir()  # The new ones, half written.

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", disk_full)
    with pytest.raises(errors.WorkdirError, match="No space left"):
        teacher.save_variables(str(tmp_path / "vars"), random_flax_variables(10, 1, 10, seed=44))
    _assert_same(interop.read_dfa_variables(str(tmp_path / "vars"))[0], old)
    assert sorted(os.listdir(tmp_path)) == ["vars"]


def test_a_failed_pth_export_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """torch.save failing midway (it reports a failed write as RuntimeError) writes to a
    temporary file only: the old export stays, the temporary file goes, one `error:` line."""
    torch = pytest.importorskip("torch")
    source = tmp_path / "vars"
    teacher.save_variables(str(source), random_flax_variables(10, 1, 10))
    out = tmp_path / "student.pth"
    out.write_bytes(b"the old export")

    def failing_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed")

    monkeypatch.setattr(torch, "save", failing_save)
    argv = ["export", "--model", "wrn_10_1", "--num-classes", "10", "--force", str(source)]
    with pytest.raises(SystemExit, match=rf"^error: cannot write {re.escape(str(out))}: "):
        interop.main([*argv, str(out)])
    assert out.read_bytes() == b"the old export"
    assert sorted(os.listdir(tmp_path)) == ["student.pth", "vars"]


def test_export_to_a_directory_or_a_missing_directory_is_refused_before_any_work(tmp_path):
    """The source does not even exist: the output is checked first."""
    missing_source = str(tmp_path / "no-such-run")
    argv = ["export", "--model", "wrn_10_1", "--num-classes", "10"]
    for flags in ([], ["--force"]):
        with pytest.raises(SystemExit) as info:
            interop.main([*argv, *flags, missing_source, str(tmp_path)])
        assert str(info.value.code).startswith(f"error: {tmp_path} is a directory: give the file")
    out = tmp_path / "nodir" / "s.pth"
    with pytest.raises(SystemExit) as info:
        interop.main([*argv, missing_source, str(out)])
    assert str(info.value.code) == (
        f"error: {out}: its directory {tmp_path / 'nodir'} does not exist; create it first"
    )
    assert os.listdir(tmp_path) == []


def test_safetensors_save_removes_its_temporary_file_when_it_fails(tmp_path):
    target = tmp_path / "taken"
    (target / "inside").mkdir(parents=True)  # The rename onto a non-empty directory fails.
    with pytest.raises(OSError):
        safetensors_io.save(str(target), {"w": np.zeros(3, np.float32)})
    assert os.listdir(tmp_path) == ["taken"]


def _export_argv(source, out, *flags):
    return ["export", "--model", "wrn_10_1", "--num-classes", "10", *flags, str(source), str(out)]


def test_export_of_a_multi_seed_stage_lists_its_seeds(tmp_path):
    stage = tmp_path / "run" / "distill" / "dfa"
    for seed in (10, 2):
        teacher.save_variables(str(stage / f"seed{seed}" / teacher.VARIABLES_DIR), _wrn_state()[0])
    with pytest.raises(SystemExit) as info:
        interop.main(_export_argv(stage, tmp_path / "s.safetensors"))
    assert str(info.value.code) == (
        f"error: {stage} is a stage of several seeds, one student in each: export one of"
        f" {stage / 'seed2'}, {stage / 'seed10'}"
    )
    _assert_same(_export_to_arrays(tmp_path, stage / "seed2"), _wrn_state()[0])


# ------------------------------------------------------------------------- what a file holds


def test_repdistillers_last_checkpoint_with_its_options_imports(tmp_path):
    """RepDistiller's `{model}_last.pth`: {'opt': the argparse.Namespace of its command line,
    'model': ..., 'optimizer': ...} (train_teacher.py; train_student.py without 'optimizer')."""
    torch = pytest.importorskip("torch")
    if not hasattr(torch.serialization, "safe_globals"):
        pytest.skip("torch < 2.4 cannot allow argparse.Namespace in weights_only loading")
    net = torch_wrn(10, 1, 10, seed=12)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    logits, _ = net(torch.zeros(2, 3, 32, 32))
    logits.sum().backward()
    optimizer.step()  # Momentum buffers in its state, as after training.
    opt = argparse.Namespace(
        model="wrn_10_1",
        learning_rate=0.05,
        lr_decay_epochs=[150, 180, 210],
        trial="0",
        path_t=None,
        save_folder="./save/models/wrn_10_1_cifar100_lr_0.05_decay_0.0005_trial_0",
    )
    path = str(tmp_path / "wrn_10_1_last.pth")
    torch.save({"opt": opt, "model": net.state_dict(), "optimizer": optimizer.state_dict()}, path)
    assert interop.load_torch_file(path)["opt"] == opt
    out = tmp_path / "teacher"
    assert interop.main(_import_argv(path, out)) == 0
    restored = teacher.load_variables(
        str(out), teacher.build_model("wrn_10_1", 10, "float32"), parallel.make_mesh()
    )
    _assert_same(
        jax.tree.map(np.asarray, restored), interop.from_torch(net.state_dict(), "wrn_10_1", 10)
    )


def test_an_npz_given_to_import_is_named_as_not_a_torch_save_file(tmp_path):
    path = tmp_path / "weights.npz"
    np.savez(path, a=np.zeros(3), b=np.ones(2))
    with pytest.raises(SystemExit) as info:
        interop.main(_import_argv(path, tmp_path / "o"))
    message = str(info.value.code)
    assert message.startswith(f"error: {path} is a zip archive that torch.save did not write")
    assert "a.npy, b.npy (a NumPy .npz?)" in message and ".safetensors" in message
    assert "damaged" not in message and "inline_container" not in message
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("name", ["teacher.pth", "model.safetensors", "best"])
def test_a_teacher_checkpoint_naming_a_pytorch_file_says_to_convert_it(tmp_path, name):
    """`--config.teacher.checkpoint=teacher.pth`: the command that converts it, with its flags
    (a file without a known suffix is recognised by its first bytes)."""
    path = tmp_path / name
    path.write_bytes(b"PK\x03\x04" + bytes(60))
    model = teacher.build_model("wrn_10_1", 10, "float32")
    with pytest.raises(errors.CheckpointError) as info:
        teacher.check_checkpoint(str(path), model)
    message = str(info.value)
    assert "is a PyTorch or safetensors checkpoint file, not dfa_jax teacher variables" in message
    assert f"python -m dfa_jax.interop import --model MODEL --num-classes N {path} OUT" in message
    assert "--config.teacher.checkpoint=OUT --config.teacher.model=MODEL" in message


# ------------------------------------------------------------------- hints across families


def random_variables(name, num_classes, seed=0):
    """Random variables (every leaf) of any model, in the project's tree."""
    leaves, tree = jax.tree.flatten(abstract_variables(models.get_model(name, num_classes)))
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(
        tree, [rng.uniform(0.5, 1.5, x.shape).astype(np.float32) for x in leaves]
    )


@pytest.mark.parametrize(
    "weights, model",
    [
        ("resnet8", "wrn_16_2"),  # RepDistiller's CIFAR ResNet given as a WRN.
        ("wrn_16_2", "resnet8"),
        ("ShuffleV2", "shufflenet_v2_1.0"),  # RepDistiller's ShuffleV2 vs the DFA authors'.
        ("shufflenet_v2_0.5", "ShuffleV2"),
        ("vgg8", "MobileNetV2"),
    ],
)
def test_a_mismatch_names_the_model_of_another_family_the_weights_are(weights, model):
    state = numpy_state_dict(interop.to_torch(random_variables(weights, 10), weights, 10))
    with pytest.raises(interop.InteropError) as info:
        interop.from_torch(state, model, 10)
    assert str(info.value).endswith(f" The weights look like {weights} with 10 classes.")


def test_weights_that_fit_no_model_exactly_get_no_guess():
    """A transposed classifier of resnet8 (64 features, 10 classes) is no resnet8 of 64
    classes; the first bad tensor, with both shapes, is the message."""
    state = numpy_state_dict(interop.to_torch(random_variables("resnet8", 10), "resnet8", 10))
    state["fc.weight"] = state["fc.weight"].T.copy()
    with pytest.raises(interop.InteropError) as info:
        interop.from_torch(state, "resnet8", 10)
    message = str(info.value)
    assert "key 'fc.weight' has shape (64, 10), expected (10, 64)" in message
    assert "look like" not in message
    variables = random_flax_variables(10, 1, 10)
    variables["params"]["fc"]["kernel"] = variables["params"]["fc"]["kernel"].T
    with pytest.raises(interop.InteropError) as info:
        interop.wrn_to_torch(variables, 10, 1, 10)
    assert "look like" not in str(info.value)


# ------------------------------------------------------------------- safetensors, strictly


_F32 = {"dtype": "F32", "shape": [1]}


@pytest.mark.parametrize(
    "header, data, expected",
    [
        (
            {"a": {**_F32, "data_offsets": [0, 4]}, "b": {**_F32, "data_offsets": [8, 12]}},
            bytes(12),
            r"tensor 'b''s data_offsets \[8, 12\] leaves a gap before it \(at byte 4\)",
        ),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {**_F32, "data_offsets": [4, 8]},
            },
            bytes(8),
            r"tensor 'b''s data_offsets \[4, 8\] overlaps the tensor before it",
        ),
        (
            {"a": {**_F32, "data_offsets": [0, 4]}},
            bytes(8),
            r"its tensors cover 4 bytes of its 8-byte buffer \(trailing bytes\)",
        ),
        (
            {"__metadata__": {"epoch": 3}, "a": {**_F32, "data_offsets": [0, 4]}},
            bytes(4),
            r"its __metadata__ is not a JSON object of strings",
        ),
        (
            {"__metadata__": ["x"], "a": {**_F32, "data_offsets": [0, 4]}},
            bytes(4),
            r"its __metadata__ is not a JSON object of strings",
        ),
        (
            {"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}},
            bytes(8),
            r"tensor 'a' has shape \[2\.5\], not a list of non-negative integers",
        ),
        (
            {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
            bytes(4),
            r"tensor 'a' has shape \[-1\], not a list",
        ),
        (
            {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4]}},
            bytes(4),
            r"tensor 'a' has data_offsets \[0\.0, 4\], not two non-negative integers",
        ),
        (
            {"a": {"dtype": "F16", "shape": [1], "data_offsets": [0, 4]}},
            bytes(4),
            r"tensor 'a''s data_offsets \[0, 4\] do not fit its shape",
        ),
        (
            {"a": {"dtype": "F32", "shape": [1], "data_offsets": [False, 4]}},
            bytes(4),
            r"tensor 'a' has data_offsets \[False, 4\], not two non-negative integers",
        ),
    ],
    ids=[
        "hole",
        "overlap",
        "trailing",
        "metadata-int",
        "metadata-list",
        "shape-float",
        "shape-negative",
        "offsets-float",
        "offsets-vs-dtype",
        "offsets-bool",
    ],
)
def test_a_safetensors_file_the_format_forbids_is_refused(tmp_path, header, data, expected):
    """The reference reader's checks: the tensors index the whole buffer, no hole, no overlap,
    no trailing bytes; metadata of strings; integer shapes and offsets."""
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_safetensors_bytes(header, data))
    with pytest.raises(safetensors_io.SafetensorsError) as info:
        safetensors_io.load(str(path))
    message = str(info.value)
    assert message.startswith(f"{path} is not a safetensors file: "), message
    assert re.search(expected, message), message
    try:
        import safetensors.numpy  # pylint: disable=g-import-not-at-top
    except ImportError:
        return
    with pytest.raises(safetensors.SafetensorError):  # The reference reader refuses it too.
        safetensors.numpy.load_file(str(path))


def test_a_safetensors_header_may_list_its_tensors_in_another_order_than_their_bytes(tmp_path):
    """The format indexes the buffer by offsets, not by the header's key order: a header listing
    'a' before 'b' whose bytes hold 'b' first loads each tensor from its own bytes, as the
    reference reader does."""
    header = {
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    }
    data = np.float32(2.0).tobytes() + np.float32(1.0).tobytes()  # b's bytes, then a's.
    path = tmp_path / "reordered.safetensors"
    path.write_bytes(_safetensors_bytes(header, data))
    back, _ = safetensors_io.load(str(path))
    assert {k: v.tolist() for k, v in back.items()} == {"a": [1.0], "b": [2.0]}
    st_numpy = pytest.importorskip("safetensors.numpy")
    theirs = st_numpy.load_file(str(path))
    assert {k: v.tolist() for k, v in theirs.items()} == {"a": [1.0], "b": [2.0]}


def test_loaded_safetensors_arrays_are_writable_as_the_reference_readers(tmp_path):
    """Each loaded array owns writable memory (as safetensors.numpy's are), not a read-only view
    into the file's bytes: a caller that updates weights in place must not fail."""
    path = str(tmp_path / "w.safetensors")
    safetensors_io.save(path, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    back, _ = safetensors_io.load(path)
    back["w"][0, 0] = 7.0
    assert back["w"][0, 0] == 7.0
    st_numpy = pytest.importorskip("safetensors.numpy")
    assert st_numpy.load_file(path)["w"].flags.writeable


def test_a_safetensors_header_length_past_the_end_of_the_file_is_refused(tmp_path):
    """A file cut inside its header's padding still parses as JSON: its header length, larger
    than the file, marks it as damaged (as the reference reader finds), not as a file of no
    tensors."""
    blob = _safetensors_bytes({"__metadata__": {"format": "pt"}}, b"")
    (size,) = struct.unpack("<Q", blob[:8])
    path = tmp_path / "cut.safetensors"
    path.write_bytes(struct.pack("<Q", size + 16) + blob[8:])
    with pytest.raises(
        safetensors_io.SafetensorsError, match=f"its header claims {size + 16} bytes"
    ):
        safetensors_io.load(str(path))
    st_numpy = pytest.importorskip("safetensors.numpy")
    with pytest.raises(Exception):  # noqa: B017  # The reference reader refuses it too.
        st_numpy.load_file(str(path))


def test_big_endian_arrays_are_saved_little_endian(tmp_path):
    path = str(tmp_path / "be.safetensors")
    arrays = {"w": np.arange(6, dtype=">f4").reshape(2, 3), "n": np.arange(3, dtype=">i8")}
    safetensors_io.save(path, arrays)
    back, _ = safetensors_io.load(path)
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype.newbyteorder("<")
        np.testing.assert_array_equal(back[name], value)


def test_safetensors_header_is_padded_to_8_bytes_and_any_memory_layout_keeps_its_values(tmp_path):
    """The header is padded to a multiple of 8 (the reference writer's alignment of the buffer),
    and an array that is a transposed or strided view is written in row-major order."""
    path = str(tmp_path / "layout.safetensors")
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    arrays = {"fortran": base.T, "strided": base[:, ::2], "odd": np.arange(3, dtype=np.int16)}
    assert base.T.flags.f_contiguous and not base.T.flags.c_contiguous
    safetensors_io.save(path, arrays)
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
    assert size % 8 == 0, size
    back, _ = safetensors_io.load(path)
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype, name
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_safetensors_dtype_names_are_pytorchs(tmp_path):
    """Each PyTorch dtype saved by the reference library loads as its own NumPy type: int16 is
    I16 (not U16), F8_E4M3 is float8_e4m3fn (448 finite, as PyTorch's), F8_E5M2 float8_e5m2."""
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    values = [0.0, 1.0, 100.0]
    state = {
        str(t).split(".")[-1]: torch.tensor(values).to(t)
        for t in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
        + (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool)
    }
    state["float8_e4m3fn"] = torch.tensor([448.0, -2.0, 0.5]).to(torch.float8_e4m3fn)
    state["float8_e5m2"] = torch.tensor([57344.0, -2.0, 0.5]).to(torch.float8_e5m2)
    path = str(tmp_path / "dtypes.safetensors")
    st_torch.save_file(state, path)
    back, _ = safetensors_io.load(path)
    for name, tensor in state.items():
        assert back[name].dtype.name == name, (name, back[name].dtype)
        np.testing.assert_array_equal(back[name].astype(np.float64), tensor.double().numpy())


def test_a_save_over_variables_leaves_no_copy_of_the_old_ones(tmp_path):
    """The old variables are set aside only until the new ones are in (a teacher exports its
    best epoch's at every new best): no hidden copy of them stays behind."""
    teacher.save_variables(str(tmp_path / "vars"), random_flax_variables(10, 1, 10, seed=43))
    new = random_flax_variables(10, 1, 10, seed=44)
    teacher.save_variables(str(tmp_path / "vars"), new)
    assert sorted(os.listdir(tmp_path)) == ["vars"]
    _assert_same(interop.read_dfa_variables(str(tmp_path / "vars"))[0], new)


def test_a_save_killed_after_its_second_rename_is_followed_by_a_clean_save(tmp_path):
    """Killed after the new variables went in and before the old ones were removed (both
    `vars` and `.vars.replaced` exist): the next save replaces `vars` and leaves no copy."""
    teacher.save_variables(str(tmp_path / "vars"), random_flax_variables(10, 1, 10, seed=43))
    teacher.save_variables(str(tmp_path / ".vars.replaced"), random_flax_variables(10, 1, 10))
    new = random_flax_variables(10, 1, 10, seed=44)
    teacher.save_variables(str(tmp_path / "vars"), new)
    assert sorted(os.listdir(tmp_path)) == ["vars"]
    _assert_same(interop.read_dfa_variables(str(tmp_path / "vars"))[0], new)


def test_a_failing_rename_of_the_new_variables_puts_the_old_ones_back(tmp_path, monkeypatch):
    """The last rename failing (the old variables already set aside) raises, and the old
    variables are back under their name, not left hidden at `.vars.replaced`."""
    old = random_flax_variables(10, 1, 10, seed=43)
    teacher.save_variables(str(tmp_path / "vars"), old)
    real_rename = os.rename

    def rename(source, target):
        if os.path.basename(source) == ".vars.saving":
            raise OSError(errno.EIO, "Input/output error", source)
        return real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        teacher.save_variables(str(tmp_path / "vars"), random_flax_variables(10, 1, 10, seed=44))
    monkeypatch.setattr(os, "rename", real_rename)
    _assert_same(interop.read_dfa_variables(str(tmp_path / "vars"))[0], old)
    assert not os.path.exists(tmp_path / ".vars.replaced")


def test_a_failed_save_of_new_variables_leaves_no_partial_directory(tmp_path, monkeypatch):
    """A save failing midway (here orbax's write) removes what it wrote, in `.vars.saving` or
    orbax's own temporary directory beside it: only the old variables stay."""
    old = random_flax_variables(10, 1, 10, seed=43)
    teacher.save_variables(str(tmp_path / "vars"), old)
    real_save = ocp.StandardCheckpointer.save

    def half_written(self, directory, *args, **kwargs):
        directory = str(directory)
        for partial in (directory, directory + ".orbax-checkpoint-tmp-1234"):
            os.makedirs(os.path.join(partial, "d"))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", half_written)
    with pytest.raises(errors.WorkdirError, match="No space left"):
        teacher.save_variables(str(tmp_path / "vars"), random_flax_variables(10, 1, 10, seed=44))
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["vars"]
    _assert_same(interop.read_dfa_variables(str(tmp_path / "vars"))[0], old)


def test_a_layout_table_out_of_date_with_its_model_is_refused():
    """Each hand-written PyTorch layout covers every Flax leaf exactly once; a table that misses
    one (a model grown a module the table does not know) is refused, naming the leaf."""
    from dfa_jax import interop_core, interop_layouts, models

    leaves = interop_core.abstract_leaf_shapes(models.get_model("resnet8x4", 100))
    mapped = [row[1] for row in interop_layouts.layout("resnet8x4", 100)]
    assert sorted(mapped) == sorted(leaves) and leaves[("params", "fc", "kernel")] == (256, 100)
    interop_core.check_layout_covers(mapped, leaves, "resnet8x4's table")
    with pytest.raises(RuntimeError, match=r"resnet8x4's table is out of date.*'fc', 'bias'"):
        interop_core.check_layout_covers(
            [p for p in mapped if p != ("params", "fc", "bias")], leaves, "resnet8x4's table"
        )
