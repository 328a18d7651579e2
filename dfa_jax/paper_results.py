"""The paper's reported test accuracies (%) as data, for `dfa_jax.report` to print beside ours.

Copied from Guan et al., "Differentiable Feature Aggregation Search for Knowledge Distillation",
ECCV 2020 (shared/paper/dfa_eccv2020.md): Tables 1, 2, 4 and 5. The paper reports best-epoch test
accuracy of one run per cell. Keys use this repository's names: model names as in
`dfa_jax.models.MODEL_NAMES`, and methods as the labels of the `distill/<label>` stages
('none' = the student alone, 'file' = DFA-T), plus 'teacher'.
"""

from __future__ import annotations

CIFAR100 = "cifar100"
CINIC10 = "cinic10"

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


def pair_number(table: int, dataset: str, teacher: str, student: str) -> int | None:
    """The paper's row number, e.g. (3), of this pair in Table 2, 4 or 5; None if not the paper's."""
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


def paper_value(table: int, dataset: str, teacher: str, student: str, label: str) -> float | None:
    """The paper's accuracy (%) for one cell of Table 2, 4 or 5, or None where it has none."""
    number = pair_number(table, dataset, teacher, student)
    if number is None:
        return None
    if table == 2:
        return TABLE2[number].get(label)
    if table == 4:
        return TABLE4[number].get(label)
    return TABLE5.get(student, {}).get(label)
