"""PyTorch twins of the benchmarked models, losses and steps: the reference the JAX steps are timed
against (`python -m benchmarks.throughput --torch`).

Written from the paper and from dfa_jax's own definitions, so both sides do the same arithmetic:
- `WideResNet`: pre-activation WRN-d-k (WideResNet-pytorch / RepDistiller / overhaul layout), the
  pre-ReLU features at the output of the BN that consumes each block, a forward that can stop at or
  resume from a group boundary (dfa_jax/models/wide_resnet.py);
- `ShuffleNetV2`: the DFA authors' pre-activation CIFAR variant, dfa_jax/models/shufflenet_v2.py's
  widths (every unit output pre-ReLU);
- `Connector`: 1x1 conv + BN; the losses of dfa_jax/losses (aggregation, bridge loss, overhaul's
  partial L2 with margin -1, KD);
- the teacher, search (beta step on a val batch, then the w step) and distillation steps, each
  with the on-device augmentation the JAX step also runs (reflect pad 4, random crop, flip,
  normalisation).
Layout: NCHW tensors in `channels_last` memory format, which oneDNN's CPU convolutions prefer
(and cuDNN's on a GPU). Device: `DEVICE`, the CUDA GPU where PyTorch sees one, else the CPU.
Each step is eager, or with `compile_backend='inductor'` what a performance-minded user writes:
`torch.compile` on the forward and loss (its backward compiled by AOTAutograd) and on the
optimizer's step; the augmentation stays eager (its random generator breaks a graph).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# dfa_jax/data/sources.py's CIFAR statistics, in 0..255 units.
CIFAR_MEAN = (125.3, 123.0, 113.9)
CIFAR_STD = (63.0, 62.1, 66.7)
CHANNELS_LAST = torch.channels_last
# Where the twins run: the benchmark compares like with like (JAX on the GPU against PyTorch on it).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# cuDNN picks each convolution's algorithm by timing them, as XLA autotunes its own: without it
# the twin would run cuDNN's heuristic choices against tuned JAX convolutions. The warm-up calls
# before timing take the tuning.
torch.backends.cudnn.benchmark = DEVICE.type == "cuda"


def synchronize() -> None:
    """Waits for the queued GPU work (CUDA runs asynchronously; a no-op on the CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _he_fan_out(conv: nn.Conv2d) -> None:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


class WideBasicBlock(nn.Module):
    """bn1 -> relu -> conv3x3(stride) -> bn2 -> relu -> conv3x3, + identity or 1x1 projection of
    the activated input. `bn1` is applied by the caller (its output is the previous block's
    pre-ReLU feature, or an injected group boundary)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if in_planes != planes or stride != 1:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, 0, bias=False)

    def forward(self, x, pre):
        act = F.relu(pre)
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (self.shortcut(act) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-depth-width for 32x32 images; groups at 32^2/16^2/8^2 of 16k/32k/64k channels."""

    num_groups = 3

    def __init__(self, depth: int, width: int, num_classes: int):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.blocks_per_group = n
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.blocks = nn.ModuleList()
        for g in range(3):
            for j in range(n):
                stride = (1 if g == 0 else 2) if j == 0 else 1
                self.blocks.append(
                    WideBasicBlock(widths[g] if j == 0 else widths[g + 1], widths[g + 1], stride)
                )
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _he_fan_out(m)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def group_names(self) -> list[list[str]]:
        n = self.blocks_per_group
        return [[f"g{g}_b{j}" for j in range(1, n + 1)] for g in (1, 2, 3)]

    def forward(self, x, start_group: int = 0, stop_group: int | None = None):
        """Returns `(logits or the group-`stop_group` boundary, {feature name: pre-ReLU map})`."""
        n, feats = self.blocks_per_group, {}
        last = self.num_groups if stop_group is None else stop_group
        if start_group == 0:
            x, pre, name = self.conv1(x), None, "stem"
        else:
            x, pre, name = None, x, None
        for index in range(start_group * n, last * n):
            block = self.blocks[index]
            if pre is None:
                pre = block.bn1(x)
                feats[name] = pre
            x = block(x, pre)
            pre, name = None, f"g{index // n + 1}_b{index % n + 1}"
        if pre is None:
            pre = self.blocks[last * n].bn1(x) if last < self.num_groups else self.bn1(x)
            feats[name] = pre
        if stop_group is not None:
            return pre, feats
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(pre), 1), 1)), feats


def channel_shuffle(x, groups: int):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _conv_bn(cin, cout, k, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=True), nn.BatchNorm2d(cout)
    )


class ShuffleUnit(nn.Module):
    """relu -> (left | right branch) -> concat -> channel shuffle; the output is pre-ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        half, self.stride = cout // 2, stride
        mid = half if stride == 1 else cin
        if stride == 2:
            self.left = nn.Sequential(
                _conv_bn(cin, cin, 3, stride, groups=cin), _conv_bn(cin, half, 1)
            )
        self.right = nn.Sequential(
            _conv_bn(mid, mid, 1),
            nn.ReLU(),
            _conv_bn(mid, mid, 3, stride, groups=mid),
            _conv_bn(mid, half, 1),
        )

    def forward(self, x):
        x = F.relu(x)
        if self.stride == 1:
            left, right = x.chunk(2, dim=1)
        else:
            left, right = self.left(x), x
        return channel_shuffle(torch.cat([left, self.right(right)], 1), 2)


class ShuffleNetV2(nn.Module):
    """Stem (group 1), stages 2/3/4 of 4/8/4 units (groups 2-4), conv5 (group 5), head."""

    num_groups = 5
    stage_units = (4, 8, 4)

    def __init__(self, widths: tuple[int, int, int, int], num_classes: int):
        super().__init__()
        self.stem = _conv_bn(3, 24, 3)
        cin, self.stages = 24, nn.ModuleList()
        for units, cout in zip(self.stage_units, widths[:3]):
            self.stages.append(
                nn.ModuleList(
                    [
                        ShuffleUnit(cin if j == 0 else cout, cout, 2 if j == 0 else 1)
                        for j in range(units)
                    ]
                )
            )
            cin = cout
        self.conv5 = _conv_bn(widths[2], widths[3], 1)
        self.fc = nn.Linear(widths[3], num_classes)

    def group_names(self) -> list[list[str]]:
        units = (1,) + self.stage_units + (1,)
        return [[f"g{g}_b{j}" for j in range(1, u + 1)] for g, u in enumerate(units, start=1)]

    def forward(self, x, start_group: int = 0, stop_group: int | None = None):
        assert start_group == 0, "the benchmark resumes WRNs only"
        last = self.num_groups if stop_group is None else stop_group
        x = self.stem(x)
        feats = {"g1_b1": x}
        for g in range(2, last + 1):
            if g < self.num_groups:
                for j, unit in enumerate(self.stages[g - 2]):
                    x = unit(x)
                    feats[f"g{g}_b{j + 1}"] = x
            else:
                x = self.conv5(F.relu(x))
                feats["g5_b1"] = x
        if stop_group is not None:
            return x, feats
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(x), 1), 1)), feats


SHUFFLENET_WIDTHS = {
    "0.5": (48, 96, 192, 1024),
    "1.0": (116, 232, 464, 1024),
    "2.0": (244, 488, 976, 2048),
}


def get_model(name: str, num_classes: int) -> nn.Module:
    """'wrn_{depth}_{width}' or 'shufflenet_v2_{0.5,1.0,2.0}', as dfa_jax.models.get_model."""
    if name.startswith("shufflenet_v2_"):
        return ShuffleNetV2(SHUFFLENET_WIDTHS[name.removeprefix("shufflenet_v2_")], num_classes)
    _, depth, width = name.split("_")
    return WideResNet(int(depth), int(width), num_classes)


class Connector(nn.Module):
    """1x1 conv (no bias, He fan_out) + BN: student <-> teacher channels."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        _he_fan_out(self.conv)

    def forward(self, x):
        return self.bn(self.conv(x))


def group_channels(model: nn.Module) -> list[int]:
    """Per group, the channels of its maps (from one tiny eval forward)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        _, feats = model(torch.zeros(1, 3, 32, 32, device=next(model.parameters()).device))
    model.train(was_training)
    return [feats[names[-1]].shape[1] for names in model.group_names()]


# ------------------------------------------------------------------------------------------------
# Losses (dfa_jax/losses)
# ------------------------------------------------------------------------------------------------


def aggregate(maps: list[torch.Tensor], alpha: torch.Tensor) -> torch.Tensor:
    """Eq. 2: `sum_j alpha_j T_j`."""
    out = alpha[0] * maps[0]
    for j in range(1, len(maps)):
        out = out + alpha[j] * maps[j]
    return out


def st_loss(student, aggregated):
    """Eq. 11: mean over the batch of || u(s_b) - u(a_b) ||^2, u = per-sample L2 normalisation."""

    def unit(x):
        flat = x.reshape(x.shape[0], -1)
        return flat / torch.sqrt((flat * flat).sum(1, keepdim=True) + 1e-12)

    return ((unit(student) - unit(aggregated)) ** 2).sum(1).mean()


def partial_l2(student, teacher, margin: float = -1.0):
    """Overhaul's partial L2: (s - t')^2 where s > t' or t' > 0, t' = max(t, margin); / batch."""
    target = teacher.clamp(min=margin)
    kept = (student > target) | (target > 0)
    return torch.where(kept, (student - target) ** 2, 0.0).sum() / student.shape[0]


def kd_loss(student_logits, teacher_logits, temperature: float):
    """T^2 / B * KL(p_t || p_s) at temperature T (RepDistiller's DistillKL)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_s, p_t, reduction="sum")
    return kl * temperature**2 / student_logits.shape[0]


# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------


def augment(images_u8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 [B, 32, 32, 3] -> normalised float [B, 3, 32, 32] (channels_last): reflect pad 4,
    a random 32x32 crop and a horizontal flip per image, as dfa_jax/data/augment.py."""
    b, h, w, _ = images_u8.shape
    dev = images_u8.device
    x = images_u8.permute(0, 3, 1, 2).float()
    x = F.pad(x, (4, 4, 4, 4), mode="reflect")
    offsets = torch.randint(0, 9, (b, 2), generator=generator, device=dev)
    flip = torch.rand(b, generator=generator, device=dev) < 0.5
    rows = offsets[:, :1] + torch.arange(h, device=dev)  # [B, H]
    cols = offsets[:, 1:] + torch.arange(w, device=dev)  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=dev)[:, None, None]
    x = x[batch, :, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    x = (x - torch.tensor(CIFAR_MEAN, device=dev)) / torch.tensor(CIFAR_STD, device=dev)
    return x.permute(0, 3, 1, 2).contiguous(memory_format=CHANNELS_LAST)


def sgd(params, nesterov: bool, lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)


def _prepare(module: nn.Module) -> nn.Module:
    return module.to(DEVICE, memory_format=CHANNELS_LAST)


def _generator() -> torch.Generator:
    return torch.Generator(DEVICE).manual_seed(0)


def _teacher_eval(name: str, num_classes: int) -> nn.Module:
    teacher = _prepare(get_model(name, num_classes)).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _autocast(bf16: bool):
    """bf16 compute with float32 parameters (dfa_jax's `config.dtype = 'bfloat16'`)."""
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16)


def compiler(compile_backend: str | None, mode: str | None = None) -> Callable:
    """`fn -> fn` as `make_*_step` apply it to the loss (the forward and the loss become one graph;
    AOTAutograd compiles its backward) and to the optimizer's step: `torch.compile` with
    `compile_backend` ('inductor', what a user gets by default; 'eager' runs the captured graphs
    without code generation) and `mode`, or the identity (the eager twin) for None."""
    if compile_backend is None:
        return lambda fn: fn
    return lambda fn: torch.compile(fn, backend=compile_backend, mode=mode)


def make_teacher_step(
    model_name: str, num_classes: int = 100, bf16: bool = False, compile_backend=None, mode=None
) -> Callable:
    """`step(images_u8, labels)`: one SGD (Nesterov, wd 5e-4) step of cross-entropy training;
    compiled as `compiler(compile_backend, mode)` says."""
    model = _prepare(get_model(model_name, num_classes)).train()
    opt = sgd(model.parameters(), nesterov=True)
    gen = _generator()
    compiled = compiler(compile_backend, mode)

    @compiled
    def loss_of(images, labels):
        with _autocast(bf16):
            logits, _ = model(images)
        return F.cross_entropy(logits.float(), labels)

    opt_step = compiled(opt.step)

    def step(images_u8, labels):
        loss = loss_of(augment(images_u8, gen), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt_step()
        return loss

    return step


def make_search_steps(
    teacher_name: str,
    student_name: str,
    group: int,
    num_classes: int = 100,
    gamma_st: float = 1e-3,
    gamma_ts: float = 1.0,
    bf16: bool = False,
    compile_backend: str | None = None,
    mode: str | None = None,
) -> dict[str, Callable]:
    """The bilevel search step of `group` and its two halves: {'step', 'w_step', 'beta_step'},
    each `(train_u8, train_labels, val_u8, val_labels)`; the bridge loss and both optimizers'
    steps compiled as `compiler(compile_backend, mode)` says.

    beta: Adam(1e-3, (0.5, 0.999)) with coupled L2 1e-3 on a val batch, gradient of the bridge
    loss with respect to beta only; w (student + ST/TS connectors): SGD momentum 0.9, wd 5e-4.
    """
    teacher = _teacher_eval(teacher_name, num_classes)
    student = _prepare(get_model(student_name, num_classes)).train()
    t_channels, s_channels = group_channels(teacher), group_channels(student)
    st = _prepare(Connector(s_channels[group - 1], t_channels[group - 1])).train()
    ts = _prepare(Connector(t_channels[group - 1], s_channels[group - 1])).train()
    names = teacher.group_names()[group - 1]
    beta = torch.zeros(len(names), device=DEVICE)
    beta[-1] = 4.0
    beta.requires_grad_(True)
    w_params = [*student.parameters(), *st.parameters(), *ts.parameters()]
    w_opt = sgd(w_params, nesterov=False, lr=0.05)
    beta_opt = torch.optim.Adam([beta], lr=1e-3, betas=(0.5, 0.999), weight_decay=1e-3)
    gen = _generator()
    compiled = compiler(compile_backend, mode)
    w_opt_step, beta_opt_step = compiled(w_opt.step), compiled(beta_opt.step)

    @compiled
    def bridge(images, labels, alpha):
        with _autocast(bf16):
            with torch.no_grad():
                _, feats = teacher(images, stop_group=group)
            maps = [feats[n].float().clamp(min=-1.0) for n in names]
            aggregated = aggregate(maps, alpha)
            s_i, _ = student(images, stop_group=group)
            st_term = st_loss(st(s_i).float(), aggregated)
            logits, _ = student(ts(aggregated), start_group=group)
        return gamma_st * st_term + gamma_ts * F.cross_entropy(logits.float(), labels)

    def beta_step(train_u8, train_labels, val_u8, val_labels):
        del train_u8, train_labels
        loss = bridge(augment(val_u8, gen), val_labels, torch.softmax(beta, 0))
        # Only beta's gradient: autograd skips every weight gradient of w.
        (beta.grad,) = torch.autograd.grad(loss, [beta])
        beta_opt_step()
        return loss

    def w_step(train_u8, train_labels, val_u8, val_labels):
        del val_u8, val_labels
        loss = bridge(augment(train_u8, gen), train_labels, torch.softmax(beta.detach(), 0))
        w_opt.zero_grad(set_to_none=True)
        loss.backward()
        w_opt_step()
        return loss

    def step(*batches):
        beta_step(*batches)
        return w_step(*batches)

    return {"step": step, "w_step": w_step, "beta_step": beta_step}


def make_distill_step(
    teacher_name: str,
    student_name: str,
    method: str,
    num_classes: int = 100,
    gamma_fd: float = 1e-3,
    kd_temperature: float = 4.0,
    bf16: bool = False,
    compile_backend: str | None = None,
    mode: str | None = None,
) -> Callable:
    """`step(images_u8, labels)` of DFA distillation (CE + gamma_fd sum_i w_i partial_l2 against
    the frozen aggregation, alpha = the 'average' of each group) or KD (0.1 CE + 0.9 KD); the
    loss and the optimizer's step compiled as `compiler(compile_backend, mode)` says."""
    teacher = _teacher_eval(teacher_name, num_classes)
    student = _prepare(get_model(student_name, num_classes)).train()
    t_channels, s_channels = group_channels(teacher), group_channels(student)
    t_groups, s_groups = teacher.group_names(), student.group_names()
    num_groups = len(t_groups)
    connectors = nn.ModuleList(
        [_prepare(Connector(s, t)) for s, t in zip(s_channels, t_channels)]
    ).train()
    weights = [2.0 ** (i + 1 - num_groups) for i in range(num_groups)]
    alphas = [torch.full((len(g),), 1.0 / len(g), device=DEVICE) for g in t_groups]
    params = [*student.parameters()] + ([*connectors.parameters()] if method == "dfa" else [])
    opt = sgd(params, nesterov=True)
    gen = _generator()
    compiled = compiler(compile_backend, mode)
    opt_step = compiled(opt.step)

    @compiled
    def loss_of(images, labels):
        with _autocast(bf16):
            logits, s_feats = student(images)
            with torch.no_grad():
                t_logits, t_feats = teacher(images)
            mapped = (
                [connectors[i](s_feats[names[-1]]) for i, names in enumerate(s_groups)]
                if method == "dfa"
                else []
            )
        logits = logits.float()
        ce = F.cross_entropy(logits, labels)
        if method == "kd":
            loss = 0.1 * ce + 0.9 * kd_loss(logits, t_logits.float(), kd_temperature)
        else:
            fd = 0.0
            for i, names in enumerate(t_groups):
                maps = [t_feats[n].float().clamp(min=-1.0) for n in names]
                fd = fd + weights[i] * partial_l2(mapped[i].float(), aggregate(maps, alphas[i]))
            loss = ce + gamma_fd * fd
        return loss

    def step(images_u8, labels):
        loss = loss_of(augment(images_u8, gen), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt_step()
        return loss

    return step


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
