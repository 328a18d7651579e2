"""A PyTorch-trained teacher on real CIFAR-10, imported into dfa_jax: both accuracies must agree.

  nice -n 19 python -m benchmarks.torch_teacher_cifar10 --data CIFAR10_NPZ_DIR --out DIR

1. trains a WRN in PyTorch (the WideResNet-pytorch / RepDistiller / overhaul layout) on the npz
   training shards (`train_*.npz`: uint8 images [N, 32, 32, 3], labels [N]) with the project's
   cifar10 normalisation, pad-4 reflect crop and flip, SGD + cosine;
2. evaluates it in PyTorch on `test_*.npz`;
3. saves `{'model': state_dict}` and imports it with `python -m dfa_jax.interop import`;
4. evaluates the imported teacher with the project's main command (`--config.teacher.checkpoint`,
   `stages=("teacher",)`, the npz source) and reads its accuracy from summary.json;
5. prints both accuracies, their difference (the check: at most 0.1 points) and how many test
   images the two frameworks classify differently. Exit status 1 if the check fails.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dfa_jax.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE_POINTS = 0.1


class BasicBlock(nn.Module):
    """Pre-activation block: bn1-relu-conv3x3(stride)-bn2-relu-conv3x3, plus x or a 1x1
    projection of relu(bn1(x)) when the channel count changes (the reference's `equalInOut`)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal_in_out = in_planes == out_planes
        # camelCase: the attribute name is the PyTorch layout's state_dict key.
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)
        )

    def forward(self, x):
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.equal_in_out else self.convShortcut(act))


class NetworkBlock(nn.Module):
    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(blocks)
            ]
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-width for 32x32 images, no dropout; x [B, 3, 32, 32] -> logits [B, classes]."""

    def __init__(self, depth: int, width: int, num_classes: int):
        super().__init__()
        n = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(F.relu(self.bn1(out)).mean(dim=(2, 3)))


def load_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 32, 32, 3] and int64 labels [N] of `{split}.npz` or `{split}_*.npz`."""
    paths = sorted(glob.glob(os.path.join(data_dir, f"{split}_*.npz")))
    paths = paths or [os.path.join(data_dir, f"{split}.npz")]
    images, labels = [], []
    for path in paths:
        with np.load(path) as f:
            images.append(f["images"])
            labels.append(f["labels"].astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 32, 32, 3] -> float32 [B, 3, 32, 32] (channels_last memory) with the project's
    cifar10 mean/std."""
    info = sources.DATASETS["cifar10"]
    mean = torch.tensor(info.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32).view(1, 3, 1, 1)
    x = (images_uint8.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    return x.contiguous(memory_format=torch.channels_last)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Reflect-pad 4, random 32x32 crop, random horizontal flip: [B, 3, 32, 32] -> same."""
    b = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dy = torch.randint(0, 9, (b,), generator=generator)
    dx = torch.randint(0, 9, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(32))[:, None, :, None].expand(b, 3, 32, 40)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(32))[:, None, None, :].expand(b, 3, 32, 32)
    cropped = cropped.gather(3, cols)
    flip = torch.rand(b, generator=generator) < 0.5
    flipped = torch.where(flip[:, None, None, None], cropped.flip(3), cropped)
    return flipped.contiguous(memory_format=torch.channels_last)


def train(net, images, labels, epochs, batch_size, lr, seed) -> float:
    """SGD (momentum 0.9, Nesterov, weight decay 5e-4), cosine lr per step; returns seconds."""
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(labels) // batch_size
    total = epochs * steps_per_epoch
    opt = torch.optim.SGD(net.parameters(), lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total))
    )
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    start = time.time()
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        running = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            x = augment(normalise(x_all[idx]), generator)
            loss = F.cross_entropy(net(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item()
            if (step + 1) % 50 == 0:
                print(
                    f"epoch {epoch + 1}/{epochs} step {step + 1}/{steps_per_epoch}"
                    f" loss {running / 50:.3f} ({time.time() - start:.0f} s)",
                    flush=True,
                )
                running = 0.0
    return time.time() - start


@torch.no_grad()
def predict(net, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    net.eval()
    x_all = torch.from_numpy(images)
    preds = [
        net(normalise(x_all[i : i + batch_size])).argmax(-1)
        for i in range(0, len(x_all), batch_size)
    ]
    return torch.cat(preds).numpy()


def jax_predictions(variables_dir: str, model_name: str, images: np.ndarray) -> np.ndarray:
    """Predicted classes of the imported teacher (dfa_jax model, the project's normalisation)."""
    import jax  # pylint: disable=g-import-not-at-top

    from dfa_jax import models, parallel, teacher  # pylint: disable=g-import-not-at-top
    from dfa_jax.data import augment as jax_augment  # pylint: disable=g-import-not-at-top

    model = models.get_model(model_name, 10)
    variables = teacher.load_variables(variables_dir, model, parallel.make_mesh())
    info = sources.DATASETS["cifar10"]

    @jax.jit
    def classify(batch):
        x = jax_augment.normalize(batch, info.mean, info.std)
        return model.apply(variables, x, train=False).argmax(-1)

    return np.concatenate(
        [np.asarray(classify(images[i : i + 500])) for i in range(0, len(images), 500)]
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="directory of CIFAR-10 npz shards")
    parser.add_argument("--out", required=True, help="directory for the .pth, variables and run")
    parser.add_argument("--model", default="wrn_10_2", help="wrn_{depth}_{width}")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--max-train", type=int, default=None, help="train on the first N examples (smoke runs)"
    )
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    _, depth, width = args.model.split("_")
    x_train, y_train = load_split(args.data, "train")
    # The shards are a fixed random permutation: the first N examples are class-mixed.
    x_train, y_train = x_train[: args.max_train], y_train[: args.max_train]
    x_test, y_test = load_split(args.data, "test")
    print(f"train {x_train.shape}, test {x_test.shape}; torch {torch.__version__}", flush=True)

    # channels_last: oneDNN's CPU convolutions measured 1.7x faster than NCHW here. The saved
    # weights keep that memory layout, which the import has to handle as well.
    net = WideResNet(int(depth), int(width), 10).to(memory_format=torch.channels_last)
    seconds = train(net, x_train, y_train, args.epochs, args.batch_size, args.lr, args.seed)
    torch_pred = predict(net, x_test)
    torch_accuracy = float(np.mean(torch_pred == y_test))
    print(
        f"PyTorch: {args.epochs} epochs in {seconds:.0f} s, test accuracy {100 * torch_accuracy:.2f}%"
    )

    pth = os.path.join(args.out, "teacher.pth")
    torch.save({"model": net.state_dict(), "epoch": args.epochs}, pth)
    variables = os.path.join(args.out, "variables")
    subprocess.run(
        [sys.executable, "-m", "dfa_jax.interop", "import", "--model", args.model,
         "--num-classes", "10", "--force", pth, variables],
        cwd=REPO,
        check=True,
    )  # fmt: skip

    workdir = os.path.join(args.out, f"eval_{int(time.time())}")
    subprocess.run(
        [sys.executable, "-m", "dfa_jax.main", "--config=configs/cifar100_teacher.py",
         f"--workdir={workdir}", '--config.stages=("teacher",)',
         "--config.data.dataset=cifar10", "--config.data.source=npz",
         f"--config.data.path={os.path.abspath(args.data)}", "--config.num_cpu_devices=1",
         f"--config.teacher.model={args.model}", f"--config.teacher.checkpoint={variables}"],
        cwd=REPO,
        check=True,
    )  # fmt: skip
    with open(os.path.join(workdir, "summary.json")) as f:
        jax_accuracy = float(json.load(f)["stages"]["teacher"]["best_accuracy"])

    disagreements = int(np.sum(jax_predictions(variables, args.model, x_test) != torch_pred))
    difference = round(100 * (jax_accuracy - torch_accuracy), 4) + 0.0  # no "-0.00"
    result = {
        "model": args.model,
        "epochs": args.epochs,
        "train_seconds": round(seconds, 1),
        "torch_accuracy": torch_accuracy,
        "dfa_jax_accuracy": jax_accuracy,
        "difference_points": difference,
        "prediction_disagreements": disagreements,
        "test_examples": len(y_test),
        "passed": abs(difference) <= TOLERANCE_POINTS,
    }
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(
        f"PyTorch {100 * torch_accuracy:.2f}% | dfa_jax (imported) {100 * jax_accuracy:.2f}% |"
        f" difference {difference:+.2f} points (check: |difference| <= {TOLERANCE_POINTS}) |"
        f" {disagreements}/{len(y_test)} test images classified differently"
    )
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
