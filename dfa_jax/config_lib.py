"""The base configuration (every field, one comment each) and `validate`.

Experiment files in `configs/` start from `base_config()` and override what differs; library code
reads `config.x` and never supplies its own defaults, so this file is the one source of them
(a registered method brings its own `baselines` fields: `method_registry.Method.fields`).
`validate(config)` runs before anything is built and reports every mistake it finds, each naming
the field and the fix: its own checks, and those each component owns (every method's
`Implementation.check`, the data source's `Source.check`, the model families' names).
"""

from __future__ import annotations

import math
import os
import re

import ml_collections
from ml_collections.config_dict import placeholder  # Optional fields the command line can set.

from dfa_jax import baseline_presets
from dfa_jax import errors
from dfa_jax import method_registry

# Stages the pipeline knows, in the order it runs them.
STAGES = ("teacher", "search", "distill")
# DFA's aggregations (Table 5; 'file': DFA-T): the labels of its runs, `distill.aggregation`.
AGGREGATIONS = method_registry.REGISTRY["dfa"].labels
SCHEDULES = ("step", "cosine", "constant")


def __getattr__(name: str):
    # METHODS, the registered distillation methods (Table 2), read when asked: a method
    # registered after this import is among them.
    if name == "METHODS":
        return method_registry.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


ConfigError = errors.ConfigError  # Re-exported: config files and callers catch it here.


# `config.matmul_precision`'s values, as `jax.default_matmul_precision` names them.
MATMUL_PRECISIONS = ("tensorfloat32", "float32", "default")


def optim_recipe(name: str) -> ml_collections.ConfigDict:
    """The optimiser recipes of the paper and its peers, as a ConfigDict to assign to `*.optim`.

    Args:
      name: 'paper' (Zagoruyko & Komodakis' WRN recipe the paper uses: SGD 0.1, momentum 0.9,
        wd 5e-4, x0.2 at epochs 60/120/160 of 200, batch 128), 'overhaul' (Heo et al.: /10 at 100
        and /100 at 150 of 200; their script builds a new optimizer at each, zeroing the
        momentum, which this recipe keeps) or 'cinic' (the paper's CINIC-10 recipe: lr 0.01, x0.1 at
        100/120 of 140, batch 96), these three with Nesterov momentum, for teachers and students
        alike: the paper does not say, and the authors' teachers (github.com/PkuDavidGuan/
        Distillation, `simple_train.py`: `SGD(..., momentum=0.9, nesterov=True,
        weight_decay=0.0005)`), their students and overhaul-distillation's all use it; or 'crd'
        (RepDistiller's CIFAR-100 recipe: plain momentum, no Nesterov).
    """
    c = ml_collections.ConfigDict()
    c.epochs = 200  # Training epochs.
    c.batch_size = 128  # Global batch size (split across all devices of all hosts).
    c.lr = 0.1  # Peak learning rate.
    c.momentum = 0.9  # SGD momentum.
    c.nesterov = True  # Nesterov momentum (the authors' simple_train.py and train.py).
    c.weight_decay = 5e-4  # Coupled L2 weight decay, as PyTorch's SGD(weight_decay=...).
    c.schedule = "step"  # 'step' (piecewise constant), 'cosine' or 'constant'.
    c.milestones = (60, 120, 160)  # 'step': epochs where the lr is multiplied by `decay`.
    c.decay = 0.2  # 'step': multiplicative factor at each milestone.
    if name == "paper":
        pass
    elif name == "overhaul":
        c.milestones = (100, 150)
        c.decay = 0.1
    elif name == "cinic":
        c.epochs = 140
        c.batch_size = 96
        c.lr = 0.01
        c.milestones = (100, 120)
        c.decay = 0.1
    elif name == "crd":
        # RepDistiller's CIFAR-100 recipe (`train_teacher.py`, `train_student.py`), which
        # mdistiller's CIFAR-100 configs keep (`configs/cifar100/*.yaml`: SOLVER): plain SGD, no
        # Nesterov, for teachers and students alike.
        c.epochs = 240
        c.batch_size = 64
        c.lr = 0.05
        c.nesterov = False
        c.milestones = (150, 180, 210)
        c.decay = 0.1
    else:
        raise ConfigError(
            f"unknown optimiser recipe {name!r}; use 'paper', 'overhaul', 'cinic' or 'crd'"
        )
    return c


# RepDistiller's CIFAR-100 benchmark (Tian et al., CRD, ICLR 2020; README "Benchmark Results on
# CIFAR-100"), teacher -> student, as later papers (DKD and its successors) compare on it. The
# last six pair networks whose groups end at other spatial sizes (e.g. resnet32x4's 32/16/8
# against ShuffleV1's 16/8/4): there the teacher's maps are average-pooled to the student's
# (mdistiller's OFD), and FitNets' and AB's regressors resize as RepDistiller's ConvReg.
CRD_PAIRS = (
    ("wrn_40_2", "wrn_16_2"),
    ("wrn_40_2", "wrn_40_1"),
    ("resnet56", "resnet20"),
    ("resnet110", "resnet20"),
    ("resnet110", "resnet32"),
    ("resnet32x4", "resnet8x4"),
    ("vgg13", "vgg8"),
    ("vgg13", "MobileNetV2"),
    ("ResNet50", "MobileNetV2"),
    ("ResNet50", "vgg8"),
    ("resnet32x4", "ShuffleV1"),
    ("resnet32x4", "ShuffleV2"),
    ("wrn_40_2", "ShuffleV1"),
)
# Students RepDistiller trains at lr 0.01 instead of 0.05 (`train_student.py`; mdistiller's
# configs for these students set SOLVER.LR 0.01 too).
LIGHT_STUDENTS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")
# RepDistiller's (and mdistiller's) CIFAR-100 normalisation, in [0, 1] units.
CRD_MEAN = (0.5071, 0.4867, 0.4408)
CRD_STD = (0.2675, 0.2565, 0.2761)


def base_config() -> ml_collections.ConfigDict:
    """Every field of a dfa_jax run with its default (CIFAR-100, pair 1, the paper's recipe)."""
    config = ml_collections.ConfigDict()
    config.seed = 0  # Seeds parameter init, data order, augmentation and the search/val split.
    config.stages = ("teacher",)  # Stages the pipeline runs, in order (a subset of STAGES).

    # --- data ----------------------------------------------------------------------------------
    config.data = data = ml_collections.ConfigDict()
    data.dataset = "cifar100"  # 'cifar100' | 'cifar10' | 'cinic10' | 'digits' (sets classes and normalisation).
    data.source = (
        "tfds"  # 'tfds' | 'image_folder' | 'npz' | 'bundled' (digits, ships with scikit-learn).
    )
    data.data_dir = placeholder(str)  # tfds data_dir (a gs:// path works); None = tfds' default.
    data.path = placeholder(
        str
    )  # image_folder root (split/class/*.png) or npz directory/glob ({split}_*.npz).
    data.npz_image_key = "images"  # npz: key of the uint8 [N, 32, 32, 3] images.
    data.npz_label_key = "labels"  # npz: key of the integer [N] labels.
    data.train_split = "train"  # Split the models train on.
    data.test_split = "test"  # Split evaluated every epoch (best and last accuracy).
    data.val_split = placeholder(
        str
    )  # Split for the search's beta updates; None = carve it out of train (7:3).
    data.search_val_fraction = 0.3  # Fraction of train held out for beta when val_split is None.
    data.max_train_examples = placeholder(
        int
    )  # Keep only this many training examples (tiny runs); None = all.
    data.max_test_examples = placeholder(
        int
    )  # Keep only this many test examples (tiny runs); None = all.
    data.augment = (
        "pad_crop"  # 'pad_crop' (CIFAR: pad + random crop) | 'random_resized_crop' (CINIC).
    )
    # Per-channel (R, G, B) normalisation in [0, 1] units; None = the dataset's (overhaul's CIFAR
    # statistics). Set them to what an imported teacher was trained with, e.g. RepDistiller's
    # CIFAR-100: mean (0.5071, 0.4867, 0.4408), std (0.2675, 0.2565, 0.2761).
    data.mean = placeholder(tuple)
    data.std = placeholder(tuple)
    data.pad = 4  # Augmentation: pixels of padding before the random 32x32 crop (0 disables).
    data.pad_mode = "reflect"  # 'reflect' (the paper's recipe) or 'constant' (zeros).
    data.flip = True  # Augmentation: random horizontal flip.
    data.prefetch = 2  # Batches placed on the devices ahead of the step.
    # Global batch size for evaluation, rounded up to a multiple of the device count (the last
    # batch is padded and masked, so neither changes a result).
    data.eval_batch_size = 500

    # --- teacher stage -------------------------------------------------------------------------
    config.teacher = teacher = ml_collections.ConfigDict()
    teacher.model = "wrn_28_4"  # Teacher architecture (see dfa_jax.models.MODEL_NAMES).
    teacher.checkpoint = placeholder(
        str
    )  # Load the teacher from this checkpoint dir instead of training one.
    teacher.optim = optim_recipe("paper")  # Teacher training recipe.
    # Which teacher the search and distillation use: 'best' (the epoch of highest test accuracy,
    # as the authors did) or 'last'. Also picks best_variables/ of a workdir given as checkpoint.
    teacher.distill_from = "best"

    # --- student -------------------------------------------------------------------------------
    config.student = student = ml_collections.ConfigDict()
    student.model = "wrn_16_4"  # Student architecture: the teacher's group count, maps no larger.

    # --- features ------------------------------------------------------------------------------
    config.features = ml_collections.ConfigDict()
    config.features.clamp_min = -1.0  # Teacher maps enter the losses as max(x, clamp_min) (§3.4).

    # --- stage 1: aggregation search (§3.2; README, design notes) -----------------------------
    config.search = search = ml_collections.ConfigDict()
    search.epochs_per_group = 40  # Epochs of bilevel updates per layer group (Algorithm 1).
    search.batch_size = 128  # Global batch size of both the train (w) and val (beta) batches.
    search.w_lr = 0.05  # w (student + connectors): SGD, cosine from this (see w_schedule).
    # 'global': one cosine over every group's epochs, DARTS' one cosine over its search (of three
    # groups, group 2 is searched at lr 0.0375 -> 0.0125, group 3 at 0.0125 -> 0); 'per_group':
    # the cosine restarts for each group, Algorithm 1's repeated inner loop. The paper does not
    # say (docs/design.md, "The search, our reading of §3.2").
    search.w_schedule = "global"
    search.w_momentum = 0.9  # w's SGD momentum.
    search.w_weight_decay = 5e-4  # w's coupled weight decay.
    search.beta_lr = 1e-3  # beta: Adam learning rate (§3.4).
    search.beta_b1 = 0.5  # beta: Adam beta1 (§3.4: momentum (0.5, 0.999)).
    search.beta_b2 = 0.999  # beta: Adam beta2.
    search.beta_weight_decay = 1e-3  # lambda of lambda*R(beta): coupled L2 on beta (0 allowed).
    # beta init: zeros but the last map's logit (alpha_last 0.982 / 0.948 / 0.886 for 2 / 4 / 8).
    search.init_last_logit = 4.0
    search.order = 1  # 1: first-order beta gradient; 2: exact second order (through w's step).
    search.gamma_st = 1e-3  # Weight of the student-to-teacher loss in the bridge loss (Eq. 12).
    search.gamma_ts = 1.0  # Weight of the teacher-to-student loss in the bridge loss (Eq. 12).

    # --- stage 2: distillation (§3.1; README, design notes) --------------------------------------
    config.distill = distill = ml_collections.ConfigDict()
    distill.method = "dfa"  # One of METHODS: the student the distill stage trains.
    # With method 'dfa': 'dfa' (this run's search) | 'last' | 'average' | 'random' | 'file' |
    # 'start' (the search's starting alpha, unsearched: a control for 'dfa').
    distill.aggregation = "dfa"
    distill.alpha_file = placeholder(str)  # 'file': an alpha.json of another run (DFA-T).
    distill.compare_with = ()  # More students after the main one: methods or DFA aggregations.
    # Every label's students are initialised with each of these seeds (empty: `seed`); batches and
    # augmentation are the run's (`seed`). With several, WORKDIR/distill/<label>/seed<k>/.
    distill.seeds = ()
    # The students (but FT's and AB's) train in one step sharing the teacher's forward (cohort.py):
    # at most this many per step (0: all), and 'loop' | 'vmap' over each method's ('auto': loop on
    # CPUs).
    distill.max_students_per_step = 0
    distill.cohort = "auto"
    # Distillation positions of DFA and its aggregations: 'groups' (the group ends) or
    # 'stem_and_groups' (a WRN's pre-ReLU stem too, weight 1/8, as the authors' baselines had it).
    distill.positions = "groups"
    distill.distance = "partial_l2"  # 'partial_l2' (overhaul's, with `margin`) or 'l2'.
    distill.margin = -1.0  # partial_l2's margin: the paper keeps teacher values >= -1.
    distill.gamma_fd = 1e-3  # gamma_fd of L = CE + gamma_fd * L_fd (Eq. 4).
    # Teacher BatchNorm: 'eval' (running stats) or 'batch' (overhaul). Margin has its own
    # (baselines.margin_teacher_bn); Jacobian and FT's and AB's first stages always use 'eval'.
    distill.teacher_bn = "eval"
    distill.optim = optim_recipe("paper")  # Student recipe (the paper's, with Nesterov).

    # --- baselines of Table 2 (weights: RepDistiller's CIFAR-100 commands unless noted) --------
    config.baselines = base = ml_collections.ConfigDict()
    # Whose settings KD, AT, SP and Margin run with: 'peers' (these fields, RepDistiller's) or
    # 'authors' (the DFA authors' own baseline code: dfa_jax/baseline_presets.py says which).
    base.preset = "peers"
    base.kd_temperature = 4.0  # KD: T (RepDistiller -T 4; the DFA authors' pair scripts too).
    base.kd_weight = 0.9  # KD: weight of T^2 KL (RepDistiller -a 0.9).
    base.kd_ce_weight = 0.1  # KD: weight of the label cross-entropy (RepDistiller -r 0.1).
    base.fitnets_weight = 100.0  # FitNets: hint weight at the middle group (RepDistiller -b 100).
    base.at_weight = 1000.0  # AT: weight of the summed group-end AT losses (RepDistiller -b 1000).
    base.sp_weight = 3000.0  # SP: weight on the last group end (RepDistiller -b 3000).
    base.ft_weight = 200.0  # FT: factor-transfer weight (RepDistiller -b 200).
    base.ft_rate = 0.5  # FT: paraphraser factor channels / teacher channels (RepDistiller k=0.5).
    base.ft_pretrain_epochs = 30  # FT: paraphraser pre-training epochs (RepDistiller init_epochs).
    # FT: the paraphraser's pre-training lr (plain SGD, momentum, weight decay, constant): 0.01,
    # RepDistiller's `helper/pretrain.py` for WRN/ResNet students, and its `train_student.py`
    # learning rate for light (ShuffleNet, MobileNet) students. RepDistiller's WRN students are
    # wrn_16_1/16_2/40_1/40_2; for the paper's wrn_16_4 and wrn_28_2 (pairs 1, 2) 0.01 is our
    # extension of its rule, not a setting it ran.
    base.ft_pretrain_lr = 0.01
    base.ab_margin = 1.0  # AB: activation-boundary margin m (RepDistiller).
    base.ab_init_epochs = 30  # AB: initialisation epochs before CE training (RepDistiller).
    # AB: the initialisation's lr (plain SGD, momentum, weight decay, constant): RepDistiller's
    # `helper/pretrain.py` uses the student's, 0.05 under its recipe (0.01 for light students;
    # `crd_pair`, `cinic10_pair`). 0.05 under the paper's recipe too, whose student lr is 0.1: the
    # rate AB's initialisation ran at in RepDistiller's results (it never ran one at 0.1), kept
    # as FT's 0.01 above is.
    base.ab_init_lr = 0.05
    # Jacobian: weight of the Sobolev term, as Knowledge-Distillation-Zoo's own
    # `example_train_script.sh` runs it (`--lambda_kd 20.0`; its argparse default 1.0 leaves the
    # term ~1e-3 of the loss).
    base.jacobian_weight = 20.0
    base.margin_gamma = 1e-3  # Margin (overhaul): weight of the partial-L2 term with BN margins.
    # Margin: the teacher's BatchNorm while distilling; 'batch' as overhaul-distillation's
    # `train_with_distillation.py` runs it (`t_net.train()`), 'eval' for running statistics.
    base.margin_teacher_bn = "batch"
    # The fields of methods registered beyond these (`method_registry.Method.fields`).
    for field, default in method_registry.fields().items():
        if field in base:
            raise ValueError(f"method field baselines.{field} is a field already")
        unset = isinstance(default, method_registry.Unset)
        base[field] = placeholder(default.kind) if unset else default

    # --- compute, logging, checkpoints ---------------------------------------------------------
    config.dtype = "float32"  # Compute dtype of convolutions and matmuls ('float32' | 'bfloat16').
    # How float32 convolutions and matmuls are computed where the hardware has a faster way:
    # 'tensorfloat32' (TF32 on a GPU, as PyTorch's convolutions run by default there; three
    # bfloat16 passes on a TPU, of like precision), 'float32' (full float32 everywhere) or
    # 'default' (the backend's fastest: TF32 on a GPU, one bfloat16 pass on a TPU, ~3 significant
    # digits). The CPU computes float32 whatever this says.
    config.matmul_precision = "tensorfloat32"
    # CPU-only hosts: JAX devices to split the CPU into; 0 = one per usable core (affinity,
    # container quota), or the most below that which divides every batch size.
    config.num_cpu_devices = 0
    # glibc keeps freed memory mapped (parallel.keep_freed_host_memory): +17 % for CPU steps, and
    # the process's resident memory stays at its peak. False: glibc's own behaviour.
    config.keep_freed_host_memory = True
    # Compiled steps are kept here and reused by resumed and repeated runs ('' = off;
    # JAX_COMPILATION_CACHE_DIR, if set, wins).
    config.compilation_cache_dir = "~/.cache/dfa_jax/xla"
    config.log_every_steps = 50  # Host sync, progress line and scalars every N steps.
    config.checkpoint_every_steps = (
        500  # Orbax checkpoint every N steps (and at the end of a stage).
    )
    config.checkpoints_to_keep = 2  # Newest checkpoints kept per stage.
    # A workdir holding a run of another config is an error; True moves that run aside into
    # WORKDIR/previous/<time>/ and starts over (refused on object stores, which cannot move it).
    config.restart = False
    return config


def cifar100_pair(student: str) -> ml_collections.ConfigDict:
    """Table 2's protocol: WRN_28_4 -> `student` on CIFAR-100, teacher -> search -> distill."""
    config = base_config()
    config.stages = ("teacher", "search", "distill")
    config.data.dataset = "cifar100"
    config.data.source = "tfds"
    config.teacher.model = "wrn_28_4"
    config.student.model = student
    config.search.epochs_per_group = 40
    config.distill.aggregation = "dfa"
    return config


def crd_pair(teacher: str, student: str) -> ml_collections.ConfigDict:
    """RepDistiller's CIFAR-100 protocol for `teacher` -> `student` (one of CRD_PAIRS), with DFA.

    The teacher and every student train with `optim_recipe('crd')` (lr 0.01 for the light
    students), on RepDistiller's augmentation (random crop of the zero-padded image, flip) and
    normalisation; DFA's search keeps the paper's settings (40 epochs per group on the 7:3
    split). A teacher imported from RepDistiller or mdistiller (`dfa_jax.interop import`) is
    given as `--config.teacher.checkpoint=DIR`.
    """
    config = base_config()
    config.stages = ("teacher", "search", "distill")
    config.data.dataset = "cifar100"
    config.data.source = "tfds"
    config.data.mean, config.data.std = CRD_MEAN, CRD_STD
    config.data.pad_mode = "constant"  # torchvision's RandomCrop(32, padding=4) pads zeros.
    config.teacher.model = teacher
    config.student.model = student
    config.teacher.optim = optim_recipe("crd")
    config.distill.optim = optim_recipe("crd")
    if teacher in LIGHT_STUDENTS:  # `train_teacher.py` trains these at 0.01 too.
        config.teacher.optim.lr = 0.01
    if student in LIGHT_STUDENTS:
        config.distill.optim.lr = 0.01
        # RepDistiller's AB initialisation runs at the student's rate (`helper/pretrain.py`).
        config.baselines.ab_init_lr = 0.01
    if not student.startswith(("resnet", "wrn_")):
        # FT's paraphraser pre-training (`helper/pretrain.py`): 0.01 for RepDistiller's resnet*
        # and wrn_* students, the student's own rate for every other (0.05 for vgg8).
        config.baselines.ft_pretrain_lr = config.distill.optim.lr
    # RepDistiller's and mdistiller's teachers are the last epoch's (`ckpt_epoch_240.pth`).
    config.teacher.distill_from = "last"
    config.search.epochs_per_group = 40
    config.distill.aggregation = "dfa"
    return config


def cinic10_pair(teacher: str, student: str) -> ml_collections.ConfigDict:
    """Table 4's protocol: ShuffleNetV2 `teacher` -> `student` on an image_folder CINIC-10."""
    config = base_config()
    config.stages = ("teacher", "search", "distill")
    config.data.dataset = "cinic10"
    config.data.source = "image_folder"
    config.data.augment = "random_resized_crop"
    config.data.val_split = "valid"  # The search trains beta on CINIC-10's own valid split.
    config.teacher.model = teacher
    config.student.model = student
    config.teacher.optim = optim_recipe("cinic")
    config.distill.optim = optim_recipe("cinic")
    config.search.epochs_per_group = 5
    config.search.batch_size = 96
    config.distill.aggregation = "dfa"
    # gamma_fd stays 1e-3: the paper gives none, and the authors' CINIC-10 ShuffleNetV2 feature
    # loss (their MarginReLU, `margin_ReLU_loss.py`, Table 4's Margin column) weighs 1e-3 as on
    # CIFAR, so DFA and the Margin baseline differ in their targets, not in their weight.
    # RepDistiller's learning rate for light (ShuffleNet) students, which its AB initialisation
    # takes over (`train_student.py`, `helper/pretrain.py`).
    config.baselines.ab_init_lr = 0.01
    return config


def distill_labels(config) -> list[str]:
    """The students the distill stage trains, in order: the main one, then `compare_with`.

    A label is a method, or for DFA its aggregation (so Table 5's rows are DFA runs).
    """
    main = config.distill.aggregation if config.distill.method == "dfa" else config.distill.method
    return [main] + [n for n in config.distill.compare_with if n != main]


def apply_arg(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """The config-file argument (`configs/x.py:tiny`): 'tiny' shrinks the run, nothing keeps it."""
    if arg == "tiny":
        return tiny(config)
    if arg:
        raise ConfigError(f"unknown config argument {arg!r}; use ':tiny' or nothing")
    return config


def tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks any config to seconds on a CPU (tests, smoke runs): tiny models, data and epochs."""
    config.teacher.model = "wrn_16_1"  # Two maps per group: something for the search to weigh.
    config.student.model = "wrn_10_1"
    config.data.max_train_examples = 64
    if "search" in config.stages:
        from dfa_jax import data as data_lib  # pylint: disable=g-import-not-at-top

        info = data_lib.DATASETS.get(config.data.dataset)
        if info is not None:
            # Two examples of each class, so that the search's 7:3 split of every class leaves
            # one on each side (CIFAR-100: 200; one each would leave the val split empty).
            config.data.max_train_examples = max(64, 2 * info.num_classes)
    config.data.max_test_examples = 32
    config.data.eval_batch_size = 16
    config.teacher.optim.epochs = 2
    config.teacher.optim.batch_size = 16
    config.teacher.optim.milestones = (1,)
    config.search.epochs_per_group = 1
    config.search.batch_size = 16
    config.distill.optim.epochs = 2
    config.distill.optim.batch_size = 16
    config.distill.optim.milestones = (1,)
    config.baselines.ft_pretrain_epochs = 1
    config.baselines.ab_init_epochs = 1
    config.log_every_steps = 2
    config.checkpoint_every_steps = 3
    return config


# ------------------------------------------------------------------------------------------------
# Validation: run before anything is built; each problem names the field and the fix.
# ------------------------------------------------------------------------------------------------


def _check_types(config, reference, prefix: str, problems: list[str]) -> None:
    """Every field of `reference` (base_config()) present in `config` with its type, and no other.

    ml_collections keeps most types on assignment but lets None, bools for integers, NaN and
    infinities, and tuples of anything through; the range checks need the types settled first.
    """
    import difflib  # pylint: disable=g-import-not-at-top
    import math  # pylint: disable=g-import-not-at-top
    import numbers  # pylint: disable=g-import-not-at-top

    nullable = ("features.clamp_min",)  # None is meaningful here (no clamp), not a placeholder.
    # Element types of tuples empty or unset by default.
    tuple_items = {
        "distill.compare_with": str,
        "distill.seeds": int,
        "data.mean": float,
        "data.std": float,
    }
    names = {bool: "True or False", int: "an integer", float: "a finite number", str: "a string"}
    plurals = {bool: "booleans", int: "integers", float: "finite numbers", str: "strings"}

    def fits(value, kind) -> bool:
        if kind is bool:
            return isinstance(value, bool)
        if kind is int:
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if kind is float:
            return (
                isinstance(value, numbers.Real)
                and not isinstance(value, bool)
                and math.isfinite(value)
            )
        return isinstance(value, kind)

    for key in reference:
        path = prefix + key
        default = reference[key]
        if key not in config:
            problems.append(f"{path} is missing; build the config from config_lib.base_config().")
            continue
        value = config[key]
        if isinstance(default, ml_collections.ConfigDict):
            if isinstance(value, ml_collections.ConfigDict):
                _check_types(value, default, path + ".", problems)
            else:
                problems.append(
                    f"{path} = {value!r}: must be a block of fields as in base_config(); drop"
                    " the override."
                )
            continue
        kind = reference.get_type(key)
        if kind is tuple:
            item = tuple_items.get(path, type(default[0]) if default else None)
            ok = isinstance(value, (tuple, list)) and (
                item is None or all(fits(v, item) for v in value)
            )
            what = f"a tuple of {plurals[item]}" if item in plurals else "a tuple"
        else:
            ok = fits(value, kind)
            what = names.get(kind, f"a {kind.__name__}")
        if ok or (value is None and (default is None or path in nullable)):
            continue
        if default is None:
            what = f"None or {what}"
        if value is None:
            problems.append(
                f"{path} is None but needs {what} (default {default!r}); set one or drop the"
                " override."
            )
        else:
            problems.append(f"{path} = {value!r}: must be {what} (default {default!r}).")
    for key in config:
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference.keys()), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            problems.append(
                f"{prefix}{key} is not a config field{hint}; remove it (config_lib.base_config()"
                " lists every field)."
            )


def _devices(count: int) -> str:
    return f"{count} device" if count == 1 else f"{count} devices"


def _check_optim(prefix: str, optim, device_count: int, problems: list[str]) -> None:
    if not optim.epochs > 0:
        problems.append(f"{prefix}.epochs = {optim.epochs}: must be a positive number of epochs.")
    if not optim.lr > 0:
        problems.append(f"{prefix}.lr = {optim.lr}: the learning rate must be positive.")
    if not optim.batch_size > 0:
        problems.append(f"{prefix}.batch_size = {optim.batch_size}: must be positive.")
    elif optim.batch_size % device_count:
        problems.append(
            f"{prefix}.batch_size = {optim.batch_size} is not divisible by the"
            f" {_devices(device_count)}; use a multiple of {device_count}."
        )
    if not 0 <= optim.momentum < 1:
        problems.append(f"{prefix}.momentum = {optim.momentum}: must lie in [0, 1) (paper: 0.9).")
    if optim.schedule not in SCHEDULES:
        problems.append(f"{prefix}.schedule = {optim.schedule!r}: use one of {SCHEDULES}.")
    if optim.weight_decay < 0:
        problems.append(f"{prefix}.weight_decay = {optim.weight_decay}: must be >= 0.")
    if not optim.decay > 0:
        problems.append(
            f"{prefix}.decay = {optim.decay}: the lr factor at each milestone must be positive"
            " (paper: 0.2)."
        )
    milestones = tuple(optim.milestones)
    if any(not 0 < m for m in milestones) or list(milestones) != sorted(set(milestones)):
        problems.append(
            f"{prefix}.milestones = {milestones}: use increasing positive epochs, e.g. (60, 120,"
            " 160)."
        )


def _is_remote(path: str) -> bool:
    return bool(re.match(r"^[a-z0-9]+://", path))


# Model name -> group shapes: an abstract trace each (~0.3 s), asked for on every validate.
_GROUP_SHAPES: dict[str, tuple[tuple[int, ...], ...]] = {}


def _group_shapes(model_name: str) -> tuple[tuple[int, ...], ...]:
    """Per group, the shape [1, H, W, C] of `model_name`'s maps (no compile), cached per name."""
    from dfa_jax import features  # pylint: disable=g-import-not-at-top
    from dfa_jax import models  # pylint: disable=g-import-not-at-top

    if model_name not in _GROUP_SHAPES:
        # The class count does not change the feature maps.
        shapes = features.group_shapes(models.get_model(model_name, 10))
        _GROUP_SHAPES[model_name] = tuple(tuple(shape) for shape in shapes)
    return _GROUP_SHAPES[model_name]


def group_sizes(model_name: str) -> tuple[int, ...]:
    """Per group, the spatial size H of `model_name`'s maps (no compile), cached per name."""
    return tuple(shape[1] for shape in _group_shapes(model_name))


def group_channels(model_name: str) -> tuple[int, ...]:
    """Per group, the channel count C of `model_name`'s maps (no compile), cached per name."""
    return tuple(shape[-1] for shape in _group_shapes(model_name))


def cpu_device_problems(config) -> list[str]:
    """num_cpu_devices' checks, cheap and without JAX: `main` runs them before JAX starts, where
    a count in the tens of thousands kept the start busy for minutes without a word."""
    count = config.num_cpu_devices
    if not isinstance(count, int) or isinstance(count, bool):
        return []  # The type check names it.
    if count < 0:
        return [
            f"num_cpu_devices = {count}: must be >= 0 (0 = one per usable core or the most below"
            " that which divides every batch size)."
        ]
    # (Importing JAX starts no backend: the device count can still be set after this.)
    from dfa_jax import parallel  # pylint: disable=g-import-not-at-top

    sizes = {
        field: size
        for field, size in parallel.global_batch_sizes(config).items()
        if isinstance(size, int) and not isinstance(size, bool) and size > 0
    }
    if sizes and count > max(sizes.values()):
        largest = max(sizes, key=sizes.get)
        return [
            f"num_cpu_devices = {count}: more CPU devices than the largest batch ({largest} ="
            f" {sizes[largest]}) has examples, so no batch could be split over them; use 0 (one"
            " per usable core, fitted to the batch sizes) or a count that divides every batch size."
        ]
    return []


def _ft_problems(config) -> list[str]:
    """FT's paraphraser factor of the teacher's last group, `int(C * baselines.ft_rate)` channels
    (`methods/feature_maps.py`: `Paraphraser`, `_ft_helpers`), must have at least one channel: a
    factor of none failed at FT's helper init, after the teacher had trained."""
    rate = config.baselines.ft_rate
    channels = group_channels(config.teacher.model)[-1]
    if not rate > 0 or int(channels * rate) >= 1:
        return []  # A non-positive rate is FT's own check's.
    # The smallest rate of 3 significant digits that keeps a channel (1 / C rounded up).
    step = 10.0 ** (math.floor(math.log10(1 / channels)) - 2)
    minimum = math.ceil(1 / channels / step) * step
    while int(channels * minimum) < 1:
        minimum += step
    return [
        f"baselines.ft_rate = {rate} gives FT int({channels} * {rate}) = 0 factor channels for"
        f" teacher.model = {config.teacher.model!r} (its last group has {channels} channels);"
        f" use baselines.ft_rate >= {minimum:.3g} (RepDistiller: 0.5)."
    ]


def search_split_sizes(config) -> tuple[int, int] | None:
    """(train, val) example counts of the search's split of a `data.max_train_examples` cap
    (`splits.stratified_split` of `data.search_val_fraction` of each class, the cap spread over
    the classes as `splits.stratified_subset` spreads it); None without a cap or a carved split.
    A dataset smaller than the cap gives fewer (`inputs.check_batch_sizes` sees those)."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from dfa_jax import data as data_lib  # pylint: disable=g-import-not-at-top

    data = config.data
    cap, fraction = data.max_train_examples, data.search_val_fraction
    info = data_lib.DATASETS.get(data.dataset)
    if data.val_split is not None or cap is None or cap <= 0 or info is None:
        return None
    if not 0.0 < fraction < 1.0:
        return None
    from dfa_jax.data import sources  # pylint: disable=g-import-not-at-top

    # The cap's pick itself (`stratified_subset`, as the source makes it) of labels where every
    # class could give all of it, then the split's sizes (any seed gives them).
    labels = np.repeat(np.arange(info.num_classes), cap)
    labels = labels[data_lib.stratified_subset(labels, cap, sources.SUBSET_SEED)]
    train, val = data_lib.stratified_split(labels, fraction, seed=0)
    return len(train), len(val)


def _tuple_syntax_hint(path: str, values) -> str:
    """For a tuple-of-strings field given as a comma list (`--config.stages=teacher,search` is
    the one name 'teacher,search'), how to give it as a tuple; '' otherwise."""
    values = [v for v in values if isinstance(v, str)]
    if not any("," in v or v.lstrip().startswith("(") for v in values):
        return ""
    items = [
        item.strip().strip("'\"")
        for value in values
        for item in value.strip().strip("()").split(",")
    ]
    items = [item for item in items if item]
    listed = ",".join(f'"{item}"' for item in items) + ("," if len(items) == 1 else "")
    return (
        f"; give a tuple: --config.{path}='({listed})' (a comma list without the quotes is one"
        " name)"
    )


def _pair_size_problems(teacher: str, student: str) -> list[str]:
    """Problems of a pair whose groups cannot be matched: other group counts, or a teacher map
    that cannot be average-pooled to the student's size (a whole multiple of it)."""
    t_sizes, s_sizes = group_sizes(teacher), group_sizes(student)
    if len(t_sizes) != len(s_sizes):
        return [
            (
                f"teacher.model = {teacher!r} has {len(t_sizes)} groups but student.model ="
                f" {student!r} has {len(s_sizes)}; pick a student with as many groups."
            )
        ]
    if all(t >= s and t % s == 0 for t, s in zip(t_sizes, s_sizes)):
        return []
    return [
        (
            f"teacher.model = {teacher!r} has groups at spatial sizes {t_sizes} but student.model"
            f" = {student!r} at {s_sizes}: each teacher map must be the student's size or a whole"
            " multiple of it (it is average-pooled to the student's, as mdistiller's OFD does);"
            " pick a student whose groups end at those sizes or smaller."
        )
    ]


# Model name -> what it lacks of the feature contract, for the families registered by users
# (`models.register_family`; the package's own are tested): an abstract trace each.
_CONTRACT_PROBLEMS: dict[tuple, tuple[str, ...]] = {}


def _contract_problems(model_name: str) -> tuple[str, ...]:
    """What model `model_name` lacks of the feature contract; () for the package's families."""
    from dfa_jax import models  # pylint: disable=g-import-not-at-top

    family = models.family_of(model_name)
    if family is None or family in models.BUILTIN_FAMILIES:
        return ()
    key = (family, model_name)
    if key not in _CONTRACT_PROBLEMS:
        from dfa_jax.models import contract  # pylint: disable=g-import-not-at-top

        model = models.get_model(model_name, 10)
        found = contract.problems(model)
        # What the family declares of its models, against the model itself: a declared stem
        # that is not there failed only in the distillation, after the teacher and the search.
        if not found and family.has_stem != (model.stem_features() is not None):
            found.append(
                f"{family.name} is registered with has_stem={family.has_stem}, but"
                f" {type(model).__name__}.stem_features() returns {model.stem_features()!r}:"
                " make the two agree."
            )
        _CONTRACT_PROBLEMS[key] = tuple(found)
    return _CONTRACT_PROBLEMS[key]


def _check_files(config) -> None:
    """The small files the config names, read before anything is built: the teacher checkpoint's
    metadata (`CheckpointError`) and the alpha.json of the 'file' aggregation (`AlphaFileError`).
    """
    from dfa_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    from dfa_jax import models  # pylint: disable=g-import-not-at-top

    num_classes = data_lib.DATASETS[config.data.dataset].num_classes
    teacher = None
    if config.teacher.checkpoint is not None:
        from dfa_jax import teacher as teacher_lib  # pylint: disable=g-import-not-at-top

        teacher = models.get_model(config.teacher.model, num_classes)
        teacher_lib.check_checkpoint(
            config.teacher.checkpoint,
            teacher,
            description=(
                f"teacher.model = {config.teacher.model!r} with {num_classes} classes"
                f" (data.dataset = {config.data.dataset!r})"
            ),
            num_classes=num_classes,
        )
    if "distill" in config.stages and "file" in distill_labels(config):
        from dfa_jax import alpha_file  # pylint: disable=g-import-not-at-top

        teacher = teacher or models.get_model(config.teacher.model, num_classes)
        alpha_file.load(config.distill.alpha_file, teacher)


# Above this, a weight decay is most likely a typo: the recipes here and the peers' run 1e-4 to
# 5e-4 (the largest common setting for CIFAR-size networks is 1e-3).
_LARGEST_USUAL_WEIGHT_DECAY = 1e-2


def schedule_warnings(config: ml_collections.ConfigDict) -> list[str]:
    """Valid but most likely unmeant, so warnings, not errors: learning-rate milestones a run
    never reaches (epochs shortened without them: the rate then stays at its peak to the end), a
    step decay that raises the rate, a weight decay far above every recipe's, a clamp that cuts
    positive values, a search no student of the command reads; a line each."""
    optims = [("distill.optim", config.distill.optim)]
    if config.teacher.checkpoint is None:
        optims.insert(0, ("teacher.optim", config.teacher.optim))
    lines = []
    for name, optim in optims:
        unreached = [m for m in optim.milestones if m >= optim.epochs]
        if optim.schedule == "step" and unreached:
            fix = (
                f"--config.{name}.milestones='({optim.epochs // 2},)'"
                if optim.epochs > 1
                else f"--config.{name}.schedule=constant"
            )
            lines.append(
                f"{name}.milestones = {tuple(optim.milestones)}: {tuple(unreached)} at or after"
                f" its last epoch ({optim.epochs}) never apply; set milestones within the"
                f" epochs (e.g. {fix})."
            )
        if optim.schedule == "step" and optim.decay > 1:
            lines.append(
                f"{name}.decay = {optim.decay} multiplies the learning rate at each milestone:"
                " it grows; a step schedule decays by a factor below 1 (the paper: 0.2)."
            )
        if optim.weight_decay > _LARGEST_USUAL_WEIGHT_DECAY:
            lines.append(
                f"{name}.weight_decay = {optim.weight_decay}: {optim.weight_decay / 5e-4:.0f}x the"
                " recipes' 5e-4 (coupled L2: it shrinks every weight by lr x weight_decay a"
                " step); a typo of 5e-4?"
            )
    clamp = config.features.clamp_min
    if isinstance(clamp, (int, float)) and clamp > 0:
        lines.append(
            f"features.clamp_min = {clamp} raises every teacher value below {clamp} to it,"
            " positive activations included; the paper keeps values no smaller than -1"
            " (clamp_min = -1.0; None: no clamp)."
        )
    if (
        "search" in config.stages
        and "distill" in config.stages
        and "dfa" not in distill_labels(config)
    ):
        lines.append(
            f"stages = {tuple(config.stages)} runs the search, but no student of this command"
            f" reads its alpha (students: {tuple(distill_labels(config))}); its alpha.json stays"
            " for a later 'dfa' student. Drop 'search' from stages if that is not meant."
        )
    return lines


def teacher_data_warnings(config: ml_collections.ConfigDict) -> list[str]:
    """A `teacher.checkpoint` of a dfa_jax run (its workdir, teacher/ or variables directory,
    beside the run's config.json) trained on other inputs than this run's: another dataset, or
    other normalisation statistics. Shapes match (validate checks them), so it would run."""
    from dfa_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    from dfa_jax import files  # pylint: disable=g-import-not-at-top

    path = config.teacher.checkpoint
    if path is None:
        return []
    candidates = [path, os.path.dirname(os.path.normpath(path))]
    candidates.append(os.path.dirname(candidates[-1]))
    for c in candidates:
        if c and files.exists(os.path.join(c, "config.json")):
            found = os.path.join(c, "config.json")
            break
    else:
        return []
    try:
        theirs = files.read_json(found)["data"]
        dataset = theirs["dataset"]
    except (OSError, ValueError, KeyError, TypeError):
        return []

    def statistics(data) -> tuple:
        info = data_lib.DATASETS.get(data["dataset"])
        defaults = (info.mean, info.std) if info is not None else (None, None)
        given = (data.get("mean"), data.get("std"))
        return tuple(
            tuple(round(float(v), 6) for v in (g if g is not None else d)) if (g or d) else None
            for g, d in zip(given, defaults)
        )

    ours = config.data.to_dict()
    if dataset != ours["dataset"]:
        return [
            f"teacher.checkpoint = {path!r} was trained on data.dataset = {dataset!r} (its run's"
            f" {found}); this run's is {ours['dataset']!r}: its features and logits describe"
            " other images. Train a teacher on this data, or set data.dataset to the teacher's."
        ]
    if statistics(theirs) != statistics(ours):
        return [
            f"teacher.checkpoint = {path!r} saw inputs normalised by mean / std"
            f" {statistics(theirs)} (its run's {found}); this run's are {statistics(ours)}: set"
            " data.mean and data.std to the teacher's."
        ]
    return []


def validate(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
    """Raises ConfigError listing every mistake in `config`, each with its field and fix.

    Cheap by design (no compile, no data read): model group shapes come from `jax.eval_shape`.
    Types come first (a wrong type ends the check with those alone); once the fields are
    consistent, the files the config names are read: a teacher checkpoint's metadata (shapes
    against the teacher model: `CheckpointError`) and the 'file' aggregation's alpha.json
    (`AlphaFileError`), so that neither fails after a stage has trained.
    """
    # Local imports keep `import dfa_jax.config_lib` light for config files.
    import jax  # pylint: disable=g-import-not-at-top
    from dfa_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    from dfa_jax import models  # pylint: disable=g-import-not-at-top
    from dfa_jax.data import sources  # pylint: disable=g-import-not-at-top

    if device_count is None:
        device_count = jax.device_count()
    problems: list[str] = []
    _check_types(config, base_config(), "", problems)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))

    if not 0 <= config.seed < 2**32:
        problems.append(f"seed = {config.seed}: use an integer in [0, 2**32).")
    unknown = [s for s in config.stages if s not in STAGES]
    if unknown or not config.stages:
        hint = _tuple_syntax_hint("stages", config.stages)
        problems.append(
            f"stages = {tuple(config.stages)}: use a non-empty subset of {STAGES}{hint}."
        )
    elif len(set(config.stages)) != len(config.stages):
        # ml_collections appends when a tuple field is overridden twice on one command line.
        problems.append(
            f"stages = {tuple(config.stages)} names a stage twice (was --config.stages given"
            " twice? a second override of a tuple field appends to it): give each stage once."
        )

    data = config.data
    if data.dataset not in data_lib.DATASETS:
        problems.append(
            f"data.dataset = {data.dataset!r} is unknown; use one of {sorted(data_lib.DATASETS)}."
        )
    if data.source not in data_lib.SOURCES:
        problems.append(f"data.source = {data.source!r} is unknown; use one of {data_lib.SOURCES}.")
    else:
        problems.extend(sources.SOURCE_CLASSES[data.source].check(data))
    for field in ("data_dir", "path"):
        if data[field] is not None and not data[field].strip():
            problems.append(f"data.{field} = {data[field]!r}: give a directory or leave it unset.")
    for field in ("npz_image_key", "npz_label_key"):
        if not data[field]:
            problems.append(f"data.{field} = '': give the key of the npz files' array.")
    # The search trains beta on val_split and w on train_split, and the reported accuracy is
    # test_split's: one name twice would train on what it measures (overlapping slices of one
    # TFDS split: `TfdsSource.check`).
    if data.val_split is not None and data.val_split in (data.train_split, data.test_split):
        problems.append(
            f"data.val_split = {data.val_split!r} is also data."
            f"{'train_split' if data.val_split == data.train_split else 'test_split'}: the search"
            " would train beta on images it trains w on or is measured on; give a split of its"
            " own, or None to hold out data.search_val_fraction of the training split."
        )
    if data.train_split == data.test_split:
        problems.append(
            f"data.train_split = data.test_split = {data.train_split!r}: the test accuracy would"
            " be measured on the training images; give the test split its own name."
        )
    if data.npz_image_key == data.npz_label_key:
        problems.append(
            f"data.npz_image_key = data.npz_label_key = {data.npz_image_key!r}: images and labels"
            " need their own npz keys (defaults 'images' and 'labels')."
        )
    if not 0.0 < data.search_val_fraction < 1.0:
        problems.append(
            f"data.search_val_fraction = {data.search_val_fraction}: must lie in (0, 1) (the paper uses 0.3)."
        )
    if config.teacher.distill_from not in ("best", "last"):
        problems.append(
            f"teacher.distill_from = {config.teacher.distill_from!r}: use 'best' (the epoch of"
            " highest test accuracy) or 'last'."
        )
    if data.augment not in ("pad_crop", "random_resized_crop"):
        problems.append(
            f"data.augment = {data.augment!r}: use 'pad_crop' or 'random_resized_crop'."
        )
    for field in ("mean", "std"):
        values = data[field]
        if values is None:
            continue
        if len(values) != 3:  # The type check has made them finite numbers.
            problems.append(
                f"data.{field} = {values!r}: give three numbers (R, G, B) in [0, 1] units, or"
                " leave it unset for the dataset's."
            )
        elif any(v > 1.0 for v in values):
            scaled = tuple(round(v / 255, 4) for v in values)
            problems.append(
                f"data.{field} = {values!r}: give it in [0, 1] units (pixel / 255): {scaled}."
            )
        elif field == "mean" and any(v < 0.0 for v in values):
            problems.append(f"data.mean = {values!r}: every value must lie in [0, 1].")
        elif field == "std" and any(v <= 0.0 for v in values):
            problems.append(f"data.std = {values!r}: every value must be > 0.")
    if (data.mean is None) != (data.std is None):
        given, missing = ("mean", "std") if data.std is None else ("std", "mean")
        problems.append(
            f"data.{given} is set but data.{missing} is not: a normalisation is a pair (the"
            f" dataset's {missing} with another {given} matches neither); give both, e.g. the"
            " ones the teacher was trained with, or neither for the dataset's."
        )
    if data.pad_mode not in ("reflect", "constant"):
        problems.append(f"data.pad_mode = {data.pad_mode!r}: use 'reflect' or 'constant'.")
    size = data_lib.DATASETS[data.dataset].image_size if data.dataset in data_lib.DATASETS else 32
    if not 0 <= data.pad < size:
        problems.append(
            f"data.pad = {data.pad}: must lie in [0, {size}) pixels (the paper pads 4; 0 disables)."
        )
    if data.prefetch < 0:
        problems.append(f"data.prefetch = {data.prefetch}: must be >= 0 (0 disables prefetching).")
    if not data.eval_batch_size > 0:
        problems.append(f"data.eval_batch_size = {data.eval_batch_size}: must be positive.")
    for field in ("max_train_examples", "max_test_examples"):
        value = data[field]
        if value is not None and value <= 0:
            problems.append(f"data.{field} = {value}: must be positive or None (all).")
    cap = data.max_train_examples
    if cap is not None and cap > 0:
        batches = []
        if "teacher" in config.stages and config.teacher.checkpoint is None:
            batches.append(("teacher.optim.batch_size", config.teacher.optim.batch_size))
        if "search" in config.stages:
            batches.append(("search.batch_size", config.search.batch_size))
        if "distill" in config.stages:
            batches.append(("distill.optim.batch_size", config.distill.optim.batch_size))
        for field, batch in batches:
            if batch > cap:
                problems.append(
                    f"data.max_train_examples = {cap} cannot fill one batch of {field} = {batch};"
                    " raise the cap or lower the batch size."
                )
        batch = config.search.batch_size
        sizes = search_split_sizes(config) if "search" in config.stages and batch <= cap else None
        short = [(side, size) for side, size in zip(("train", "val"), sizes or ()) if size < batch]
        if short:
            splits = " and ".join(f"{side} split {size}" for side, size in short)
            fixes = ["raise data.max_train_examples"]
            if len(short) == 1:  # The fraction moves examples to the short side.
                fixes.append(
                    f"{'lower' if short[0][0] == 'train' else 'raise'} data.search_val_fraction"
                )
            fixes = ", ".join(fixes) + ("," if len(fixes) > 1 else "")
            problems.append(
                f"data.max_train_examples = {cap} with data.search_val_fraction ="
                f" {data.search_val_fraction} leaves the search's {splits} examples, fewer"
                f" than one batch of search.batch_size = {batch}; {fixes} or lower"
                " search.batch_size."
            )

    model_ok = {}  # Role -> a known model that keeps the feature contract.
    for role in ("teacher", "student"):
        problem = models.name_problem(f"{role}.model", config[role].model)
        broken = () if problem else _contract_problems(config[role].model)
        problems += [problem] if problem else []
        problems += [f"{role}.model = {config[role].model!r}: {p}" for p in broken]
        model_ok[role] = not problem and not broken
    teacher_ok, student_ok = model_ok["teacher"], model_ok["student"]
    if (
        config.teacher.checkpoint is not None
        and not _is_remote(config.teacher.checkpoint)
        and (not os.path.exists(config.teacher.checkpoint))
    ):
        problems.append(
            f"teacher.checkpoint = {config.teacher.checkpoint!r} does not exist; give the workdir"
            " of a finished teacher run (or its teacher/variables), or unset it to train one."
        )
    _check_optim("teacher.optim", config.teacher.optim, device_count, problems)
    _check_optim("distill.optim", config.distill.optim, device_count, problems)
    search = config.search
    if search.epochs_per_group <= 0:
        problems.append(
            f"search.epochs_per_group = {search.epochs_per_group}: must be a positive number of"
            " epochs (the paper uses 40 on CIFAR-100, 5 on CINIC-10)."
        )
    if not search.batch_size > 0:
        problems.append(f"search.batch_size = {search.batch_size}: must be positive.")
    elif search.batch_size % device_count:
        problems.append(
            f"search.batch_size = {search.batch_size} is not divisible by the"
            f" {_devices(device_count)}; use a multiple of {device_count}."
        )
    for field in ("w_lr", "beta_lr"):
        if not search[field] > 0:
            problems.append(
                f"search.{field} = {search[field]}: the learning rate must be positive."
            )
    if not 0 <= search.w_momentum < 1:
        problems.append(f"search.w_momentum = {search.w_momentum}: must lie in [0, 1).")
    for field in ("beta_b1", "beta_b2"):
        if not 0 <= search[field] < 1:
            problems.append(f"search.{field} = {search[field]}: Adam's betas lie in [0, 1).")
    for field in ("w_weight_decay", "beta_weight_decay", "gamma_st", "gamma_ts"):
        if search[field] < 0:
            problems.append(f"search.{field} = {search[field]}: must be >= 0.")
    if search.gamma_st == 0 and search.gamma_ts == 0:
        problems.append(
            "search.gamma_st = search.gamma_ts = 0 leaves beta no loss; set search.gamma_ts ="
            " 1.0 (the paper's)."
        )
    if search.w_schedule not in ("global", "per_group"):
        problems.append(
            f"search.w_schedule = {search.w_schedule!r}: use 'global' (one cosine over the whole"
            " search) or 'per_group' (restarted for each group)."
        )
    if search.order not in (1, 2):
        problems.append(f"search.order = {search.order}: use 1 (first order) or 2 (second order).")
    distill = config.distill
    methods = method_registry.names()
    if distill.method not in methods:
        problems.append(f"distill.method = {distill.method!r} is unknown; use one of {methods}.")
    labels = method_registry.labels()
    for name in distill.compare_with:
        if name not in labels:
            hint = _tuple_syntax_hint("distill.compare_with", distill.compare_with)
            problems.append(
                f"distill.compare_with: {name!r} is unknown; use any of {labels}{hint}."
            )
    repeated = sorted({n for n in distill.compare_with if list(distill.compare_with).count(n) > 1})
    if repeated:
        # The same student twice would train twice in one step and write one directory twice.
        problems.append(
            f"distill.compare_with names {repeated} more than once: give each label once (more"
            " seeds of one label go in distill.seeds)."
        )
    seeds = tuple(distill.seeds)
    outside = [s for s in seeds if not 0 <= s < 2**32]
    if outside:
        # As `seed`: jax.random.key keeps 32 bits of it (seeds 2**32 apart are one student) and
        # refuses 2**63 and more, at the student's init.
        problems.append(
            f"distill.seeds = {seeds}: {outside[0]} is outside [0, 2**32); give integers in"
            " [0, 2**32), as for seed, e.g. '(0,1,2)'."
        )
    elif len(set(seeds)) != len(seeds):
        problems.append(
            f"distill.seeds = {seeds}: give distinct integers in [0, 2**32), e.g. '(0,1,2)' (or"
            " '()' for the run's seed alone)."
        )
    if distill.max_students_per_step < 0:
        problems.append(
            f"distill.max_students_per_step = {distill.max_students_per_step}: use 0 (all of a"
            " method's students in one step) or a positive number."
        )
    if distill.cohort not in ("auto", "loop", "vmap"):
        problems.append(
            f"distill.cohort = {distill.cohort!r}: use 'auto', 'loop' (the students one after the"
            " other in the step) or 'vmap' (mapped over a student axis)."
        )
    if (
        distill.alpha_file is not None
        and "distill" in config.stages
        and "file" not in distill_labels(config)
    ):
        with_dfa = "" if distill.method == "dfa" else " with --config.distill.method=dfa"
        problems.append(
            f"distill.alpha_file = {distill.alpha_file!r} is set but no student reads it; add"
            f" --config.distill.aggregation=file{with_dfa} (or 'file' to distill.compare_with),"
            " or unset it."
        )
    needs_teacher = any(stage in config.stages for stage in ("search", "distill"))
    if needs_teacher and "teacher" not in config.stages and config.teacher.checkpoint is None:
        problems.append(
            f"stages = {tuple(config.stages)} need a teacher: add 'teacher' to stages (trains one)"
            " or set --config.teacher.checkpoint=TEACHER_WORKDIR."
        )
    if distill.teacher_bn not in ("eval", "batch"):
        problems.append(f"distill.teacher_bn = {distill.teacher_bn!r}: use 'eval' or 'batch'.")
    base = config.baselines
    if base.preset not in baseline_presets.PRESETS:
        problems.append(
            f"baselines.preset = {base.preset!r}: use 'peers' (RepDistiller's settings) or"
            " 'authors' (the DFA authors' baseline code)."
        )
    else:
        problems.extend(baseline_presets.conflicts(config, base_config()))
    # Each method's own fields (every config has them, whichever methods it runs).
    for method in method_registry.REGISTRY.values():
        problems.extend(method.load().check(config))
    if config.dtype not in ("float32", "bfloat16"):
        problems.append(f"dtype = {config.dtype!r}: use 'float32' or 'bfloat16'.")
    if config.matmul_precision not in MATMUL_PRECISIONS:
        problems.append(
            f"matmul_precision = {config.matmul_precision!r}: use one of {MATMUL_PRECISIONS}"
            " ('tensorfloat32': TF32 on a GPU, three bfloat16 passes on a TPU)."
        )
    problems.extend(cpu_device_problems(config))
    if config.log_every_steps <= 0:
        problems.append(f"log_every_steps = {config.log_every_steps}: must be positive.")
    if config.checkpoint_every_steps <= 0:
        problems.append(
            f"checkpoint_every_steps = {config.checkpoint_every_steps}: must be positive."
        )
    if config.checkpoints_to_keep <= 0:
        problems.append(
            f"checkpoints_to_keep = {config.checkpoints_to_keep}: keep at least 1 checkpoint."
        )

    if teacher_ok and student_ok and data.dataset in data_lib.DATASETS:
        problems += _pair_size_problems(config.teacher.model, config.student.model)
    if teacher_ok and "distill" in config.stages and "ft" in distill_labels(config):
        problems += _ft_problems(config)

    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    _check_files(config)


# ------------------------------------------------------------------------------------------------
# Workdir reuse: which differences between a workdir's config and the command's matter.
# ------------------------------------------------------------------------------------------------

# Fields that cannot change the numbers of what a workdir already holds: how often to log and
# checkpoint, how the host is split into devices (results agree to float tolerance), and which
# stages or extra students to run (each lives in its own directory). Any other difference makes
# the workdir's checkpoints belong to another experiment.
# Where the data lives, not what it is: a copy moved to another disk or bucket resumes.
LOCATION_FIELDS = ("data.data_dir", "data.path")
RESULT_NEUTRAL_FIELDS = (
    "log_every_steps",
    "checkpoint_every_steps",
    "checkpoints_to_keep",
    "num_cpu_devices",
    "keep_freed_host_memory",
    "compilation_cache_dir",
    "restart",
    "stages",
    "data.prefetch",
    "distill.method",
    "distill.aggregation",
    "distill.compare_with",
    # Each student lives in its own directory; how students are grouped into steps changes
    # nothing beyond float tolerance (the README's promise across programs).
    "distill.seeds",
    "distill.max_students_per_step",
    "distill.cohort",
    # Evaluation pads and masks its last batch: each test example counts once at any size.
    "data.eval_batch_size",
    *LOCATION_FIELDS,
)


def flatten(tree: dict, prefix: str = "") -> dict:
    """A config as a nested dict -> `{dotted field: value}` (tuples as lists, as in JSON)."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = list(value) if isinstance(value, tuple) else value
    return flat


def result_fields(config_dict: dict) -> dict:
    """The config's fields that can change results, flattened to `{dotted path: value}`."""
    return {k: v for k, v in flatten(config_dict).items() if k not in RESULT_NEUTRAL_FIELDS}


# Result-affecting fields added after workdirs were first written, with the value that
# reproduces what a run from before them did: a config.json without the field is read as
# holding that value (so `--config.teacher.distill_from=last` resumes such a workdir).
#
# Fields of a method's own helpers whose earlier behaviour no value reproduces (the helpers were
# rebuilt as the peers build them: docs/design.md, "What changed in the baselines") take their
# new default, so a workdir of another method still resumes; such a method's own students start over from a fresh workdir.
VALUES_BEFORE_THE_FIELD = {
    "baselines.preset": "peers",
    "distill.positions": "groups",
    "teacher.distill_from": "last",
    "search.w_schedule": "global",
    "baselines.ft_pretrain_lr": 0.01,
    "baselines.ab_init_lr": 0.05,
    "baselines.margin_teacher_bn": "batch",
    # Runs before it computed at the backend's default (the same numbers on a CPU or a GPU).
    "matmul_precision": "default",
}


def changed_fields(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """`(dotted field, saved value, current value)` for every result-affecting difference between
    two configs given as nested dicts (e.g. a workdir's config.json and `config.to_dict()`)."""
    old, new = result_fields(saved), result_fields(current)
    if old:  # An empty saved config (unreadable file) stays empty: everything differs.
        # A registered method's own fields, new to the workdir, held their defaults there.
        fields = {
            f"baselines.{f}": method_registry.default_value(v)
            for f, v in method_registry.fields().items()
        }
        old = {**VALUES_BEFORE_THE_FIELD, **fields, **old}
    return [
        (field, old.get(field, "<absent>"), new.get(field, "<absent>"))
        for field in sorted(old.keys() | new.keys())
        if old.get(field) != new.get(field)
    ]
