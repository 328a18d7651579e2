"""The paper's results tables (Tables 2, 4 and 5) over many runs, from their `summary.json` files.

  python -m dfa_jax.report RUN_DIR... [--out DIR] [--table 2|4|5|crd|logits|alpha|all]

Each RUN_DIR is a workdir, a `summary.json` itself, or a parent directory searched recursively,
on a local disk or in a bucket (`gs://...`). A workdir without `summary.json` (a run stopped, or
still running) counts with the stages it finished, and a warning says it is partial. Runs are
grouped by (dataset, teacher model, student model, method), where the method is the label
of a `distill/<label>` stage ('none' = the student alone, 'file' = DFA-T). Every cell shows the
median last-epoch test accuracy over seeds, then `mean ± std`, the number of seeds and the median
best-epoch accuracy, with the paper's number beside it where the pair is one of the paper's:

  76.00 (77.00±2.65, n=3; best 76.40) [paper 75.85]

Both accuracies are shown because the paper's numbers are most likely best-epoch test accuracy
(picking the epoch on the test set: the paper does not say, but the first author's baseline code
prints the best epoch's), while the last epoch is the honest number. A cell pools every run it
is given: runs of different protocols in one cell (another `epochs`, another result-affecting
config field than the seeds, where inputs are read from and the eval batch) are warned about,
naming the fields and the runs, and the cell names the fields (`⟨protocols differ: …⟩`, the
CSV's `protocols_differ`). A run is read once however often it is given, and a seed that several
runs hold counts once, as their mean (`⟨seed k ×m⟩`, the CSV's `repeated_seeds`): n is the
number of seeds. The tables are printed as markdown and written to `--out` as `table<N>.md` and
`table<N>.csv`, a cell's seeds in a `seeds` column and under each table; beside Table 5, DFA's
accuracy minus Last's, Average's, Random's and (where a run trained it) Start's of the same seed,
CIFAR-100's and CINIC-10's (whose aggregations Table 5 also shows), with its mean and 95 %
interval (`paired.md`, `paired.csv`), and the alpha each run's search found (its `alpha.json`;
the paper's Fig. 4, left), per group with its distance from Last, 1 - alpha of the group's last
map (`alpha.md`, `alpha.csv`).
The later logit baselines (DKD, DIST, KD+LS, DKD+LS), which the paper does not have, get a table
of their own beside the student alone and KD (`logits.md`, `logits.csv`), so Table 2 keeps the
paper's columns. A result no table has a place for (KD on CINIC-10, say) is named in a warning.
Pure Python, numpy, ml_collections and `etils.epath`: it starts instantly and runs where the
runs' files are, without JAX.
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import logging
import math
import os
import posixpath
import re
import sys
from collections.abc import Iterable

import numpy as np
from etils import epath

from dfa_jax import config_lib
from dfa_jax import method_registry
from dfa_jax import paper_results

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
PATH_KEY = "summary_path"  # Added to every loaded summary: the file it came from.
CONFIG_KEY = "run_config"  # Added to every loaded summary: its workdir's config.json, or None.
COMPLETE_KEY = "complete"  # False in the summary of a run that has not finished.
# A workdir's files, named here because the modules that write them import JAX: workdir.py's
# config and its hash, a stage's result (train_loop.py), a student's label and seed and the
# cohorts' checkpoints (distill.py), the teacher's exported variables (teacher.py).
CONFIG_FILE = "config.json"
HASH_FILE = "config_hash"
RESULT_FILE = "result.json"
STUDENT_FILE = "student.json"
COHORTS_DIR = "cohorts"
ALPHA_FILE = "alpha.json"  # A search's alpha (search.py's ALPHA_FILE).
VARIABLES_DIR = "variables"
BEST_VARIABLES_DIR = "best_variables"
TEACHER = "teacher"
CINIC10 = paper_results.CINIC10

# (label, header) of each table's methods, headers as the methods' registry names them. Tables 4
# and 5 hold the paper's; Table 2 a column per registered method (`table2_columns`).
TABLE4_COLUMNS = ((TEACHER, "Teacher"),) + tuple(
    (label, method_registry.header(label))
    for label in ("none", "at", "sp", "margin", "dfa", "file")
)
TABLE5_ROWS = tuple(
    (label, method_registry.header(label))
    for label in ("none", "random", "last", "start", "average", "dfa")
)
# Rows of Table 5 the paper does not have: shown only where a run trained them.
TABLE5_OWN_ROWS = ("start",)


def table2_columns() -> tuple[tuple[str, str], ...]:
    """Table 2's (label, header): the teacher, then every registered method of Table 2
    (`Method.table == 2`) in registry order (the paper's, then any method added)."""
    return ((TEACHER, "Teacher"),) + tuple(
        (method.name, method.column)
        for method in method_registry.REGISTRY.values()
        if method.table == 2
    )


LOGITS = "logits"
"""The table of the later logit baselines (DKD, DIST, KD+LS, DKD+LS): `Method.table`."""


def logit_columns() -> tuple[tuple[str, str], ...]:
    """The logit table's (label, header): the teacher, the student alone and KD (Table 2's, for
    reference), then every method registered for this table. The paper has no such column, so
    its Table 2 keeps exactly its own."""
    return (
        (TEACHER, "Teacher"),
        ("none", method_registry.header("none")),
        ("kd", method_registry.header("kd")),
    ) + tuple(
        (method.name, method.column)
        for method in method_registry.REGISTRY.values()
        if method.table == LOGITS
    )


def __getattr__(name: str):
    # TABLE2_COLUMNS is read when asked: a method registered after this import has its column.
    if name == "TABLE2_COLUMNS":
        return table2_columns()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


CSV_FIELDS = (
    "table",
    "dataset",
    "teacher",
    "student",
    "method",
    "n",
    "seeds",  # The n runs' seeds, ';'-joined as paired.csv's (`_seed_labels`).
    "median_last",
    "mean_last",
    "std_last",
    "median_best",
    "paper",
    "paper_source",  # Who published `paper`: the DFA paper, RepDistiller or mdistiller.
    # Which accuracy `paper` is: its 'best' or 'last' epoch's, or 'unstated' (the DFA paper's).
    "paper_epoch",
    "preset",  # KD, AT, SP, Margin: the runs' baselines.preset ('peers', 'authors', 'mixed').
    # The protocol fields in which the cell's runs differ, ';'-joined (`_protocol_differences`):
    # empty when its runs share one protocol.
    "protocols_differ",
    # Seeds that several runs hold, each `<seed>x<runs>`, ';'-joined: each such seed counts once,
    # as its runs' mean.
    "repeated_seeds",
)
# The methods whose settings `baselines.preset` chooses (`baseline_presets.py`).
PRESET_METHODS = ("kd", "at", "sp", "margin")
MISSING = "–"

_SEEDS_NOTE = (
    "Each cell: median last-epoch test accuracy (%) over seeds (mean ± sample std with ddof=1,"
    f" {MISSING} for one seed; n = seeds, a seed of several runs counting once, as their mean;"
    " median best-epoch accuracy)."
)
_MARKS_NOTE = (
    " ⟨seed k ×m⟩: m runs of seed k, counted as one seed, their mean (paired.md does the same)."
    " ⟨protocols differ: …⟩: the cell pools runs that differ in those fields (all of them in the"
    " CSV's `protocols_differ`): give such runs to separate reports."
)
_NOTE = (
    _SEEDS_NOTE + " [paper x]: the paper's number (how many runs and which epoch it does not say;"
    f" the first author's code reports the best epoch's). {MISSING}: no run. ⟨authors⟩: KD, AT,"
    " SP or Margin run with `baselines.preset=authors` (the first author's code's settings;"
    " unmarked: RepDistiller's)." + _MARKS_NOTE
)
_TEACHER_NOTE = (
    " Teacher: the teachers of that dataset and teacher model, one per seed (a teacher loaded by"
    " several runs, or trained again with its seed and protocol, counts once; one seed's teachers"
    " of other protocols count as their mean; one loaded from the best-epoch variables of a run"
    " not given counts in best only)."
)


# --- loading ---------------------------------------------------------------------------------


def _is_remote(path) -> bool:
    # As `files.is_remote`, which imports JAX.
    return bool(re.match(r"^[a-z0-9]+://", str(path)))


def _normalized(path: str) -> str:
    """`path` without `.`, `..`, doubled or trailing slashes; an object store's `gs://` kept."""
    if _is_remote(path):
        scheme, rest = str(path).split("://", 1)
        return f"{scheme}://{posixpath.normpath(rest)}"
    return os.path.normpath(path)


def _absolute(path: str) -> str:
    return str(path) if _is_remote(path) else os.path.abspath(path)


def _read_json(path: str):
    """The JSON in `path`; raises OSError or ValueError (bad JSON or bad UTF-8)."""
    return json.loads(epath.Path(path).read_text())


def _read_json_if_there(path: str):
    """The JSON in `path`, or None where it is absent or unreadable (the caller falls back)."""
    try:
        return _read_json(path) if epath.Path(path).exists() else None
    except (OSError, ValueError):
        return None


def find_summaries(path: str) -> list[str]:
    """The `summary.json` files at or under `path` (a file is taken as it is), sorted, and the
    `config.json` of each workdir there without one: a run that has not finished."""
    root = epath.Path(path)
    if root.is_file():
        return [str(root)]
    found = []
    for directory, dirs, names in root.walk():
        dirs.sort()
        if SUMMARY_FILE in names:
            found.append(str(directory / SUMMARY_FILE))
        elif CONFIG_FILE in names and HASH_FILE in names:  # `workdir.prepare` writes both.
            found.append(str(directory / CONFIG_FILE))
        else:
            continue
        # Below a workdir are its stages' checkpoints and the runs it moved aside, not more runs.
        dirs.clear()
    return found


def _problem(summary) -> str | None:
    """Why `summary` is no run summary this module can use, or None when it is one."""
    if not isinstance(summary, dict):
        return "not a JSON object"
    for field in ("dataset", "teacher_model", "student_model"):
        if not isinstance(summary.get(field), str):
            return f"no {field!r} string"
    if not isinstance(summary.get("stages"), dict):
        return "no 'stages' object"
    return None


def _read_summary(path: str) -> dict | None:
    """The summary in `path` with PATH_KEY (and CONFIG_KEY) added, or None (and a warning) when
    unusable."""
    try:
        summary = _read_json(path)
    except (OSError, ValueError) as error:
        logger.warning("skipped %s: unreadable summary (%s)", path, error)
        return None
    problem = _problem(summary)
    if problem is not None:
        logger.warning("skipped %s: not a run summary (%s)", path, problem)
        return None
    config = _read_json_if_there(str(epath.Path(path).parent / CONFIG_FILE))
    if not isinstance(config, dict):
        return {**summary, PATH_KEY: path, CONFIG_KEY: None}
    workdir = epath.Path(path).parent
    summary = {**summary, "stages": _with_recorded_seeds(summary["stages"], workdir)}
    # A finished run extended in place (another seed or label) that stopped before its end left
    # its old summary: the students it finished since are on disk.
    run_seed = summary.get("seed", config.get("seed"))
    later = _students_missing_from(summary["stages"], _finished_students(workdir, config), run_seed)
    if later:
        logger.warning(
            "%s: %d students finished after its %s (a later invocation that did not end):"
            " reported as a partial run with them (%s)",
            summary.get("workdir", path),
            len(later),
            SUMMARY_FILE,
            ", ".join(sorted(later)),
        )
        summary = {**summary, "stages": {**summary["stages"], **later}, COMPLETE_KEY: False}
    return {**summary, PATH_KEY: path, CONFIG_KEY: config}


def _with_recorded_seeds(stages: dict, workdir: epath.Path) -> dict:
    """`stages` with the seed each student of the one-seed layout (`distill/<label>`) recorded in
    its `student.json` where the summary has none: a later command that did not train it used to
    carry it into its summary without it."""
    filled = {}
    for name, stage in stages.items():
        if (
            isinstance(stage, dict)
            and re.fullmatch(r"distill/[^/]+", name)
            and not isinstance(stage.get("seed"), int)
        ):
            recorded = _read_json_if_there(str(workdir / name / STUDENT_FILE))
            seed = recorded.get("seed") if isinstance(recorded, dict) else None
            if isinstance(seed, int):
                stage = {**stage, "seed": seed}
        filled[name] = stage
    return filled


def _students_missing_from(stages: dict, on_disk: dict, run_seed=None) -> dict:
    """The students of `on_disk` (`_finished_students`) that `stages` (a summary's) does not
    hold, a student being its label and seed: a summary of the one-seed layout names
    `distill/<label>` what a later invocation of several seeds moved to `distill/<label>/seed<k>`
    (a summary's student without a recorded seed, from before students recorded theirs, is the
    run's seed's: it matches that seed's student alone)."""
    held = collections.defaultdict(list)
    for name, stage in stages.items():
        if name.startswith("distill/") and isinstance(stage, dict):
            held[name.split("/")[1]].append(stage.get("seed"))
    missing = {}
    for name, stage in on_disk.items():
        if name in stages:
            continue
        seeds = held.get(name.split("/")[1], [])
        if stage.get("seed") in seeds or (None in seeds and stage.get("seed") == run_seed):
            continue
        missing[name] = stage
    return missing


def _config_value(config: dict, field: str):
    """`config`'s dotted `field` ('data.dataset'), or None."""
    value = config
    for key in field.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _stage_result(directory: epath.Path) -> dict | None:
    """The `result.json` a finished stage left in `directory`, or None."""
    result = _read_json_if_there(str(directory / RESULT_FILE))
    return result if isinstance(result, dict) else None


def _finished_students(workdir: epath.Path, config: dict) -> dict[str, dict]:
    """The students that finished in `workdir`, by the stage name `distill.run_all` gives them,
    each result with its student's seed (from `student.json`, or the layout and the config)."""
    students = {}
    root = workdir / "distill"
    if not root.is_dir():
        return students
    for directory in sorted(root.iterdir()):
        label = directory.name
        # A cohort's checkpoint, or a student halfway through a move between seed layouts.
        if label == COHORTS_DIR or label.startswith(".") or not directory.is_dir():
            continue
        result = _stage_result(directory)
        if result is not None:  # The layout of one seed: distill/<label>.
            recorded = _read_json_if_there(str(directory / STUDENT_FILE))
            seed = recorded.get("seed") if isinstance(recorded, dict) else None
            if not isinstance(seed, int):
                seeds = _config_value(config, "distill.seeds") or [config.get("seed")]
                seed = seeds[0] if len(seeds) == 1 else config.get("seed")
            students[f"distill/{label}"] = {**result, "seed": seed}
            continue
        # Several seeds: distill/<label>/seed<k>; its other directories are helper stages.
        for seeded in sorted(directory.iterdir()):
            number = re.fullmatch(r"seed(\d+)", seeded.name)
            result = _stage_result(seeded) if number else None
            if result is not None:
                students[f"distill/{label}/{seeded.name}"] = {**result, "seed": int(number[1])}
    return students


def _read_unfinished_run(config_path: str) -> dict | None:
    """The summary of a workdir without `summary.json` (stopped, or still running), from the
    stages it finished, with COMPLETE_KEY False; None (and a warning) when unusable."""
    try:
        config = _read_json(config_path)
    except (OSError, ValueError) as error:
        logger.warning("skipped %s: unreadable config (%s)", config_path, error)
        return None
    if not isinstance(config, dict):
        logger.warning("skipped %s: not a run's config (not a JSON object)", config_path)
        return None
    workdir = epath.Path(config_path).parent
    try:  # Absent where a config.json was given by hand: the run is then known by its workdir.
        config_hash = (workdir / HASH_FILE).read_text().strip() or None
    except OSError:
        config_hash = None
    stages = {}
    teacher = _stage_result(workdir / TEACHER)  # A loaded teacher leaves none: it was no stage.
    if teacher is not None:
        stages[TEACHER] = teacher
    stages.update(_finished_students(workdir, config))
    summary = {
        "workdir": _absolute(str(workdir)),
        "config_path": None,
        "config_hash": config_hash,
        "seed": config.get("seed"),
        "dataset": _config_value(config, "data.dataset"),
        "teacher_model": _config_value(config, "teacher.model"),
        "student_model": _config_value(config, "student.model"),
        "stages": stages,
        COMPLETE_KEY: False,
    }
    problem = _problem(summary)
    if problem is not None:
        logger.warning("skipped %s: not a run's config (%s)", config_path, problem)
        return None
    logger.warning(
        "%s: run not finished (no %s): reported as a partial run, with the %d stages it finished",
        summary["workdir"],
        SUMMARY_FILE,
        len(stages),
    )
    return {**summary, PATH_KEY: config_path, CONFIG_KEY: config}


def load_summaries(paths: str | Iterable[str]) -> list[dict]:
    """Every usable summary at or under `paths` (local or `gs://`), each file once, a run that
    has not finished included as far as it got (`_read_unfinished_run`); bad ones are warned
    about."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    summaries, seen = [], set()
    runs: dict[tuple, str] = {}  # `_run_identity` -> the file it was read from.
    for path in paths:
        path = str(path)
        if not epath.Path(path).exists():
            logger.warning("skipped %s: no such file or directory", path)
            continue
        files = find_summaries(path)
        if not files:
            logger.warning("no %s found under %s", SUMMARY_FILE, path)
        for file in files:
            # A workdir's config.json stands for the run: its summary when it has one. Any
            # other file is a summary, whatever its name (copied off a cluster run by run).
            unfinished = posixpath.basename(file) == CONFIG_FILE
            if unfinished:
                beside = str(epath.Path(file).parent / SUMMARY_FILE)
                if epath.Path(beside).exists():
                    file, unfinished = beside, False
            # A file reached through two arguments (a workdir and its parent, or its
            # config.json) is read once.
            real = _normalized(file) if _is_remote(file) else os.path.realpath(file)
            if real in seen:
                continue
            seen.add(real)
            summary = _read_unfinished_run(file) if unfinished else _read_summary(file)
            if summary is None:
                continue
            # A run's summary.json beside a copy of it (under another name or path) is one run.
            run = _run_identity(summary)
            if run is not None and run in runs:
                logger.warning(
                    "skipped %s: the run %s (config_hash %s) was read already, from %s; pass"
                    " one copy of each run's summary",
                    file,
                    *run,
                    runs[run],
                )
                continue
            if run is not None:
                runs[run] = file
            summaries.append(summary)
    return summaries


def _run_identity(summary: dict) -> tuple | None:
    """(workdir, config hash) that a run's summary records, wherever the file was copied; None
    for a summary that records no workdir."""
    workdir = summary.get("workdir")
    if not isinstance(workdir, str):
        return None
    config_hash = summary.get("config_hash")
    return (_normalized(workdir), config_hash if isinstance(config_hash, str) else None)


# --- grouping --------------------------------------------------------------------------------


def _number(value) -> float | None:
    """`value` as a finite float, or None (bools are JSON's true/false, not accuracies)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _percent(fraction: float) -> float:
    # Rounding to 1e-6 % drops float noise (75.85000000000001) without losing any test-set count.
    return round(100.0 * fraction, 6)


def _workdir(summary: dict) -> str:
    workdir = summary.get("workdir")
    if isinstance(workdir, str):
        return _normalized(workdir)
    return _normalized(os.path.dirname(_absolute(str(summary.get(PATH_KEY, SUMMARY_FILE)))))


def _student_teacher(summary: dict) -> tuple[str, bool]:
    """(the workdir whose teacher a run's students distil from, whether the run loaded it from
    there): the one it loaded its teacher from, else its own."""
    teacher = summary["stages"].get(TEACHER)
    loaded_from = teacher.get("loaded_from") if isinstance(teacher, dict) else None
    if isinstance(loaded_from, str):
        return _teacher_source(loaded_from), True
    return _workdir(summary), False


def _teacher_source(loaded_from: str) -> str:
    """The workdir that trained a loaded teacher (`W/teacher/variables` or
    `W/teacher/best_variables` -> `W`), else the path."""
    path = _normalized(loaded_from)
    for names in ((VARIABLES_DIR, BEST_VARIABLES_DIR), (TEACHER,)):
        if posixpath.basename(path) in names:
            path = posixpath.dirname(path)
    return path


# Result-affecting fields (`config_lib.result_fields`) that differ between runs of one protocol:
# the seed, where a run reads its inputs (a shared teacher, its copy of the data set, the alpha
# file of its own search), and the evaluation batch (each test example counts once at any size).
_PER_RUN_FIELDS = frozenset(
    (
        "seed",
        "teacher.checkpoint",
        "data.data_dir",
        "data.path",
        "distill.alpha_file",
        "data.eval_batch_size",
    )
)
_ABSENT = "<absent>"


def _result_config(config) -> dict | None:
    """`config`'s result-affecting fields but `_PER_RUN_FIELDS`, read as
    `config_lib.changed_fields` reads them (a field newer than the run holds the value that
    reproduces what the run did); None without a config."""
    if not isinstance(config, dict):
        return None
    own = {
        f"baselines.{field}": method_registry.default_value(default)
        for field, default in method_registry.fields().items()
    }
    fields = {**config_lib.VALUES_BEFORE_THE_FIELD, **own, **config_lib.result_fields(config)}
    return {k: v for k, v in fields.items() if k not in _PER_RUN_FIELDS}


def _teachers_fields(fields: dict | None) -> dict | None:
    """The fields that shape a run's teacher: its own but `teacher.distill_from` (which epoch's
    variables the students use), the data's and the dtype, whatever the run distils after."""
    if fields is None:
        return None
    return {
        k: v
        for k, v in fields.items()
        if (k.startswith(("teacher.", "data.")) or k == "dtype") and k != "teacher.distill_from"
    }


def _affects(label: str | None, field: str) -> bool:
    """Whether config `field` can change the result of a `label` student (None: any stage).

    A student of an aggregation (DFA's variants) or the student alone reads no `baselines.*`
    field, and no student but DFA's reads the search's (the 'start' aggregation its starting
    logit)."""
    if label is None or label == TEACHER:
        return True
    if field.startswith("baselines.") and (
        label == "none" or method_registry.method_of(label) == "dfa"
    ):
        return False
    if field.startswith("search."):
        return label == "dfa" or (label == "start" and field == "search.init_last_logit")
    return True


def _protocol_differences(entries: list[dict], labels: tuple = (None,)) -> list[str]:
    """The protocol fields in which `entries` differ: the stage's `epochs` among those that
    record it, and the config's fields among those whose workdir kept its config.json — of
    those, the ones that can change the result of a student of every one of `labels`."""
    differing = []
    epochs = {e["protocol"]["epochs"] for e in entries if e["protocol"]["epochs"] is not None}
    if len(epochs) > 1:
        differing.append("epochs")
    configs = [e["protocol"]["config"] for e in entries if e["protocol"]["config"] is not None]
    for field in sorted({field for config in configs for field in config}):
        if not all(_affects(label, field) for label in labels):
            continue
        values = {json.dumps(c.get(field, _ABSENT), sort_keys=True) for c in configs}
        if len(values) > 1:
            differing.append(field)
    return differing


def _protocol_value(entry: dict, field: str) -> str:
    """`entry`'s value of a protocol field as JSON, '?' where its run did not record it."""
    if field == "epochs":
        value = entry["protocol"]["epochs"]
        return "?" if value is None else json.dumps(value)
    config = entry["protocol"]["config"]
    return "?" if config is None else json.dumps(config.get(field, _ABSENT), sort_keys=True)


def _cell_name(key: tuple) -> str:
    dataset, teacher, student, label = key
    return (
        f"{dataset} {teacher} teacher"
        if label == TEACHER
        else f"{dataset} {teacher} -> {student} {label}"
    )


def _warn_mixed_protocols(key: tuple, entries: list[dict]) -> None:
    """One warning for a cell whose runs differ in their protocol, naming the fields and the
    runs of each value."""
    differing = _protocol_differences(entries, (key[3],))
    if not differing:
        return
    shown = differing[:4]  # A `:tiny` run differs in many fields; a few say enough.
    runs: dict[str, list[str]] = {}
    for entry in entries:
        values = ", ".join(f"{f}={_protocol_value(entry, f)}" for f in shown)
        runs.setdefault(values, []).append(entry["path"])
    more = f" and {len(differing) - len(shown)} more" if len(differing) > len(shown) else ""
    logger.warning(
        "%s: its runs differ in %s%s (%s); all pooled, probably runs of different protocols:"
        " pass them to separate reports",
        _cell_name(key),
        ", ".join(shown),
        more,
        "; ".join(f"{values}: {', '.join(paths)}" for values, paths in runs.items()),
    )


def _pairing(entry: dict) -> tuple:
    """(run seed, student seed): students of one run seed see the same batches and augmentation,
    and of one student seed start from the same initialisation."""
    return (entry.get("run_seed"), entry["seed"])


def _shared_student_seed(keys: list[tuple]) -> bool:
    """Whether one student seed of `_pairing` keys comes from runs of several run seeds."""
    runs_of = collections.defaultdict(set)
    for run_seed, seed in keys:
        runs_of[seed].add(run_seed)
    return any(len(runs) > 1 for runs in runs_of.values())


def _seed_labels(keys: list[tuple]) -> list:
    """`_pairing` keys as the tables name them, in their order: the student seeds, or
    'run seed/student seed' where one student seed comes from runs of several run seeds (their
    students saw other batches); '?' for a seed not recorded."""
    if _shared_student_seed(keys):
        return [f"{_seed_name(r)}/{_seed_name(k)}" for r, k in keys]
    return [_seed_name(k) for _, k in keys]


def _seed_name(seed):
    return "?" if seed is None else seed


def _seed_order(seed) -> tuple:
    # Numbers in order, then seeds recorded as strings, then none.
    if isinstance(seed, int):
        return (0, seed, "")
    return (1, 0, str(seed)) if seed is not None else (2, 0, "")


def _sorted_keys(keys: Iterable[tuple]) -> list[tuple]:
    """`_pairing` keys in the tables' order: by student seed, numbers in order (by run seed, then
    student seed, where they read 'run/student': `_seed_labels`)."""
    keys = list(keys)
    if _shared_student_seed(keys):
        return sorted(keys, key=lambda k: (_seed_order(k[0]), _seed_order(k[1])))
    return sorted(keys, key=lambda k: (_seed_order(k[1]), _seed_order(k[0])))


def _seed_groups(entries: list[dict]) -> list[tuple[tuple, list[dict]]]:
    """A cell's runs per seed, `[(pairing key, runs), ...]` in `_sorted_keys` order: the runs of
    one `_pairing` key together (a seed run again), each run of an unrecorded seed alone."""
    groups: dict[tuple, list[dict]] = {}
    alone = []
    for entry in entries:
        if entry["seed"] is None:
            alone.append((_pairing(entry), [entry]))
        else:
            groups.setdefault(_pairing(entry), []).append(entry)
    order = {key: i for i, key in enumerate(_sorted_keys([*groups, *(k for k, _ in alone)]))}
    return sorted([*groups.items(), *alone], key=lambda group: order[group[0]])


def _seed_value(runs: list[dict], field: str) -> float | None:
    """One seed's `field` ('last' or 'best'): the mean over its runs that have it, so that a seed
    run twice counts once; None where none has it."""
    values = [e[field] for e in runs if e[field] is not None]
    return round(float(np.mean(values)), 6) if values else None


def _seed_stats(groups: list[tuple[tuple, list[dict]]], field: str) -> dict:
    """`cell_stats` over `_seed_groups`' seeds of their `field` ('last' or 'best'), one value
    per seed (`_seed_value`)."""
    values = (_seed_value(runs, field) for _, runs in groups)
    return cell_stats(v for v in values if v is not None)


def _cell_seeds(entries: list[dict]) -> list:
    """The seeds of a cell's n (those with a last-epoch accuracy) by `_seed_labels`, in
    student-seed order (run-seed order where they read 'run/student'), each once."""
    keys = [key for key, runs in _seed_groups(entries) if _seed_value(runs, "last") is not None]
    return _seed_labels(keys)


def _repeated_seeds(groups: list[tuple[tuple, list[dict]]]) -> list[str]:
    """`<seed>x<runs>` for each seed of `_seed_groups` that several runs hold (`_seed_labels`)."""
    labels = _seed_labels([key for key, _ in groups])
    return [f"{label}x{len(runs)}" for label, (_, runs) in zip(labels, groups) if len(runs) > 1]


def _warn_duplicate_seeds(key: tuple, entries: list[dict]) -> None:
    """One warning per seed that more than one run of this cell used."""
    for (_, seed), runs in _seed_groups(entries):
        if len(runs) > 1:
            logger.warning(
                "%s: seed %s is in %d runs (%s): counted once, as their mean (probably a"
                " duplicate run: pass one of them, or train reruns with seeds of their own)",
                _cell_name(key),
                seed,
                len(runs),
                ", ".join(e["path"] for e in runs),
            )


def collect(summaries: Iterable[dict]) -> dict[tuple, list[dict]]:
    """Groups the runs' test accuracies (%) per table cell.

    Returns `{(dataset, teacher_model, student_model, label): [entry, ...]}` with one entry
    `{'seed', 'last', 'best', 'path', 'protocol'}` per stage that has a last-epoch accuracy
    ('best' may be None; a student's also 'run_seed', the seed of its run's batches). Labels are
    those of the `distill/<label>` stages; the teachers are under
    `(dataset, teacher_model, None, 'teacher')`, one entry per distinct teacher: a teacher loaded
    from another workdir (`loaded_from`) counts once, as the run that trained it when that run is
    among `summaries` (else, loaded from best-epoch variables, with that accuracy as its 'best'
    and no 'last'), and teachers trained with the same seed and protocol (each pair's run trains
    its own by default) count once. Same-seed runs of a student cell are all kept, with a
    warning (the tables count them as one seed, their mean: `_seed_groups`); so are runs of
    different protocols in one cell (a stage's `epochs`, the config's result-affecting fields but
    the seeds and where inputs are read from), which the tables mark.
    """
    cells: dict[tuple, list[dict]] = {}
    # (dataset, teacher_model) -> {teacher's workdir: (loaded, entry)}
    teachers: dict[tuple, dict[str, tuple[bool, dict]]] = {}
    for summary in summaries:
        path = summary.get(PATH_KEY, "<summary>") if isinstance(summary, dict) else "<summary>"
        problem = _problem(summary)
        if problem is not None:
            logger.warning("skipped %s: not a run summary (%s)", path, problem)
            continue
        dataset, teacher, student = (
            summary["dataset"],
            summary["teacher_model"],
            summary["student_model"],
        )
        seed = summary.get("seed")
        fields = _result_config(summary.get(CONFIG_KEY))
        for name, result in summary["stages"].items():
            # Partial runs: a stage without a last-epoch accuracy (or the search) has no cell.
            last = _number(result.get("last_accuracy")) if isinstance(result, dict) else None
            if last is None:
                continue
            best = _number(result.get("best_accuracy"))
            epochs = result.get("epochs")
            entry = {
                # A seed that is no number or string is as good as none (and stays hashable).
                "seed": seed if isinstance(seed, (int, str)) else None,
                "last": _percent(last),
                "best": None if best is None else _percent(best),
                "path": path,
                "protocol": {
                    "epochs": epochs if isinstance(epochs, int) else None,
                    "config": fields,
                },
            }
            if name == TEACHER:
                loaded_from = result.get("loaded_from")
                loaded = isinstance(loaded_from, str)
                if loaded:
                    entry["seed"] = None  # The loading run's seed is not the teacher's.
                    # Nor its config the protocol that trained it.
                    entry["protocol"] = {"epochs": None, "config": None}
                    if posixpath.basename(_normalized(loaded_from)) == BEST_VARIABLES_DIR:
                        # Its accuracy is the best epoch's: never a last-epoch number.
                        entry["best"], entry["last"] = entry["last"], None
                else:
                    entry["protocol"]["config"] = _teachers_fields(fields)
                source = _teacher_source(loaded_from) if loaded else _workdir(summary)
                by_source = teachers.setdefault((dataset, teacher), {})
                # The run that trained a teacher knows its seed and its true last epoch.
                if source not in by_source or (by_source[source][0] and not loaded):
                    by_source[source] = (loaded, entry)
                elif by_source[source][0] and loaded:
                    # Runs that loaded its last epoch's variables and its best's (its trainer
                    # not given): the one teacher has the former's last and the latter's best.
                    kept = by_source[source][1]
                    if kept["last"] is None:
                        kept["last"] = entry["last"]
                    if entry["last"] is None:
                        kept["best"] = entry["best"]
            elif name.startswith("distill/"):
                label = name[len("distill/") :]
                # The run's seed sets the batches and augmentation its students share: with the
                # student's seed, what `paired_rows` pairs by.
                entry["run_seed"] = entry["seed"]
                # Where its teacher came from: the workdir that trained it.
                entry["teacher_from"], entry["teacher_loaded"] = _student_teacher(summary)
                # A run of several seeds names each student `distill/<label>/seed<k>`; a run of
                # one records its student's seed in its result (older runs: the run's seed).
                seeded = re.fullmatch(r"(.+)/seed(\d+)", label)
                if seeded:
                    label, entry["seed"] = seeded.group(1), int(seeded.group(2))
                elif isinstance(result.get("seed"), int):
                    entry["seed"] = result["seed"]
                cells.setdefault((dataset, teacher, student, label), []).append(entry)
    for key, entries in cells.items():
        _warn_duplicate_seeds(key, entries)
    for (dataset, teacher), by_source in teachers.items():
        kept = []
        for _, entry in by_source.values():
            # One seed and one protocol: one teacher, trained again by each run of its pair.
            if entry["seed"] is None or not any(
                other["seed"] == entry["seed"] and not _protocol_differences([other, entry])
                for other in kept
            ):
                kept.append(entry)
        cells[(dataset, teacher, None, TEACHER)] = kept
    for key, entries in cells.items():
        _warn_mixed_protocols(key, entries)
    return cells


def cell_stats(values: Iterable[float]) -> dict:
    """`{'n', 'median', 'mean', 'std'}` of `values`; std is the sample std (ddof=1).

    With no values all but n are None; with one value std is None (a sample std needs two).
    """
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        return {"n": 0, "median": None, "mean": None, "std": None}
    return {
        "n": int(array.size),
        "median": round(float(np.median(array)), 6),
        "mean": round(float(np.mean(array)), 6),
        "std": round(float(np.std(array, ddof=1)), 6) if array.size > 1 else None,
    }


# --- tables ----------------------------------------------------------------------------------


def _cell_row(table: int, collected: dict, pair: tuple, label: str) -> dict:
    """One cell as a CSV-shaped row: accuracies in %, None where there is nothing."""
    dataset, teacher, student = pair
    key = (dataset, teacher, None, TEACHER) if label == TEACHER else (*pair, label)
    entries = collected.get(key, [])
    # Per seed, not per run: a seed that several runs hold is one value, their mean.
    groups = _seed_groups(entries)
    stats, best = _seed_stats(groups, "last"), _seed_stats(groups, "best")
    paper = paper_results.paper_value(table, dataset, teacher, student, label)
    source, epoch = paper_results.published_statistic(table, label)
    return {
        "table": table,
        "dataset": dataset,
        "teacher": teacher,
        "student": student,
        "method": label,
        "n": stats["n"],
        "seeds": _cell_seeds(entries),
        "median_last": stats["median"],
        "mean_last": stats["mean"],
        "std_last": stats["std"],
        "median_best": best["median"],
        "paper": paper,
        # Who published the number and which epoch's it is: nothing where there is no number.
        "paper_source": None if paper is None else source,
        "paper_epoch": None if paper is None else epoch,
        "preset": _preset(entries) if label in PRESET_METHODS else None,
        "protocols_differ": _protocol_differences(entries, (label,)),
        "repeated_seeds": _repeated_seeds(groups),
    }


def _preset(entries: list[dict]) -> str | None:
    """The `baselines.preset` of a cell's runs: 'peers', 'authors', 'mixed', or None (no run
    recorded its config)."""
    presets = {
        e["protocol"]["config"].get("baselines.preset", "peers")
        for e in entries
        if e["protocol"]["config"] is not None
    }
    if not presets:
        return None
    return presets.pop() if len(presets) == 1 else "mixed"


def _repeats_text(repeated: list[str]) -> str:
    """`['0x2', '3x3']` (`_repeated_seeds`) as `seeds 0 ×2, 3 ×3`."""
    counts = [item.rpartition("x") for item in repeated]
    word = "seed" if len(counts) == 1 else "seeds"
    return f"{word} " + ", ".join(f"{seed} ×{count}" for seed, _, count in counts)


def _protocols_mark(fields: list[str]) -> str:
    """` ⟨protocols differ: epochs, …⟩` for runs pooled across those fields, or ''."""
    if not fields:
        return ""
    shown = ", ".join(fields[:3])  # A `:tiny` run differs in many: the CSV lists them all.
    more = f" and {len(fields) - 3} more" if len(fields) > 3 else ""
    return f" ⟨protocols differ: {shown}{more}⟩"


def _marks(row: dict) -> str:
    """What a cell pools beyond one run per seed of one protocol: ` ⟨seed 0 ×2⟩ ⟨protocols
    differ: epochs⟩`, or ''."""
    repeated = row.get("repeated_seeds")
    text = f" ⟨{_repeats_text(repeated)}⟩" if repeated else ""
    return text + _protocols_mark(row.get("protocols_differ"))


def format_cell(row: dict) -> str:
    """`median (mean±std, n=N; best B) [paper P]`, or `–` (still with the paper's number); a
    number another source published reads `[SOURCE, last|best epoch P]`."""
    if row["n"] == 0:
        text = MISSING
        if row["median_best"] is not None:  # A teacher known by its best epoch alone.
            text += f" (best {row['median_best']:.2f})"
    else:
        std = MISSING if row["std_last"] is None else f"{row['std_last']:.2f}"
        text = f"{row['median_last']:.2f} ({row['mean_last']:.2f}±{std}, n={row['n']}"
        if row["median_best"] is not None:
            text += f"; best {row['median_best']:.2f}"
        text += ")"
    if row.get("preset") in ("authors", "mixed"):
        text += " ⟨authors⟩" if row["preset"] == "authors" else " ⟨peers + authors⟩"
    text += _marks(row)
    if row["paper"] is not None:
        source = row.get("paper_source", "paper")
        if source == "paper":
            text += f" [paper {row['paper']:.2f}]"
        else:
            text += f" [{source}, {row['paper_epoch']} epoch {row['paper']:.2f}]"
    return text


def _pairs(table: int, collected: dict, labels: Iterable[str]) -> list[tuple]:
    """(dataset, teacher, student) with a run of one of the table's student `labels`.

    CINIC-10 pairs belong to Table 4, all others to Tables 2 and 5; a CINIC-10 pair joins Table 5
    too where it has a run of an aggregation Table 4 has no column for (Last, Average, Random,
    Start); the logit table takes every dataset's. The paper's pairs come first, in its order.
    Teacher-only runs make no row: they only fill their dataset's Teacher cells.
    """
    labels = set(labels) - {TEACHER}
    table4_labels = {label for label, _ in TABLE4_COLUMNS}

    def belongs(pair, label) -> bool:
        if table == paper_results.CRD:  # The CRD suite's pairs alone (they are Table 2's too).
            return paper_results.pair_number(table, *pair) is not None
        if table == LOGITS:  # Any dataset's pairs.
            return True
        if pair[0] == CINIC10:
            return table == 4 or (table == 5 and label not in table4_labels)
        return table != 4

    pairs = {
        key[:3]
        for key, entries in collected.items()
        if key[3] in labels and entries and belongs(key[:3], key[3])
    }

    def order(pair):
        number = paper_results.pair_number(table, *pair)
        return (number is None, number or 0, pair)

    return sorted(pairs, key=order)


def _pair_name(table: int, pair: tuple) -> str:
    number = paper_results.pair_number(table, *pair)
    name = f"{pair[1]} → {pair[2]}"
    return name if number is None else f"({number}) {name}"


def _pair_heading(table, pair: tuple) -> str:
    """`dataset: teacher → student` (with the paper's pair number where it is one of its)."""
    return f"{pair[0]}: {_pair_name(table, pair)}"


def _markdown(
    title: str,
    header: list[str],
    body: list[list[str]],
    note: str = _NOTE,
    footer: list[str] = (),
) -> str:
    if not body:
        return f"{title}\n\nNo runs for this table.\n"
    lines = [title, "", note, ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines.extend("| " + " | ".join(cells) + " |" for cells in body)
    if footer:
        lines += ["", *footer]
    return "\n".join(lines) + "\n"


_SEEDS_LEGEND = (
    "Seeds of each cell's n (student seeds; run seed/student seed where runs of several run"
    " seeds share a student seed; ? not recorded):"
)


def _seeds_footer(table, cells: list[tuple[tuple, list[tuple[str, dict]]]]) -> list[str]:
    """The markdown lines under a table that name its cells' seeds: per pair, each set of seeds
    with the columns (or rows) that have it, in the table's order: `cells` is
    `[(pair, [(header, row), ...]), ...]`."""
    lines = []
    for pair, named in cells:
        by_seeds: dict[str, list[str]] = {}
        for name, row in named:
            if row["seeds"]:
                by_seeds.setdefault(", ".join(str(s) for s in row["seeds"]), []).append(name)
        if by_seeds:
            sets = "; ".join(f"{seeds} ({', '.join(names)})" for seeds, names in by_seeds.items())
            lines.append(f"- {_pair_heading(table, pair)}: {sets}")
    return [_SEEDS_LEGEND, *lines] if lines else []


_CRD_NOTE = (
    _SEEDS_NOTE + " [RepDistiller, last epoch x]: its README's number, its last epoch's accuracy:"
    " set it beside the cell's first number. [mdistiller, best epoch x] (DKD): its README's"
    " number, its trainer's best epoch averaged over its runs: set it beside the cell's best."
    f" {MISSING}: no run." + _MARKS_NOTE
)


def _pairs_by_methods(
    table, title: str, columns: tuple, summaries, collected, pair_labels=None, note: str = _NOTE
) -> tuple:
    """Tables 2 and 4 (and the logit table): a row per pair, a column per method; a pair has a
    row when it has a run of one of `pair_labels` (None: of the columns)."""
    collected = collect(summaries) if collected is None else collected
    rows, body, named = [], [], []
    labels = [label for label, _ in columns] if pair_labels is None else pair_labels
    for pair in _pairs(table, collected, labels):
        cells = [_cell_row(table, collected, pair, label) for label, _ in columns]
        rows.extend(cells)
        body.append([pair[0], _pair_name(table, pair)] + [format_cell(c) for c in cells])
        named.append((pair, [(name, cell) for (_, name), cell in zip(columns, cells)]))
    header = ["Dataset", "Pair"] + [name for _, name in columns]
    footer = _seeds_footer(table, named)
    return _markdown(title, header, body, note + _TEACHER_NOTE, footer), rows


def table2(summaries: Iterable[dict], collected: dict | None = None) -> tuple[str, list[dict]]:
    """Table 2 (distillation methods; every non-CINIC-10 pair): `(markdown, rows)`.

    `rows` holds one CSV_FIELDS dict per (pair, method) cell. Pass `collected` (from `collect`) to
    reuse one grouping, and its warnings, across tables.
    """
    title = "### Table 2: distillation methods (CIFAR-100 in the paper)"
    return _pairs_by_methods(2, title, table2_columns(), summaries, collected)


def logit_table(summaries: Iterable[dict], collected: dict | None = None) -> tuple[str, list[dict]]:
    """The later logit baselines beside the student alone and KD, a row per pair of any dataset
    with a run of one of them (no paper numbers: the paper has none of them): `(markdown, rows)`,
    rows' `table` 'logits'; none when no such run (`--table all` then writes no file)."""
    title = "### Later logit baselines (DKD, DIST, logit standardisation; not in the paper)"
    columns = logit_columns()
    own = [label for label, _ in columns if method_registry.REGISTRY.get(label) is not None]
    own = [label for label in own if method_registry.REGISTRY[label].table == LOGITS]
    return _pairs_by_methods(LOGITS, title, columns, summaries, collected, own)


def table4(summaries: Iterable[dict], collected: dict | None = None) -> tuple[str, list[dict]]:
    """Table 4 (CINIC-10 pairs; DFA-T is the 'file' aggregation): `(markdown, rows)`."""
    title = "### Table 4: CINIC-10 (ShuffleNetV2 in the paper)"
    return _pairs_by_methods(4, title, TABLE4_COLUMNS, summaries, collected)


# The CRD suite's columns: RepDistiller's methods that are also ours, CRD and DKD (published
# numbers beside any runs of them), then DFA.
CRD_COLUMNS = (
    (TEACHER, "Teacher"),
    ("none", "Student"),
    ("kd", "KD"),
    ("fitnets", "FitNets"),
    ("at", "AT"),
    ("sp", "SP"),
    ("ab", "AB"),
    ("ft", "FT"),
    ("crd", "CRD"),
    ("dkd", "DKD"),
    ("dfa", "DFA"),
)


def table_crd(summaries: Iterable[dict], collected: dict | None = None) -> tuple[str, list[dict]]:
    """RepDistiller's CIFAR-100 benchmark (configs/crd/): a row per pair of it that has runs, the
    published numbers of RepDistiller and mdistiller beside ours; `(markdown, rows)`."""
    title = "### CRD suite: RepDistiller's CIFAR-100 pairs (published: RepDistiller, mdistiller)"
    return _pairs_by_methods(
        paper_results.CRD, title, CRD_COLUMNS, summaries, collected, note=_CRD_NOTE
    )


def table5(summaries: Iterable[dict], collected: dict | None = None) -> tuple[str, list[dict]]:
    """Table 5 (aggregation schemes): a row per scheme, a column per pair (CINIC-10's too where it
    has a run of an aggregation Table 4 has no column for); `(markdown, rows)`."""
    collected = collect(summaries) if collected is None else collected
    pairs = _pairs(5, collected, (label for label, _ in TABLE5_ROWS))
    shown = [
        (label, name)
        for label, name in TABLE5_ROWS
        if label not in TABLE5_OWN_ROWS or any((*pair, label) in collected for pair in pairs)
    ]
    cells = {pair: [_cell_row(5, collected, pair, label) for label, _ in shown] for pair in pairs}
    rows = [cells[pair][i] for i in range(len(shown)) for pair in pairs]
    # The paper heads its columns by student alone (its one dataset and teacher); ours name the
    # runs' dataset and teacher too, as Table 2's rows do.
    header = ["Method"] + [_pair_heading(5, pair) for pair in pairs]
    body = [
        [name] + [format_cell(cells[pair][i]) for pair in pairs]
        for i, (_, name) in enumerate(shown)
    ]
    named = [
        (pair, [(name, cells[pair][i]) for i, (_, name) in enumerate(shown)]) for pair in pairs
    ]
    title = "### Table 5: aggregation schemes (CIFAR-100, teacher wrn_28_4 in the paper)"
    footer = _seeds_footer(5, named)
    return _markdown(title, header, body if pairs else [], footer=footer), rows


# --- DFA against the other aggregations, paired per seed --------------------------------------

# 'start' (not in the paper): the search's starting alpha, so DFA - Start is what the search added.
PAIRED_AGAINST = ("last", "average", "random", "start")
PAIRED_FIELDS = (
    "dataset",
    "teacher",
    "student",
    "against",
    "n",
    "seeds",
    "differences",
    "mean",
    "ci95_low",
    "ci95_high",
    "paper",
    # The protocol fields in which the row's runs differ across its seeds, within DFA's or the
    # other's, ';'-joined: empty when each side's runs share one protocol.
    "protocols_differ",
    # Seeds that several runs of a side hold, each `<seed>x<DFA's runs>/<the other's runs>`,
    # ';'-joined: each side's runs of that seed count as their mean (as the tables' cells).
    "repeated_seeds",
)
# Student's t quantile t(0.975, df) for df = 1..30; beyond, its expansion around the normal's.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the half-width factor of a two-sided 95 % interval of a mean (df >= 1)."""
    if df < 1:
        raise ValueError(f"t_quantile_975: df = {df}; an interval needs two values (df >= 1)")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_difference(differences: Iterable[float]) -> dict:
    """`{'n', 'mean', 'ci95_low', 'ci95_high'}` of per-seed differences: the mean and its 95 %
    Student-t interval, mean ± t(0.975, n-1) * std / sqrt(n) (None for fewer than two)."""
    d = np.asarray(list(differences), dtype=np.float64)
    if d.size == 0:
        return {"n": 0, "mean": None, "ci95_low": None, "ci95_high": None}
    mean = float(np.mean(d))
    if d.size < 2:
        return {"n": 1, "mean": round(mean, 6), "ci95_low": None, "ci95_high": None}
    half = t_quantile_975(d.size - 1) * float(np.std(d, ddof=1)) / math.sqrt(d.size)
    return {
        "n": int(d.size),
        "mean": round(mean, 6),
        "ci95_low": round(mean - half, 6),
        "ci95_high": round(mean + half, 6),
    }


def _by_pairing(entries: list[dict]) -> dict[tuple, list[dict]]:
    """`entries` with a seed, by `_pairing` key."""
    keyed: dict[tuple, list[dict]] = {}
    for entry in entries:
        if entry["seed"] is not None:
            keyed.setdefault(_pairing(entry), []).append(entry)
    return keyed


def _pair_problem(a: dict, b: dict, label: str) -> str | None:
    """Why DFA's run `a` and `label`'s run `b` of one pairing key make no pair (None: they do): a
    protocol field that can change both students' results differs (they would not differ in
    alpha alone), or they distil from other teachers."""
    differing = _protocol_differences([a, b], ("dfa", label))
    if a.get("teacher_loaded") or b.get("teacher_loaded"):
        # A run that loaded its teacher holds teacher fields it never used: compare teachers
        # by where they were trained instead.
        if a["teacher_from"] != b["teacher_from"]:
            return f"they distil from other teachers ({a['teacher_from']} vs {b['teacher_from']})"
        differing = [f for f in differing if not f.startswith("teacher.")]
    if differing:
        values = "; ".join(
            f"{f}: {_protocol_value(a, f)} vs {_protocol_value(b, f)}" for f in differing[:4]
        )
        return f"their runs differ in {values} ({a['path']} vs {b['path']})"
    return None


def _pairing_problem(dfa: list[dict], other: list[dict], label: str) -> str | None:
    """Why DFA's runs `dfa` and `label`'s runs `other` of one pairing key make no pair (None:
    they do): `_pair_problem` of any DFA run and any of the other's (a seed run again on a side
    pairs as its runs' mean, so each of them must pair)."""
    for a in dfa:
        for b in other:
            problem = _pair_problem(a, b, label)
            if problem is not None:
                return problem
    return None


def _union(*lists: list[str]) -> list[str]:
    """The items of `lists`, each once, in their first list's order."""
    return list(dict.fromkeys(item for items in lists for item in items))


def paired_rows(collected: dict) -> list[dict]:
    """Per pair with DFA runs (Table 5's, then CINIC-10's), DFA's last-epoch accuracy minus Last's,
    Average's, Random's and Start's of the same run seed and student seed (`_pairing`: they see
    the same batches and start from the same student, only alpha differs, so the paired interval
    is the honest one), with the paper's difference where it has both numbers. A seed that
    several runs of one side hold pairs as that side's mean over them, as in the tables' cells
    (marked); a seed whose runs differ from the other side's in a protocol field that can change
    both students is left out with a warning; a row whose seeds' runs differ in protocol within
    a side is marked."""
    rows = []
    for pair in _pairs(5, collected, ["dfa"]) + _pairs(4, collected, ["dfa"]):
        dfa = _by_pairing(collected.get((*pair, "dfa"), []))
        for other in PAIRED_AGAINST:
            theirs = _by_pairing(collected.get((*pair, other), []))
            keys = []
            for k in _sorted_keys(set(dfa) & set(theirs)):
                problem = _pairing_problem(dfa[k], theirs[k], other)
                if problem is None:
                    keys.append(k)
                else:
                    logger.warning(
                        "%s: DFA − %s of seed %s not paired: %s",
                        _cell_name((*pair, "dfa")),
                        other.capitalize(),
                        "/".join(str(part) for part in k),
                        problem,
                    )
            if not keys:
                continue
            differences = [
                round(_seed_value(dfa[k], "last") - _seed_value(theirs[k], "last"), 6) for k in keys
            ]
            # The student seeds, or 'run seed/student seed' where runs of other seeds reuse them.
            seeds = _seed_labels(keys)
            repeated = [
                f"{seed}x{len(dfa[k])}/{len(theirs[k])}"
                for seed, k in zip(seeds, keys)
                if len(dfa[k]) > 1 or len(theirs[k]) > 1
            ]
            # Across the row's seeds: each side's runs, by the fields its students read.
            differing = _union(
                _protocol_differences([e for k in keys for e in dfa[k]], ("dfa",)),
                _protocol_differences([e for k in keys for e in theirs[k]], (other,)),
            )
            paper_dfa = paper_results.paper_value(5, *pair, "dfa")
            paper_other = paper_results.paper_value(5, *pair, other)
            paper = None if None in (paper_dfa, paper_other) else round(paper_dfa - paper_other, 6)
            rows.append(
                {
                    "dataset": pair[0],
                    "teacher": pair[1],
                    "student": pair[2],
                    "against": other,
                    "seeds": seeds,
                    "differences": differences,
                    "paper": paper,
                    **paired_difference(differences),
                    "protocols_differ": differing,
                    "repeated_seeds": repeated,
                }
            )
    return rows


def paired_table(summaries: Iterable[dict], collected: dict | None = None) -> tuple[str, list]:
    """DFA minus Last / Average / Random / Start per seed, mean and 95 % interval:
    `(markdown, rows)`."""
    collected = collect(summaries) if collected is None else collected
    rows = paired_rows(collected)
    title = "### DFA against the other aggregations (Last, Average, Random, Start), paired per seed"
    note = (
        "DFA's last-epoch test accuracy minus the other aggregation's, per seed (points): the mean"
        " and its 95 % Student-t interval over seeds, per comparison (not adjusted for the"
        " table's several); an interval that excludes 0 separates them over what the seeds"
        " varied: with one run's `distill.seeds`, the students' initialisation alone (one"
        " teacher, one search, one batch order), not another search or teacher."
        " [paper x]: the paper's difference of the two (runs and epoch unstated, as its tables)."
        " A seed that several runs of a side hold counts once, as their mean, as in the tables'"
        " cells: `0 (DFA ×2)`. ⟨protocols differ: …⟩: the row's runs differ in those fields across"
        " its seeds, within DFA's or the other's (all of them in the CSV's `protocols_differ`):"
        " give such runs to separate reports."
    )
    body = []
    for r in rows:
        interval = (
            MISSING if r["ci95_low"] is None else f"[{r['ci95_low']:+.2f}, {r['ci95_high']:+.2f}]"
        )
        paper = "" if r["paper"] is None else f" [paper {r['paper']:+.2f}]"
        against = r["against"].capitalize()
        repeats = {}  # Seed label -> its runs on each side, where a side has several.
        for item in r["repeated_seeds"]:
            seed, _, counts = item.rpartition("x")
            ours, theirs = counts.split("/")
            named = [f"DFA ×{ours}"] * (ours != "1") + [f"{against} ×{theirs}"] * (theirs != "1")
            repeats[seed] = f" ({', '.join(named)})"
        per_seed = ", ".join(
            f"{k}{repeats.get(str(k), '')}: {d:+.2f}" for k, d in zip(r["seeds"], r["differences"])
        )
        body.append(
            [
                f"{r['dataset']}: {r['teacher']} → {r['student']}",
                f"DFA − {against}",
                str(r["n"]),
                per_seed,
                f"{r['mean']:+.2f}{paper}{_protocols_mark(r['protocols_differ'])}",
                interval,
            ]
        )
    header = ["Pair", "Difference", "n", "per seed", "mean", "95 % interval"]
    return _markdown(title, header, body, note=note), rows


def _write_csv_rows(path: str, fields: tuple, rows: Iterable[dict]) -> None:
    # Written whole through epath: --out may be a bucket too.
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    epath.Path(path).write_text(text.getvalue())


def write_paired_csv(rows: list[dict], path: str) -> None:
    """`rows` of `paired_rows` as CSV (seeds, differences and the other lists joined by ';')."""
    _write_csv_rows(path, PAIRED_FIELDS, [_flat(row, PAIRED_FIELDS) for row in rows])


def _flat(row: dict, fields: tuple) -> dict:
    """`row`'s `fields` as CSV values: lists joined by ';', None an empty field."""
    values = {k: row[k] for k in fields}
    for k, v in values.items():
        if isinstance(v, list):
            values[k] = ";".join(str(item) for item in v)
    return {k: "" if v is None else v for k, v in values.items()}


# --- the searched alpha (the paper's Fig. 4, left) -------------------------------------------

ALPHA = "alpha"
ALPHA_FIELDS = (
    "dataset",
    "teacher",
    "student",
    "run",  # The run's directory (where its alpha.json is).
    "seed",  # The run's seed (its search's), where its summary or config records it.
    "group",
    "layers",  # The group's teacher maps, shallow to deep, ';'-joined: the last is Last's one.
    "alpha",  # The searched alpha, ';'-joined in the maps' order.
    "beta",
    "one_minus_alpha_last",  # 1 - alpha of the last map: how far from Last (0 = Last).
    "start_one_minus_alpha_last",  # The same at the search's start ('start' aggregation).
)


def _run_directory(summary: dict) -> str | None:
    """The directory of a run's files: that of its summary.json (or config.json), else the
    workdir its summary names (a summary copied elsewhere under its own name)."""
    path = str(summary.get(PATH_KEY, ""))
    if posixpath.basename(path) in (SUMMARY_FILE, CONFIG_FILE):
        return str(epath.Path(path).parent)
    workdir = summary.get("workdir")
    return workdir if isinstance(workdir, str) else None


def _alpha_problem(record) -> str | None:
    """Why `record` (an alpha.json's content) is not one search.py writes, or None."""
    groups = record.get("groups") if isinstance(record, dict) else None
    if not isinstance(groups, list) or not groups:
        return "no 'groups' list"
    for i, group in enumerate(groups):
        if not isinstance(group, dict):
            return f"group {i + 1} is not a JSON object"
        layers, alpha = group.get("layers"), group.get("alpha")
        if not isinstance(layers, list) or not all(isinstance(n, str) for n in layers):
            return f"group {i + 1} has no 'layers' list of names"
        if not isinstance(alpha, list) or not alpha or any(_number(a) is None for a in alpha):
            return f"group {i + 1} has no 'alpha' list of numbers"
        if len(alpha) != len(layers):
            return f"group {i + 1} has {len(alpha)} alpha for {len(layers)} layers"
    return None


def _start_distance(config, maps: int) -> float | None:
    """1 - alpha of the last map at the search's start, softmax of `search.init_last_logit` on
    the last map's logit and 0 on the others' (`methods.dfa.init_beta`), or None unrecorded."""
    logit = _number(_config_value(config, "search.init_last_logit")) if config else None
    if logit is None:
        return None
    return round((maps - 1) / (math.exp(logit) + maps - 1), 6)


def _table_of(pair: tuple) -> int:
    # The table of the paper's that numbers a pair's aggregations: 4 for CINIC-10's, else 5.
    return 4 if pair[0] == CINIC10 else 5


def alpha_rows(summaries: Iterable[dict]) -> list[dict]:
    """Per run with a search (its `alpha.json` beside its summary), per teacher group, an
    ALPHA_FIELDS row (lists where the CSV joins by ';'): pairs in the paper's order (Tables 5
    and 4), then runs by seed and directory. An unreadable or malformed alpha.json is warned
    about and skipped."""
    found = []
    for summary in summaries:
        if _problem(summary) is not None:
            continue
        directory = _run_directory(summary)
        path = None if directory is None else str(epath.Path(directory) / ALPHA_FILE)
        if path is None or not epath.Path(path).exists():
            continue
        try:
            record = _read_json(path)
        except (OSError, ValueError) as error:
            logger.warning("skipped %s: unreadable alpha (%s)", path, error)
            continue
        problem = _alpha_problem(record)
        if problem is not None:
            logger.warning("skipped %s: not a search's alpha.json (%s)", path, problem)
            continue
        pair = (summary["dataset"], summary["teacher_model"], summary["student_model"])
        seed = summary.get("seed")
        seed = seed if isinstance(seed, (int, str)) and not isinstance(seed, bool) else None
        found.append((pair, seed, directory, record, summary.get(CONFIG_KEY)))

    def order(run):
        pair, seed, directory = run[:3]
        number = paper_results.pair_number(_table_of(pair), *pair)
        return (pair[0] == CINIC10, number is None, number or 0, pair, _seed_order(seed), directory)

    rows = []
    for pair, seed, directory, record, config in sorted(found, key=order):
        for i, group in enumerate(record["groups"]):
            alpha = [round(float(a), 6) for a in group["alpha"]]
            beta = group.get("beta")  # Only the CSV shows it; a file without it is still read.
            if not isinstance(beta, list) or any(_number(b) is None for b in beta):
                beta = None
            rows.append(
                {
                    "dataset": pair[0],
                    "teacher": pair[1],
                    "student": pair[2],
                    "run": directory,
                    "seed": seed,
                    "group": group.get("group", i + 1),
                    "layers": list(group["layers"]),
                    "alpha": alpha,
                    "beta": None if beta is None else [round(float(b), 6) for b in beta],
                    "one_minus_alpha_last": round(1.0 - float(group["alpha"][-1]), 6),
                    "start_one_minus_alpha_last": _start_distance(config, len(alpha)),
                }
            )
    return rows


def alpha_table(summaries: Iterable[dict], collected: dict | None = None) -> tuple[str, list]:
    """The searched alpha per run and group (the paper's Fig. 4, left): `(markdown, rows)`;
    `collected` is not read (the alpha is no cell), only taken as the other tables take it."""
    del collected
    rows = alpha_rows(summaries)
    title = "### Searched alpha (the paper's Fig. 4, left): per group, the weight on each map"
    note = (
        "Per run with a search (its alpha.json), per teacher group: its maps, shallow to deep"
        " (the last is the group's output, Last's only map), the searched alpha on each, and"
        " 1 − α_last, how far the search left Last (0: Last itself). At start: the same at the"
        " search's start (softmax of `search.init_last_logit` on the last map: the 'start'"
        f" aggregation), {MISSING} where the run's config does not record it. Seed: the run's"
        " (its search's)."
    )
    body = []
    for r in rows:
        pair = (r["dataset"], r["teacher"], r["student"])
        start = r["start_one_minus_alpha_last"]
        body.append(
            [
                _pair_heading(_table_of(pair), pair),
                r["run"],
                MISSING if r["seed"] is None else str(r["seed"]),
                str(r["group"]),
                ", ".join(r["layers"]),
                ", ".join(f"{a:.3f}" for a in r["alpha"]),
                f"{r['one_minus_alpha_last']:.3f}",
                MISSING if start is None else f"{start:.3f}",
            ]
        )
    header = ["Pair", "Run", "Seed", "Group", "Maps", "α", "1 − α_last", "at start"]
    return _markdown(title, header, body, note=note), rows


def write_alpha_csv(rows: list[dict], path: str) -> None:
    """`rows` of `alpha_rows` as CSV (layers, alpha and beta joined by ';')."""
    flat = []
    for row in rows:
        values = {k: row[k] for k in ALPHA_FIELDS}
        for field in ("layers", "alpha", "beta"):
            if values[field] is not None:
                values[field] = ";".join(str(v) for v in values[field])
        flat.append({k: "" if v is None else v for k, v in values.items()})
    _write_csv_rows(path, ALPHA_FIELDS, flat)


TABLES = {"2": table2, "5": table5, "4": table4, "crd": table_crd, LOGITS: logit_table}


def unshown_cells(collected: dict, rows: Iterable[dict]) -> list[tuple]:
    """The keys of `collected` (`collect`) with a result that none of the tables' `rows` (cells)
    shows: a method on a dataset whose table has no column for it, a teacher without a student."""
    shown = set()
    for row in rows:
        if row["n"] or row["median_best"] is not None:
            label = row["method"]
            student = None if label == TEACHER else row["student"]
            shown.add((row["dataset"], row["teacher"], student, label))
    return [key for key, entries in collected.items() if entries and key not in shown]


def _warn_unshown(collected: dict, rows: list[dict]) -> None:
    """One warning per result no table shows, with its numbers: nothing is left out silently."""
    for key in unshown_cells(collected, rows):
        dataset, label = key[0], key[3]
        if label == TEACHER:
            why = "no table row: no student of this teacher model on this dataset among the runs"
        elif dataset == CINIC10:
            why = (
                "Table 4 has columns for the paper's CINIC-10 methods only, and Table 5 for the"
                " aggregations"
            )
        else:
            why = "no table has a column for it"
        stats = _seed_stats(_seed_groups(collected[key]), "last")
        numbers = (
            f"n={stats['n']}, median last-epoch accuracy {stats['median']:.2f} %"
            if stats["n"]
            else "no last-epoch accuracy"
        )
        logger.warning("%s: in no table (%s): %s", _cell_name(key), why, numbers)


def write_csv(rows: list[dict], path: str) -> None:
    """`rows` as CSV with the CSV_FIELDS columns; None becomes an empty field, the seeds and the
    other lists are joined by ';' (as paired.csv's)."""
    _write_csv_rows(path, CSV_FIELDS, [_flat(row, CSV_FIELDS) for row in rows])


def main(argv: list[str] | None = None) -> int:
    """The CLI: prints the tables and writes `table<N>.md`/`.csv` (and `paired`, `logits` and
    `alpha`'s) into --out; returns the status."""
    parser = argparse.ArgumentParser(
        prog="python -m dfa_jax.report",
        description=(
            "The paper's Tables 2, 4 and 5, the CRD suite's table, DFA against the other"
            " aggregations paired per seed, and the searched alpha (alpha.md), over runs'"
            " summary.json and alpha.json files."
        ),
    )
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="a workdir, a summary.json, or a directory searched recursively for workdirs (local"
        " or gs://); a workdir without summary.json is a run not finished: its finished stages",
    )
    parser.add_argument(
        "--out",
        default=".",
        help="where table<N>.md/.csv (paired, logits, alpha) go, local or gs:// (default: .)",
    )
    parser.add_argument(
        "--table",
        choices=(*TABLES, ALPHA, "all"),
        default="all",
        help="which table ('crd': RepDistiller's CIFAR-100 pairs; 'alpha': the runs' searched"
        " alpha); 'all' (default) writes those that have runs",
    )
    args = parser.parse_args(argv)

    try:
        summaries = load_summaries(args.run_dirs)
    except ImportError as error:  # etils.epath reaches gs:// through gcsfs (or TensorFlow).
        print(
            f"error: {error}: reading a bucket needs gcsfs (pip install 'dfa_jax[gcs]')",
            file=sys.stderr,
        )
        return 2
    if not summaries:
        print(f"error: no usable run in {' '.join(args.run_dirs)}", file=sys.stderr)
        return 1
    collected = collect(summaries)
    epath.Path(args.out).mkdir(parents=True, exist_ok=True)
    written = []
    numbers = list(TABLES) if args.table == "all" else [args.table] if args.table in TABLES else []
    shown = []
    for number in numbers:
        markdown, rows = TABLES[number](summaries, collected=collected)
        shown += rows
        if not rows and args.table == "all":
            continue  # E.g. no CINIC-10 run: no Table 4.
        print(markdown)
        stem = os.path.join(args.out, LOGITS if number == LOGITS else f"table{number}")
        epath.Path(stem + ".md").write_text(markdown)
        write_csv(rows, stem + ".csv")
        written += [stem + ".md", stem + ".csv"]
    if args.table in ("5", "all"):
        markdown, rows = paired_table(summaries, collected=collected)
        if rows:
            print(markdown)
            stem = os.path.join(args.out, "paired")
            epath.Path(stem + ".md").write_text(markdown)
            write_paired_csv(rows, stem + ".csv")
            written += [stem + ".md", stem + ".csv"]
    if args.table in (ALPHA, "all"):
        markdown, rows = alpha_table(summaries)
        if rows or args.table == ALPHA:
            print(markdown)
            stem = os.path.join(args.out, ALPHA)
            epath.Path(stem + ".md").write_text(markdown)
            write_alpha_csv(rows, stem + ".csv")
            written += [stem + ".md", stem + ".csv"]
    if args.table == "all":
        _warn_unshown(collected, shown)
    if not written:
        print("error: no student run (distill/<method> stage) to tabulate", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
