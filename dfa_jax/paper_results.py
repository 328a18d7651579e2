"""Published test accuracies (%) as data, for `dfa_jax.report` to print beside ours.

The paper's: Guan et al., "Differentiable Feature Aggregation Search for Knowledge Distillation",
ECCV 2020 (shared/paper/dfa_eccv2020.md): Tables 1, 2, 4 and 5; test accuracy, of how many runs
and of which epoch the paper does not say. The field's CIFAR-100 benchmark (`CRD_SUITE`):
RepDistiller's README (Tian et al., CRD, ICLR 2020), its last epoch's, and mdistiller's README
(Zhao et al., DKD, CVPR 2022), its trainer's best epoch's (`published_statistic`). Keys use this
repository's names: model names as in `dfa_jax.models.MODEL_NAMES`, and methods as the labels of
the `distill/<label>` stages ('none' = the student alone, 'file' = DFA-T), plus 'teacher'.
"""

from __future__ import annotations

CIFAR100 = "cifar100"
CINIC10 = "cinic10"
CRD = "crd"  # The table of the field's CIFAR-100 benchmark (RepDistiller's pairs).

# Table 1 (CIFAR-100) and Table 4 (CINIC-10): the numbered teacher -> student pairs.
TABLE2_PAIRS = {
    1: ("wrn_28_4", "wrn_16_4"),  # Table 1 row (1): 5.87M -> 2.77M, different widths.
    2: ("wrn_28_4", "wrn_28_2"),  # Table 1 row (2): 5.87M -> 1.47M, different depths.
    3: ("wrn_28_4", "wrn_16_2"),  # Table 1 row (3): 5.87M -> 0.7M, both.
}
TABLE4_PAIRS = {
    1: ("shufflenet_v2_2.0", "shufflenet_v2_1.0"),  # Table 4 row (1): x = 2.0 -> x = 1.0.
    2: ("shufflenet_v2_2.0", "shufflenet_v2_0.5"),  # Table 4 row (2): x = 2.0 -> x = 0.5.
    3: ("shufflenet_v2_1.0", "shufflenet_v2_0.5"),  # Table 4 row (3): x = 1.0 -> x = 0.5.
}

# Table 2 (CIFAR-100), one dict per row, keyed by pair number.
TABLE2 = {
    # Table 2 row (1): WRN_28_4 -> WRN_16_4.
    1: {
        "teacher": 79.17,
        "none": 77.24,
        "kd": 78.4,
        "fitnets": 78.17,
        "at": 77.49,
        "jacobian": 77.84,
        "ft": 78.26,
        "ab": 78.65,
        "sp": 78.7,
        "margin": 79.11,
        "dfa": 79.74,
    },
    # Table 2 row (2): WRN_28_4 -> WRN_28_2.
    2: {
        "teacher": 79.17,
        "none": 75.78,
        "kd": 76.61,
        "fitnets": 76.14,
        "at": 75.54,
        "jacobian": 76.24,
        "ft": 76.51,
        "ab": 76.81,
        "sp": 77.41,
        "margin": 77.84,
        "dfa": 78.18,
    },
    # Table 2 row (3): WRN_28_4 -> WRN_16_2.
    3: {
        "teacher": 79.17,
        "none": 73.42,
        "kd": 73.35,
        "fitnets": 73.65,
        "at": 73.3,
        "jacobian": 73.28,
        "ft": 74.17,
        "ab": 73.9,
        "sp": 74.09,
        "margin": 75.51,
        "dfa": 75.85,
    },
}

# Table 4 (CINIC-10, ShuffleNetV2), keyed by pair number; 'teacher' and 'none' are the table's
# teacher "Acc" and student "Acc" columns.
TABLE4 = {
    # Table 4 row (1): x = 2.0 (5.37M) -> x = 1.0 (1.27M).
    1: {
        "teacher": 86.14,
        "none": 83.28,
        "at": 84.71,
        "sp": 85.32,
        "margin": 85.29,
        "dfa": 85.38,
        "file": 85.41,
    },
    # Table 4 row (2): x = 2.0 (5.37M) -> x = 0.5 (0.36M).
    2: {
        "teacher": 86.14,
        "none": 77.34,
        "at": 79.06,
        "sp": 79.15,
        "margin": 78.79,
        "dfa": 79.51,
        "file": 79.45,
    },
    # Table 4 row (3): x = 1.0 (1.27M) -> x = 0.5 (0.36M).
    3: {
        "teacher": 83.28,
        "none": 77.34,
        "at": 78.42,
        "sp": 79.02,
        "margin": 79.69,
        "dfa": 79.97,
        "file": 79.38,
    },
}

# Table 5 (CIFAR-100, teacher WRN_28_4, Table 1's pairs): one dict per column, keyed by student.
TABLE5 = {
    # Table 5 column WRN_16_2 (rows Student, Random, Last, Average, DFA).
    "wrn_16_2": {"none": 73.42, "random": 74.25, "last": 75.51, "average": 74.11, "dfa": 75.85},
    # Table 5 column WRN_16_4.
    "wrn_16_4": {"none": 77.24, "random": 78.92, "last": 79.11, "average": 78.81, "dfa": 79.74},
    # Table 5 column WRN_28_2.
    "wrn_28_2": {"none": 75.78, "random": 77.07, "last": 77.86, "average": 76.99, "dfa": 78.18},
}


# RepDistiller's CIFAR-100 benchmark, (teacher, student) -> accuracy (%) per label, in its
# README's order ("Benchmark Results on CIFAR-100", github.com/HobbitLong/RepDistiller): teacher,
# student ('none'), KD, FitNets, AT, SP, AB, FT and CRD from RepDistiller's tables; DKD from
# mdistiller's README (github.com/megvii-research/mdistiller, "Main Benchmark Results", the DKD
# paper's Tables 1-2), which has no DKD for resnet110 -> resnet20 and ResNet50 -> vgg8. mdistiller's
# README heads the column of 77.07 "ResNet32x4 / MobileNet-V2", but its KD there (74.45) is
# RepDistiller's resnet32x4 -> ShuffleV2, its configs hold `dkd/res32x4_shuv2.yaml` and no MobileNetV2
# student of resnet32x4, and the DKD paper's Table 2 puts 77.07 at ShuffleNet-V2: it is recorded there.
_CRD_LABELS = ("teacher", "none", "kd", "fitnets", "at", "sp", "ab", "ft", "crd", "dkd")
CRD_SUITE = {
    pair: dict(zip(_CRD_LABELS, values))
    for pair, values in {
        ("wrn_40_2", "wrn_16_2"): (
            75.61,
            73.26,
            74.92,
            73.58,
            74.08,
            73.83,
            72.50,
            73.25,
            75.48,
            76.23,
        ),
        ("wrn_40_2", "wrn_40_1"): (
            75.61,
            71.98,
            73.54,
            72.24,
            72.77,
            72.43,
            72.38,
            71.59,
            74.14,
            74.81,
        ),
        ("resnet56", "resnet20"): (
            72.34,
            69.06,
            70.66,
            69.21,
            70.55,
            69.67,
            69.47,
            69.84,
            71.16,
            71.97,
        ),
        ("resnet110", "resnet20"): (
            74.31,
            69.06,
            70.67,
            68.99,
            70.22,
            70.04,
            69.53,
            70.22,
            71.46,
            None,
        ),
        ("resnet110", "resnet32"): (
            74.31,
            71.14,
            73.08,
            71.06,
            72.31,
            72.69,
            70.98,
            72.37,
            73.48,
            74.11,
        ),
        ("resnet32x4", "resnet8x4"): (
            79.42,
            72.50,
            73.33,
            73.50,
            73.44,
            72.94,
            73.17,
            72.86,
            75.51,
            76.32,
        ),
        ("vgg13", "vgg8"): (74.64, 70.36, 72.98, 71.02, 71.43, 72.68, 70.94, 70.58, 73.94, 74.68),
        ("vgg13", "MobileNetV2"): (
            74.64,
            64.60,
            67.37,
            64.14,
            59.40,
            66.30,
            66.06,
            61.78,
            69.73,
            69.71,
        ),
        ("ResNet50", "MobileNetV2"): (
            79.34,
            64.60,
            67.35,
            63.16,
            58.58,
            68.08,
            67.20,
            60.99,
            69.11,
            70.35,
        ),
        ("ResNet50", "vgg8"): (79.34, 70.36, 73.81, 70.69, 71.84, 73.34, 70.65, 70.29, 74.30, None),
        ("resnet32x4", "ShuffleV1"): (
            79.42,
            70.50,
            74.07,
            73.59,
            71.73,
            73.48,
            73.55,
            71.75,
            75.11,
            76.45,
        ),
        ("resnet32x4", "ShuffleV2"): (
            79.42,
            71.82,
            74.45,
            73.54,
            72.73,
            74.56,
            74.31,
            72.50,
            75.65,
            77.07,
        ),
        ("wrn_40_2", "ShuffleV1"): (
            75.61,
            70.50,
            74.83,
            73.73,
            73.32,
            74.52,
            73.34,
            72.03,
            76.05,
            76.70,
        ),
    }.items()
}


def pair_number(table, dataset: str, teacher: str, student: str) -> int | None:
    """The row number, e.g. (3), of this pair in Table 2, 4 or 5 (the paper's) or CRD (the CRD
    suite's order); None if the pair is not one of that table's."""
    if table == CRD:
        pairs = list(CRD_SUITE)
        if dataset == CIFAR100 and (teacher, student) in CRD_SUITE:
            return pairs.index((teacher, student)) + 1
        return None
    if table in (2, 5) and dataset == CIFAR100:
        pairs = TABLE2_PAIRS  # Table 5 uses Table 1's pairs.
    elif table == 4 and dataset == CINIC10:
        pairs = TABLE4_PAIRS
    else:
        return None
    for number, pair in pairs.items():
        if pair == (teacher, student):
            return number
    return None


UNSTATED = "unstated"
"""The epoch of the DFA paper's numbers: its text names none (the first author's code prints the
best epoch's, which is no statement of what the tables hold)."""


def published_statistic(table, label: str) -> tuple[str, str]:
    """(who published a cell's number, which epoch's accuracy it is): the DFA paper's tables do
    not say (UNSTATED); RepDistiller's are its last (its `train_student.py`: "The results
    reported in the paper/README is from the last epoch"); mdistiller's DKD numbers its trainer's
    best epoch (its `BaseTrainer` reports the best test accuracy)."""
    if table == CRD:
        return ("mdistiller", "best") if label == "dkd" else ("RepDistiller", "last")
    return ("paper", UNSTATED)


def paper_value(table, dataset: str, teacher: str, student: str, label: str) -> float | None:
    """The published accuracy (%) for one cell of Table 2, 4, 5 or CRD, or None where there is
    none."""
    number = pair_number(table, dataset, teacher, student)
    if number is None:
        return None
    if table == CRD:
        return CRD_SUITE[(teacher, student)].get(label)
    if table == 2:
        return TABLE2[number].get(label)
    if table == 4:
        return TABLE4[number].get(label)
    return TABLE5.get(student, {}).get(label)
