"""PyTorch state_dicts <-> dfa_jax variables, and the command line (the Wide ResNets' layout here).

`from_torch` / `to_torch` convert any family with a PyTorch layout by model name: the WRNs here,
RepDistiller's CIFAR ResNets and VGGs and the DFA authors' ShuffleNetV2 in `interop_layouts`.

The Wide ResNets' PyTorch layout is the one WideResNet-pytorch, RepDistiller and
overhaul-distillation share:
`conv1.weight`, `block{g}.layer.{j}.{bn1,conv1,bn2,conv2,convShortcut}.*`, `bn1.*`, `fc.*`.
It maps 1:1 onto `dfa_jax.models.WideResNet` (`conv1`, `block{g}_layer{j}/{...,conv_shortcut}`,
`bn1`, `fc`): conv kernels OIHW <-> HWIO, the linear weight (out, in) <-> (in, out), BatchNorm
weight/bias/running_mean/running_var <-> scale/bias (params) and mean/var (batch_stats).

  # A PyTorch teacher -> a variables directory that --config.teacher.checkpoint=OUT loads:
  python -m dfa_jax.interop import --model wrn_28_4 --num-classes 100 teacher.pth OUT
  # A trained teacher or distilled student -> a PyTorch state_dict:
  python -m dfa_jax.interop export --model wrn_16_2 --num-classes 100 WORKDIR/distill/dfa s.pth
  # The same as .safetensors (in and out), with no PyTorch installed:
  python -m dfa_jax.interop export --model wrn_16_2 --num-classes 100 WORKDIR/distill/dfa s.safetensors
  # The teacher a run distilled from (as its config.json's teacher.distill_from; --best/--last):
  python -m dfa_jax.interop export --model wrn_28_4 --num-classes 100 WORKDIR teacher.pth
  # One network of a checkpoint holding several (mdistiller's whole distiller):
  python -m dfa_jax.interop import --model resnet8x4 --num-classes 100 --prefix student. best.pth OUT

`from_torch` / `to_torch` take any convertible model by name (RepDistiller's MobileNetV2,
ShuffleV1, ShuffleV2 and ResNet50 through `interop_mobile`). PyTorch is optional: importing
this module never imports it; what needs it raises ImportError naming the extra
(`pip install 'dfa_jax[torch]'`). Files are read with `weights_only=True`, so a
checkpoint that would run arbitrary code when unpickled is refused (beside tensors and plain
containers only an argparse.Namespace is built: RepDistiller's `_last.pth` keeps its options).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import pickle
import re
import sys
import tarfile
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from dfa_jax import errors, safetensors_io
from dfa_jax import interop_core as core
from dfa_jax.interop_core import (  # noqa: F401 (re-exported: interop's public names)
    DATA_PARALLEL_PREFIX,
    NESTED_KEYS,
    TORCH_INSTALL,
    WRAPPER_PREFIXES,
    InteropError,
    _check,
    _Entry,
    _flax_leaves,
    _shape,
    _to_float32,
    entries_from_torch,
    entries_to_torch,
    import_torch,
    unwrap_state_dict,
)

SAFETENSORS_SUFFIX = ".safetensors"


# ------------------------------------------------------------------------------------- layout


def model_name(depth: int, width: int) -> str:
    return f"wrn_{depth}_{width}"


def parse_model_name(name: str) -> tuple[int, int]:
    """'wrn_{depth}_{width}' -> (depth, width); InteropError for anything else."""
    from dfa_jax import models  # pylint: disable=g-import-not-at-top

    match = re.fullmatch(r"wrn_(\d+)_(\d+)", name)
    if match is None or not models.is_valid_model_name(name):
        raise InteropError(
            f"model {name!r} cannot be converted: only Wide ResNets 'wrn_{{depth}}_{{width}}' with"
            " (depth - 4) % 6 == 0 and depth >= 10 have the PyTorch layout (e.g. wrn_28_4)"
        )
    return int(match[1]), int(match[2])


@functools.lru_cache(maxsize=32)
def _layout(depth: int, width: int, num_classes: int) -> tuple[_Entry, ...]:
    """Every tensor of WRN-depth-width in PyTorch's state_dict order (module registration order:
    conv1, block1.layer.0.{bn1, conv1, bn2, conv2, convShortcut}, ..., bn1, fc)."""
    from dfa_jax import models  # pylint: disable=g-import-not-at-top

    name = model_name(depth, width)
    if not models.is_valid_model_name(name) or num_classes < 1:
        raise InteropError(f"no WideResNet {name} with {num_classes} classes: check depth/width")
    model = models.get_model(name, num_classes)
    leaves = core.abstract_leaf_shapes(model)

    entries = []

    def conv(torch_module, flax_module):
        entries.append(
            _Entry(
                f"{torch_module}.weight",
                ("params", *flax_module, "kernel"),
                "conv",
                leaves[("params", *flax_module, "kernel")],
            )
        )

    def batch_norm(torch_module, flax_module):
        for torch_leaf, flax_leaf in (
            ("weight", ("params", "scale")),
            ("bias", ("params", "bias")),
            ("running_mean", ("batch_stats", "mean")),
            ("running_var", ("batch_stats", "var")),
        ):
            path = (flax_leaf[0], *flax_module, flax_leaf[1])
            entries.append(_Entry(f"{torch_module}.{torch_leaf}", path, "vector", leaves[path]))

    conv("conv1", ("conv1",))
    for group in (1, 2, 3):
        for j in range(model.blocks_per_group):
            torch_block, flax_block = f"block{group}.layer.{j}", f"block{group}_layer{j}"
            batch_norm(f"{torch_block}.bn1", (flax_block, "bn1"))
            conv(f"{torch_block}.conv1", (flax_block, "conv1"))
            batch_norm(f"{torch_block}.bn2", (flax_block, "bn2"))
            conv(f"{torch_block}.conv2", (flax_block, "conv2"))
            if ("params", flax_block, "conv_shortcut", "kernel") in leaves:
                conv(f"{torch_block}.convShortcut", (flax_block, "conv_shortcut"))
    batch_norm("bn1", ("bn1",))
    entries.append(
        _Entry("fc.weight", ("params", "fc", "kernel"), "dense", leaves[("params", "fc", "kernel")])
    )
    entries.append(
        _Entry("fc.bias", ("params", "fc", "bias"), "vector", leaves[("params", "fc", "bias")])
    )

    core.check_layout_covers([e.flax_path for e in entries], leaves, f"interop's layout of {name}")
    return tuple(entries)


def infer_architecture(shapes: Mapping[str, tuple], layout: str = "torch"):
    """(depth, width, num_classes) that WRN tensor shapes (key -> shape, PyTorch keys or Flax
    'params/...' paths as `layout` says) look like, or None if they do not look like a WRN."""
    if layout == "torch":
        block_re, first_conv, fc = r"block1\.layer\.(\d+)\.", "block1.layer.0.conv1.weight", 0
        width_axis, fc_key = 0, "fc.weight"
    else:
        block_re, first_conv, fc = (
            r"params/block1_layer(\d+)/",
            "params/block1_layer0/conv1/kernel",
            1,
        )
        width_axis, fc_key = 3, "params/fc/kernel"
    try:
        blocks = {int(m[1]) for k in shapes if (m := re.match(block_re, k))}
        width = int(shapes[first_conv][width_axis]) // 16
        num_classes = int(shapes[fc_key][fc])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if not blocks or width < 1:
        return None
    return 6 * len(blocks) + 4, width, num_classes


def _hint(guess, depth: int, width: int, num_classes: int, variables_shapes=None) -> str:
    """A sentence naming the WRN that Flax variables look like, when it is another one and its
    shapes are exactly `variables_shapes` (so a transposed or damaged leaf names no model)."""
    if guess is None or guess == (depth, width, num_classes):
        return ""
    try:
        entries = _layout(*guess)
    except InteropError:
        return ""
    if variables_shapes is not None and variables_shapes != {
        e.flax_key: e.flax_shape for e in entries
    }:
        return ""
    return f" The weights look like {model_name(*guess[:2])} with {guess[2]} classes."


def torch_entries(name: str, num_classes: int) -> tuple[_Entry, ...]:
    """Every tensor of model `name` (of any convertible family) in PyTorch's state_dict order."""
    from dfa_jax import interop_layouts, interop_mobile  # pylint: disable=g-import-not-at-top

    if num_classes < 1:
        raise InteropError(f"no {name} with {num_classes} classes")
    if name in interop_mobile.NAMES:
        return interop_mobile._layout(name, num_classes)  # pylint: disable=protected-access
    if name.startswith("wrn_"):
        return _layout(*parse_model_name(name), num_classes)
    _converter(name, 0)  # Raises the message naming what converts.
    return tuple(_Entry(*row) for row in interop_layouts.layout(name, num_classes))


def _guesses(shapes: Mapping[str, tuple]):
    """(model name, num_classes) that PyTorch shapes may be: each family's own guess (the WRNs'
    depth and width, the presets `interop_layouts.infer_name` tells apart, RepDistiller's
    MobileNetV2 / ShuffleV1 / ShuffleV2 / ResNet50 by the keys of their heads)."""
    # pylint: disable-next=g-import-not-at-top
    from dfa_jax import interop_layouts, interop_mobile, models

    wrn = infer_architecture(shapes)
    if wrn is not None and models.is_valid_model_name(model_name(*wrn[:2])):
        yield model_name(*wrn[:2]), wrn[2]
    tabled = interop_layouts.infer_name(shapes)
    if tabled is not None:
        yield tabled
    yield from interop_mobile.guesses(shapes)


def architecture_hint(shapes: Mapping[str, tuple], name: str, num_classes: int) -> str:
    """A sentence naming the model, of any family, whose PyTorch layout PyTorch shapes (key ->
    shape) are exactly, when it is not `name` with `num_classes` classes; else ''.

    Only an exact fit is named: weights that merely resemble a model (a transposed classifier,
    a missing tensor) get no guess that would send the user to another wrong model.
    """
    shapes = dict(shapes)
    for guess in _guesses(shapes):
        if guess == (name, num_classes):
            continue
        try:
            entries = torch_entries(*guess)
        except (InteropError, TypeError, ValueError, KeyError):
            continue  # A guess no model has (e.g. no classes).
        if shapes == {e.torch_key: e.torch_shape for e in entries}:
            return f" The weights look like {guess[0]} with {guess[1]} classes."
    return ""


# ------------------------------------------------------------------------------ torch -> flax


def wrn_from_torch(state_dict: Any, depth: int, width: int, num_classes: int) -> dict:
    """A PyTorch WRN state_dict -> `{'params', 'batch_stats'}` of `models.get_model`'s WRN.

    Args:
      state_dict: the PyTorch layout's tensors (torch or numpy), bare or nested under
        'state_dict' / 'model' / 'net', keys optionally prefixed with 'module.' / '_orig_mod.'.
      depth, width, num_classes: the WideResNet to build (`wrn_{depth}_{width}`).

    Returns:
      Nested dicts of float32 numpy arrays in the tree structure of `teacher.init_variables`:
      conv kernels [3, 3, in, out] (HWIO), fc kernel [in, classes].

    Raises:
      InteropError: a missing, unexpected or wrongly shaped key (the first one is named, with
        its shape, the expected shape and the model).
    """
    return entries_from_torch(
        _layout(depth, width, num_classes),
        state_dict,
        f"{model_name(depth, width)} with {num_classes} classes (PyTorch layout)",
        functools.partial(
            architecture_hint, name=model_name(depth, width), num_classes=num_classes
        ),
    )


# ------------------------------------------------------------------------------ flax -> torch


def wrn_to_torch(variables: Mapping, depth: int, width: int, num_classes: int) -> dict:
    """`{'params', 'batch_stats'}` of the Flax WRN -> the PyTorch layout's state_dict.

    The reverse of `wrn_from_torch`, with each BatchNorm's `num_batches_tracked` (0), so that
    `load_state_dict(..., strict=True)` accepts it. Values are torch tensors when torch imports,
    else numpy arrays; keys are in PyTorch's module order.

    Raises:
      InteropError: a missing, unexpected or wrongly shaped leaf (the first one is named).
    """
    return entries_to_torch(
        _layout(depth, width, num_classes),
        variables,
        f"{model_name(depth, width)} with {num_classes} classes (Flax layout)",
        lambda shapes: _hint(
            infer_architecture(shapes, layout="flax"), depth, width, num_classes, shapes
        ),
    )


# ------------------------------------------------------------------------------ any family


def _wrn_converters():
    def from_torch_wrn(state_dict, name, num_classes):
        return wrn_from_torch(state_dict, *parse_model_name(name), num_classes)

    def to_torch_wrn(variables, name, num_classes):
        return wrn_to_torch(variables, *parse_model_name(name), num_classes)

    return from_torch_wrn, to_torch_wrn


def _tabled_converters():
    """Converters of the families whose layouts `interop_layouts` lists."""

    def from_torch_tabled(state_dict, name, num_classes):
        what = f"{name} with {num_classes} classes (PyTorch layout)"
        guess = functools.partial(architecture_hint, name=name, num_classes=num_classes)
        return entries_from_torch(torch_entries(name, num_classes), state_dict, what, guess)

    def to_torch_tabled(variables, name, num_classes):
        what = f"{name} with {num_classes} classes (Flax layout)"
        return entries_to_torch(torch_entries(name, num_classes), variables, what, "")

    return from_torch_tabled, to_torch_tabled


def _hinted(convert_from_torch):
    """A `from_torch` of `interop_mobile` whose mismatch names what the weights look like."""

    def from_torch_hinted(state_dict, name, num_classes):
        hint = functools.partial(architecture_hint, name=name, num_classes=num_classes)
        return convert_from_torch(state_dict, name, num_classes, hint=hint)

    return from_torch_hinted


def converters() -> dict:
    """Family name -> (from_torch, to_torch), each `(tree, model name, num_classes)`."""
    from dfa_jax import interop_mobile  # pylint: disable=g-import-not-at-top

    tabled = _tabled_converters()
    return {
        "WRN": _wrn_converters(),
        "ShuffleNetV2": tabled,  # The DFA authors' (PkuDavidGuan/Distillation).
        "ResNet": tabled,
        "VGG": tabled,
        **{n: (_hinted(f), t) for n, (f, t) in interop_mobile.CONVERTERS.items()},
    }


def _converter(name: str, direction: int):
    """The from_torch (direction 0) or to_torch (1) of `name`'s family; InteropError if none."""
    from dfa_jax import models  # pylint: disable=g-import-not-at-top

    family = models.family_of(name)
    table = converters()
    if family is not None and family.name in table:
        return table[family.name][direction]
    if name.startswith("wrn_"):
        parse_model_name(name)  # Raises the Wide ResNets' message.
    authors = models.SHUFFLENET_V2.presets
    skip = ("WRN", models.SHUFFLENET_V2.name)
    others = [
        n for f in models.FAMILIES if f.name in table and f.name not in skip for n in f.presets
    ]
    raise InteropError(
        f"model {name!r} cannot be converted: only Wide ResNets 'wrn_{{depth}}_{{width}}', the DFA"
        f" authors' {', '.join(authors)} and RepDistiller's {', '.join(others)} have a PyTorch"
        " layout"
    )


def from_torch(state_dict: Any, name: str, num_classes: int, prefix: str | None = None) -> dict:
    """A PyTorch state_dict (bare or nested, e.g. `{'model': ...}`) of model `name` ->
    `{'params', 'batch_stats'}` of `models.get_model(name, num_classes)`.

    `prefix` takes the tensors under it, e.g. 'student.' of a distiller's whole state_dict
    (`unwrap_state_dict`).
    """
    if prefix:
        state_dict = unwrap_state_dict(state_dict, prefix)
    return _converter(name, 0)(state_dict, name, num_classes)


def to_torch(variables: Mapping, name: str, num_classes: int) -> dict:
    """The reverse of `from_torch`: Flax variables -> the PyTorch state_dict of model `name`."""
    return _converter(name, 1)(variables, name, num_classes)


# -------------------------------------------------------------------------------------- files


# torch.save writes a zip archive (starting with a local file header, even when truncated); its
# legacy format starts with a pickled magic number: the PROTO opcode of pickle protocols 2+, or
# the LONG opcode of protocols 0 and 1.
_ZIP_START = b"PK\x03\x04"
_PICKLE_STARTS = (b"\x80", b"L")


def _not_a_checkpoint(path: str) -> str | None:
    """Why the file at `path` cannot be a torch.save checkpoint, or None when it may be one."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return f"{path} is empty: copy or download the checkpoint again"
    if head.startswith(safetensors_io.GIT_LFS_POINTER):
        return (
            f"{path} is a Git LFS pointer, not the checkpoint: fetch the file itself with"
            " `git lfs pull` in the repository it came from (or download it directly)"
        )
    header_size = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{" and header_size <= os.path.getsize(path) - 8:
        return (
            f"{path} is a safetensors file: give it the {SAFETENSORS_SUFFIX} suffix, under which"
            " it is read as one"
        )
    if zipfile.is_zipfile(path):
        return _not_torch_zip(path)
    if head.startswith((_ZIP_START, *_PICKLE_STARTS)):
        return None  # torch.save's (maybe truncated: torch.load says what is wrong).
    if tarfile.is_tarfile(path):
        return None  # torch.load still reads the tar archives of PyTorch before 0.1.10.
    return (
        f"{path} is not a PyTorch checkpoint (neither the zip archive torch.save writes nor its"
        f" legacy pickle; it starts with {head[:16]!r}): check that it is the right file and that"
        " its download or copy is complete"
    )


def _not_torch_zip(path: str) -> str | None:
    """Why the zip archive at `path` is none torch.save wrote (which holds `<name>/data.pkl`),
    or None when it may be one."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None  # Damaged: torch.load says how.
    if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
        return None
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    npz = " (a NumPy .npz?)" if names and all(n.endswith(".npy") for n in names) else ""
    return (
        f"{path} is a zip archive that torch.save did not write: it holds {shown or 'nothing'}"
        f"{npz}, and no data.pkl. Give the PyTorch checkpoint itself, or save those arrays under"
        " the PyTorch model's state_dict keys as a .safetensors file (safetensors.numpy.save_file)"
        " and import that"
    )


def _pickle_protocol(path: str) -> int | None:
    """The pickle protocol a torch.save file was written with (0 for protocols 0 and 1, which
    carry no marker), or None where that cannot be told."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if not names:
                    return None
                with archive.open(names[0]) as f:
                    head = f.read(2)
        else:
            with open(path, "rb") as f:
                head = f.read(2)
    except (OSError, zipfile.BadZipFile):
        return None
    if head[:1] == b"\x80" and len(head) == 2:
        return head[1]
    return 0 if head else None


def load_torch_file(path: str) -> Any:
    """`torch.load(path, map_location='cpu', weights_only=True)`, with readable errors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    why = _not_a_checkpoint(path)  # Before PyTorch: installing it would not help.
    if why is not None:
        raise InteropError(why)
    torch = import_torch()
    try:
        with _allowed_globals(torch):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = _torch_reason(e)
        # weights_only's unpickler reads pickle protocols 2 and 3 only: torch.save(...,
        # pickle_protocol=4 or 5, or 0 or 1) writes files it refuses opcode by opcode.
        protocol = _pickle_protocol(path)
        if reason.startswith("Unsupported operand") and protocol not in (2, 3, None):
            written = "0 or 1" if protocol == 0 else str(protocol)
            raise InteropError(
                f"{path} was saved with pickle protocol {written}, which"
                " torch.load(weights_only=True) cannot read (it reads protocols 2 and 3), and"
                " files are not unpickled otherwise here: save it again with torch.save's default"
                " protocol (in PyTorch, if you trust the file: torch.save(torch.load(PATH,"
                " weights_only=False), NEW_PATH)) and convert that"
            ) from None
        # Another opcode it refuses means damaged bytes; anything else weights_only refuses (a
        # global, a class, a call; worded differently across torch versions) is an object it
        # will not build.
        if reason.startswith("Unsupported operand"):
            raise InteropError(
                f"{path} is not a readable PyTorch file (damaged, or not a checkpoint): {reason}"
            ) from None
        raise InteropError(
            f"{path} holds objects other than tensors and plain containers, and is not unpickled"
            f" here (torch.load weights_only=True: {reason}). If you trust the file,"
            " save its weights alone in PyTorch and convert that: torch.save(state_dict,"
            " 'weights.pth')."
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError, TypeError) as e:
        # What torch.load raises on a damaged file varies with where the damage is.
        raise InteropError(
            f"{path} is not a readable PyTorch file (damaged or truncated?): {_torch_reason(e)}"
        ) from None


# What checkpoints hold beside their tensors that weights_only may build: RepDistiller's
# `{model}_last.pth` saves its command line's options (`'opt'`), an argparse.Namespace, which
# only sets attributes when rebuilt (no code runs).
_SAFE_GLOBALS = (argparse.Namespace,)


def _allowed_globals(torch):
    """A context in which torch.load(weights_only=True) also builds `_SAFE_GLOBALS` (torch >=
    2.4; before, such a file is refused, with the message of any other object)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    return safe_globals(list(_SAFE_GLOBALS)) if safe_globals else contextlib.nullcontext()


def _torch_reason(error: Exception) -> str:
    """What a torch.load error says went wrong, without the general advice around it."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    if "WeightsUnpickler error:" in text:
        # weights_only's message: advice, then the reason, then more advice; the reason is what
        # tells the user what the file holds.
        text = text.split("WeightsUnpickler error:", 1)[1]
        for advice in (" Please use ", " Check the documentation "):
            text = text.split(advice, 1)[0]
        return text.strip()
    if isinstance(error, RuntimeError) and text:
        return text
    # Other types carry no sentence (KeyError: 101, or an empty EOFError): name the type.
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _restore_numpy(path: str) -> dict:
    """An orbax pytree checkpoint at `path`, restored as host numpy arrays in its saved tree."""
    import jax  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    checkpointer = ocp.PyTreeCheckpointer()
    # A CheckpointManager item (STEP/state) keeps its _CHECKPOINT_METADATA one level up, which
    # orbax reports as a warning that means nothing here.
    with _absl_quiet():
        tree = checkpointer.metadata(path).item_metadata.tree
        # Host numpy: no device, mesh or saved sharding is needed to read the values back.
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))


@contextlib.contextmanager
def _absl_quiet():
    """Only absl errors are logged inside the block."""
    from absl import logging  # pylint: disable=g-import-not-at-top

    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def read_dfa_variables(path: str, teacher_epoch: str | None = None) -> tuple[dict, str]:
    """The `{'params', 'batch_stats'}` of a network dfa_jax trained, and where they were found.

    `path` is teacher variables (whatever `teacher.resolve_checkpoint` accepts: the variables
    directory, a teacher stage directory, a workdir; a student trained in a cohort, which exports
    its variables there) or a stage directory with checkpoints, `WORKDIR/distill/<label>`, whose
    latest checkpoint's `params['student']` is taken (a stage without a student, e.g. an
    unfinished teacher, gives its own params).

    Of a workdir or its teacher stage, the teacher the run distilled from is taken: its best or
    last epoch's variables as the workdir's config.json records `teacher.distill_from` (the last
    epoch's without a config.json), or those of the config's `teacher.checkpoint` where the run
    loaded its teacher. `teacher_epoch` ('best' or 'last') overrides the recorded choice.
    """
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    from etils import epath  # pylint: disable=g-import-not-at-top

    from dfa_jax import train_loop  # pylint: disable=g-import-not-at-top

    if teacher_epoch not in (None, "best", "last"):
        raise InteropError(f"teacher_epoch = {teacher_epoch!r}: use 'best', 'last' or None")
    root = epath.Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    variables_dir, which = _teacher_variables(path, teacher_epoch)
    if variables_dir is not None:
        restored = _restore_numpy(variables_dir)
        variables = {"params": restored["params"], "batch_stats": restored["batch_stats"]}
        return variables, f"variables {variables_dir}{which}"

    checkpoints = root / "checkpoints"
    step = ocp.CheckpointManager(checkpoints).latest_step() if checkpoints.is_dir() else None
    if step is None:
        seeds = _seed_directories(root)
        if seeds:
            raise FileNotFoundError(
                f"{path} is a stage of several seeds, one student in each: export one of"
                f" {', '.join(seeds)}"
            )
        distill = root / "distill"
        stages = sorted(str(p) for p in distill.iterdir() if p.is_dir()) if distill.is_dir() else []
        found = f" Its distilled students: {', '.join(stages)}." if stages else ""
        raise FileNotFoundError(
            f"{path} holds neither teacher variables (WORKDIR/teacher/variables, WORKDIR/teacher"
            f" or WORKDIR) nor a stage's checkpoints (WORKDIR/distill/<label>).{found}"
        )
    if teacher_epoch is not None:
        raise InteropError(
            f"--{teacher_epoch} chooses a teacher's epoch, and {path} holds no teacher variables"
            " (it is a stage with checkpoints, whose latest is exported): drop the flag"
        )
    state = _restore_numpy(str(checkpoints / str(step) / "state"))
    params, batch_stats = state["params"], state["batch_stats"]
    where = f"{checkpoints / str(step)}"
    if "student" in params:
        params, batch_stats = params["student"], batch_stats["student"]
        where += " (the student)"
    if not train_loop.is_done(str(root)):
        print(
            f"note: {path} has no {train_loop.RESULT_FILE}: the stage is unfinished; exporting"
            f" its latest checkpoint, step {step}",
            file=sys.stderr,
        )
    return {"params": params, "batch_stats": batch_stats}, where


def _seed_directories(root) -> list[str]:
    """The `seed<k>` directories of a multi-seed run's `distill/<label>`, by seed."""
    found = [p for p in root.iterdir() if re.fullmatch(r"seed\d+", p.name) and p.is_dir()]
    return [str(p) for p in sorted(found, key=lambda p: int(p.name[4:]))]


def _teacher_variables(path: str, teacher_epoch: str | None) -> tuple[str | None, str]:
    """(The teacher variables directory `path` gives, ' (which epoch's, and why)'), or
    (None, '') when `path` holds none (e.g. a distilled student's stage)."""
    from dfa_jax import config_lib, teacher  # pylint: disable=g-import-not-at-top

    config_path, config = _recorded_config(path)
    if teacher_epoch is not None:
        best, why = teacher_epoch == "best", f"as --{teacher_epoch} asks"
    elif config is not None:
        # A config.json from before the field was added: those runs distilled from the last epoch.
        before = config_lib.VALUES_BEFORE_THE_FIELD["teacher.distill_from"]
        distill_from = config.get("teacher", {}).get("distill_from", before)
        best = distill_from == "best"
        why = f"the run distilled from it: teacher.distill_from = {distill_from!r} in {config_path}"
    else:
        best = False
        why = "no config.json records which one the run distilled from; --best takes the best"
        why += " epoch's"

    def resolve(candidate):
        try:
            return teacher.resolve_checkpoint(candidate, best=best)
        except (FileNotFoundError, errors.InputError):
            return None

    source, found = path, resolve(path)
    loaded = (config or {}).get("teacher", {}).get("checkpoint")
    if found is None and loaded:
        # The run loaded its teacher from elsewhere: WORKDIR/teacher holds no variables of its own.
        source, found = loaded, resolve(loaded)
        if found is None:
            raise FileNotFoundError(
                f"{path}'s run loaded its teacher from teacher.checkpoint = {loaded!r}"
                f" ({config_path}), which holds no teacher variables seen from here (a path"
                " relative to where the run started?): export that directory itself"
            )
    if found is None:
        return None, ""
    loaded_note = f"the teacher the run loaded, teacher.checkpoint = {loaded!r}"
    if not _is_a_teacher_stages(found, source):
        # Variables named directly (or a cohort student's): nothing was chosen.
        if teacher_epoch is not None:
            named = path if source == path else f"{path}'s {loaded_note},"
            raise InteropError(
                f"--{teacher_epoch} chooses between a teacher stage's variables, and {named} names"
                " variables themselves: give a workdir or teacher stage, or drop the flag"
            )
        return found, "" if source == path else f" ({loaded_note} in {config_path})"
    if source != path:
        why = f"{loaded_note}; {why}"
    if best and os.path.basename(found) != teacher.BEST_VARIABLES_DIR:
        if teacher_epoch == "best":
            raise InteropError(
                f"{path} has no {teacher.BEST_VARIABLES_DIR} (a teacher stage of an older"
                " version): pass --last, or no flag"
            )
        why += f"; it has no {teacher.BEST_VARIABLES_DIR} (a teacher stage of an older version)"
    epoch = "best" if os.path.basename(found) == teacher.BEST_VARIABLES_DIR else "last"
    return found, f" (the {epoch} epoch's, {why})"


def _is_a_teacher_stages(variables_dir: str, source: str) -> bool:
    """Whether `teacher.resolve_checkpoint(source)` chose `variables_dir` among the variables of
    a teacher stage (`source` a workdir or its teacher stage), rather than being given it."""
    from dfa_jax import files, teacher  # pylint: disable=g-import-not-at-top

    stage = os.path.dirname(variables_dir)
    source = files.absolute(source).rstrip("/")
    return os.path.basename(variables_dir) in (
        teacher.VARIABLES_DIR,
        teacher.BEST_VARIABLES_DIR,
    ) and (
        stage == os.path.join(source, "teacher") or (stage == source and _is_teacher_dir(source))
    )


def _is_teacher_dir(path: str) -> bool:
    return os.path.basename(path.rstrip("/")) == "teacher"


def _recorded_config(path: str) -> tuple[str | None, dict | None]:
    """(config.json, its content) of the workdir `path` is, or whose teacher stage it is."""
    from dfa_jax import files, workdir  # pylint: disable=g-import-not-at-top

    directories = [path]
    if _is_teacher_dir(path):
        directories.append(os.path.dirname(path.rstrip("/")))
    for directory in directories:
        config_path = os.path.join(directory, workdir.CONFIG_FILE)
        if files.exists(config_path):
            try:
                return config_path, files.read_json(config_path)
            except (OSError, ValueError):
                return config_path, None  # Unreadable: as if no config recorded the choice.
    return None, None


# ---------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dfa_jax.interop",
        description="Convert Wide ResNets (WideResNet-pytorch / RepDistiller /"
        " overhaul-distillation layout), the DFA authors' ShuffleNetV2 and RepDistiller's /"
        " mdistiller's CIFAR ResNets, VGGs, MobileNetV2, ShuffleV1, ShuffleV2 and ResNet50"
        " between PyTorch state_dicts and dfa_jax.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument(
            "--model",
            required=True,
            help="wrn_{depth}_{width} (e.g. wrn_28_4), shufflenet_v2_{0.5,1.0,2.0}, or"
            " RepDistiller's names (resnet*, vgg*, MobileNetV2, ShuffleV1, ShuffleV2, ResNet50)",
        )
        p.add_argument("--num-classes", type=int, required=True, help="classifier outputs")
        p.add_argument(
            "--force",
            action="store_true",
            help="overwrite the output if it exists (import: only a variables directory)",
        )

    imp = sub.add_parser(
        "import",
        help="a PyTorch .pth or a .safetensors -> teacher variables for"
        " --config.teacher.checkpoint",
        description="Writes the teacher variables directory that --config.teacher.checkpoint=OUT"
        " loads. The .pth may hold the bare state_dict or nest it under 'state_dict', 'model'"
        " or 'net'; it is read with weights_only=True. A .safetensors file (the same keys) needs"
        " no PyTorch.",
    )
    common(imp)
    imp.add_argument(
        "--prefix",
        help="take only the tensors whose keys start with PREFIX, without it: one network of a"
        " checkpoint holding several (e.g. 'student.' of a distiller's state_dict; mdistiller's"
        " 'module.student.')",
    )
    imp.add_argument("source", help="PyTorch checkpoint (.pth / .pt) or .safetensors")
    imp.add_argument("out", help="output directory (teacher variables)")

    exp = sub.add_parser(
        "export",
        help="dfa_jax variables (teacher or distilled student) -> a PyTorch .pth state_dict"
        " or a .safetensors file (no PyTorch needed)",
        description="SOURCE: teacher variables (WORKDIR/teacher/variables, WORKDIR/teacher or"
        " WORKDIR) or a distilled student's stage (WORKDIR/distill/<label>; its latest"
        " checkpoint). Of WORKDIR or WORKDIR/teacher, the teacher the run distilled from: its best"
        " or last epoch's as the workdir's config.json records teacher.distill_from (--best or"
        " --last choose). Writes a state_dict that load_state_dict(strict=True) accepts.",
    )
    common(exp)
    epoch = exp.add_mutually_exclusive_group()
    for flag in ("best", "last"):
        epoch.add_argument(
            f"--{flag}",
            dest="teacher_epoch",
            action="store_const",
            const=flag,
            help=f"of a workdir's teacher, export the {flag} epoch's variables whatever the run"
            " distilled from",
        )
    exp.add_argument("source", help="variables directory, teacher stage, workdir or distill stage")
    exp.add_argument("out", help="output .pth file, or .safetensors (written without PyTorch)")
    return parser


def _check_output(command: str, out: str, force: bool) -> None:
    """Refuses, before any file is read, an output the command cannot write or must not replace.

    `import --force` replaces only a variables directory (or an empty one): OUT named by
    mistake (a workdir, the arguments swapped) is never deleted.
    """
    if command == "import":
        from dfa_jax import teacher  # pylint: disable=g-import-not-at-top

        if not os.path.lexists(out):
            return
        if not force:
            raise FileExistsError(f"{out} exists; pass --force to overwrite it")
        if os.path.isdir(out) and (teacher.is_variables_dir(out) or not os.listdir(out)):
            return
        if os.path.isdir(out):
            names = sorted(os.listdir(out))
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            what = f"a directory holding {shown}"
        else:
            what = "a file"
        raise InteropError(
            f"{out} is {what}, not a variables directory (one holding"
            f" {' or '.join(teacher.VARIABLES_MARKERS)}), and --force replaces only variables:"
            " give another OUT, or remove it yourself if it is to go"
        )
    if os.path.isdir(out):
        raise InteropError(
            f"{out} is a directory: give the file to write, e.g."
            f" {os.path.join(out, 'model.pth')} (or .safetensors)"
        )
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise InteropError(f"{out}: its directory {parent} does not exist; create it first")
    if os.path.lexists(out) and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")


def _write_atomically(path: str, write) -> None:
    """`write(tmp)` to a temporary file beside `path`, renamed to `path` once complete: a failed
    write leaves any old file whole and no temporary file behind."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError.
        raise InteropError(f"cannot write {path}: {_torch_reason(e)}") from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; a user's mistake exits with 'error: ...' and no traceback."""
    args = _parser().parse_args(argv)
    try:
        _converter(args.model, 0)  # An unconvertible name fails before any file is read.
        if args.num_classes < 1:
            raise InteropError(f"--num-classes must be positive, got {args.num_classes}")
        _check_output(args.command, args.out, args.force)
        if args.command == "import":
            if args.source.endswith(SAFETENSORS_SUFFIX):
                if not os.path.isfile(args.source):
                    raise FileNotFoundError(f"{args.source}: no such file")
                state = safetensors_io.load(args.source)[0]
            else:
                state = load_torch_file(args.source)
            variables = from_torch(state, args.model, args.num_classes, prefix=args.prefix)
            from dfa_jax import teacher  # pylint: disable=g-import-not-at-top

            teacher.save_variables(args.out, variables)
            print(
                f"wrote {os.path.abspath(args.out)} ({args.model}, {args.num_classes} classes);"
                f" use it with --config.teacher.checkpoint={args.out}"
                f" --config.teacher.model={args.model}"
            )
        else:
            safetensors = args.out.endswith(SAFETENSORS_SUFFIX)
            torch = None if safetensors else import_torch()
            variables, where = read_dfa_variables(args.source, args.teacher_epoch)
            state = to_torch(variables, args.model, args.num_classes)
            if safetensors:
                # `safetensors.torch.save_file`'s own metadata, so PyTorch tools read it as theirs.
                arrays = {k: np.asarray(v) for k, v in state.items()}
                try:
                    safetensors_io.save(args.out, arrays, {"format": "pt"})
                except OSError as e:
                    raise InteropError(f"cannot write {args.out}: {e}") from None
            else:
                _write_atomically(args.out, functools.partial(torch.save, state))
            print(
                f"wrote {os.path.abspath(args.out)} ({args.model}, {args.num_classes} classes)"
                f" from {where}"
            )
    except (errors.InputError, ImportError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
