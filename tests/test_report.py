"""Tests of `dfa_jax.report` on hand-made summaries: statistics, paper numbers, files, the CLI."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from dfa_jax import paper_results
from dfa_jax import report

PAIR1 = ("wrn_28_4", "wrn_16_4")
PAIR2 = ("wrn_28_4", "wrn_28_2")
PAIR3 = ("wrn_28_4", "wrn_16_2")
CINIC1 = ("shufflenet_v2_2.0", "shufflenet_v2_1.0")


def _stage(name, last, best=None):
    return {
        "stage": name,
        "best_accuracy": last if best is None else best,
        "best_epoch": 180,
        "last_accuracy": last,
        "epochs": 200,
        "steps": 78000,
        "wall_time_s": 12.5,
    }


def _write(root, name, pair, seed, stages, dataset="cifar100"):
    """Writes ROOT/NAME/summary.json of a run of `pair` with `stages` {name: stage result}."""
    workdir = os.path.join(root, name)
    os.makedirs(workdir, exist_ok=True)
    summary = {
        "workdir": workdir,
        "config_path": "configs/x.py",
        "config_hash": "0123456789ab",
        "seed": seed,
        "dataset": dataset,
        "teacher_model": pair[0],
        "student_model": pair[1],
        "stages": stages,
    }
    with open(os.path.join(workdir, report.SUMMARY_FILE), "w") as f:
        json.dump(summary, f)
    return workdir


@pytest.fixture
def runs(tmp_path):
    """A parent directory of runs: pair 3 x 3 seeds, pair 1 (loaded teacher), partial, bad, CINIC."""
    root = str(tmp_path / "runs")
    dfa = {0: (0.75, 0.755), 1: (0.76, 0.765), 2: (0.80, 0.805)}
    teacher = {0: 0.79, 1: 0.78, 2: 0.80}
    kd = {0: 0.73, 1: 0.74}  # Two seeds of KD; no FitNets run at all.
    for seed in range(3):
        stages = {
            "teacher": _stage("teacher", teacher[seed]),
            "search": {"stage": "search", "alpha": {"g1": [0.1, 0.9]}, "groups": 3},
            "distill/dfa": _stage("distill/dfa", *dfa[seed]),
            "distill/none": _stage("distill/none", 0.73 + 0.001 * seed),
        }
        if seed in kd:
            stages["distill/kd"] = _stage("distill/kd", kd[seed])
        if seed == 0:
            stages["distill/last"] = _stage("distill/last", 0.7551)
        _write(root, f"pair3/s{seed}", PAIR3, seed, stages)
    # Pair 1 loads the seed-0 teacher: that teacher must count once.
    loaded = {
        "stage": "teacher",
        "loaded_from": os.path.join(root, "pair3/s0", "teacher", "variables"),
        "best_accuracy": 0.79,
        "last_accuracy": 0.79,
    }
    _write(root, "pair1/s0", PAIR1, 0, {"teacher": loaded, "distill/dfa": _stage("d", 0.795)})
    # Pair 2 is partial: its teacher, and a distillation without a result yet.
    _write(root, "pair2/s0", PAIR2, 5, {"teacher": _stage("teacher", 0.77), "distill/dfa": {}})
    os.makedirs(os.path.join(root, "bad"))
    with open(os.path.join(root, "bad", report.SUMMARY_FILE), "w") as f:
        f.write("{not json")
    cinic = {"teacher": _stage("teacher", 0.86), "distill/file": _stage("distill/file", 0.85)}
    _write(root, "cinic/dfa_t", CINIC1, 0, cinic, dataset="cinic10")
    return root


def _row(rows, pair, method):
    (row,) = [r for r in rows if (r["teacher"], r["student"], r["method"]) == (*pair, method)]
    return row


def test_cell_stats():
    stats = report.cell_stats([75.0, 76.0, 80.0])
    assert stats["n"] == 3
    assert stats["median"] == pytest.approx(76.0)
    assert stats["mean"] == pytest.approx(77.0)
    assert stats["std"] == pytest.approx(math.sqrt(7.0))  # Sample std: (4 + 1 + 9) / 2.
    assert report.cell_stats([1.0, 2.0, 3.0, 4.0])["median"] == pytest.approx(2.5)
    assert report.cell_stats([74.0]) == {"n": 1, "median": 74.0, "mean": 74.0, "std": None}
    assert report.cell_stats([]) == {"n": 0, "median": None, "mean": None, "std": None}


def test_paper_numbers_are_the_papers():
    assert paper_results.paper_value(2, "cifar100", *PAIR3, "dfa") == 75.85
    assert paper_results.paper_value(2, "cifar100", *PAIR1, "teacher") == 79.17
    assert paper_results.paper_value(2, "cifar100", *PAIR2, "margin") == 77.84
    assert paper_results.paper_value(5, "cifar100", *PAIR3, "last") == 75.51
    assert paper_results.paper_value(5, "cifar100", *PAIR1, "random") == 78.92
    assert paper_results.paper_value(4, "cinic10", *CINIC1, "file") == 85.41
    assert (
        paper_results.paper_value(4, "cinic10", "shufflenet_v2_1.0", "shufflenet_v2_0.5", "teacher")
        == 83.28
    )
    # Another dataset, or a method outside the table, has no paper number.
    assert paper_results.paper_value(2, "cifar10", *PAIR3, "dfa") is None
    assert paper_results.paper_value(4, "cinic10", *CINIC1, "kd") is None
    methods = {label for label, _ in report.TABLE2_COLUMNS}
    assert all(set(row) == methods for row in paper_results.TABLE2.values())


def test_load_summaries_finds_runs_recursively_and_warns_on_bad_files(runs, caplog):
    summaries = report.load_summaries([runs, os.path.join(runs, "pair3", "s0")])
    # Six good runs, the workdir given twice counts once, and the bad file is skipped.
    assert len(summaries) == 6
    assert all(s[report.PATH_KEY].endswith(report.SUMMARY_FILE) for s in summaries)
    bad = os.path.join(runs, "bad", report.SUMMARY_FILE)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and bad in warnings[0] and "\n" not in warnings[0]
    assert report.load_summaries([os.path.join(runs, "nowhere")]) == []


def test_table2_statistics_paper_numbers_and_missing_cells(runs):
    markdown, rows = report.table2(report.load_summaries(runs))
    dfa = _row(rows, PAIR3, "dfa")
    assert (dfa["n"], dfa["table"], dfa["dataset"]) == (3, 2, "cifar100")
    assert dfa["median_last"] == pytest.approx(76.0)
    assert dfa["mean_last"] == pytest.approx(77.0)
    assert dfa["std_last"] == pytest.approx(math.sqrt(7.0))
    assert dfa["median_best"] == pytest.approx(76.5)
    assert dfa["paper"] == 75.85
    assert "76.00 (77.00±2.65, n=3; best 76.50) [paper 75.85]" in markdown
    assert "which epoch it does not say" in markdown  # The paper's numbers, as unspecified.
    kd = _row(rows, PAIR3, "kd")
    assert (kd["n"], kd["median_last"], kd["mean_last"]) == (2, 73.5, 73.5)
    assert kd["std_last"] == pytest.approx(math.sqrt(0.5))
    fitnets = _row(rows, PAIR3, "fitnets")
    assert fitnets["n"] == 0 and fitnets["median_last"] is None and fitnets["paper"] == 73.65
    assert "| – [paper 73.65] |" in markdown
    # Pair 3's three teachers and partial pair 2's (79, 78, 80, 77): every wrn_28_4 teacher on
    # CIFAR-100 counts, but pair 1's loaded copy of the seed-0 teacher does not count again.
    teacher = _row(rows, PAIR3, "teacher")
    assert (teacher["n"], teacher["median_last"], teacher["paper"]) == (4, 78.5, 79.17)
    assert _row(rows, PAIR1, "teacher")["n"] == 4
    assert "79.50 (79.50±–, n=1; best 79.50) [paper 79.74]" in markdown  # Pair 1's one DFA seed.
    # Rows: pair 1 before pair 3 (the paper's order); partial pair 2 and CINIC-10 have none.
    pairs = [(r["teacher"], r["student"]) for r in rows if r["method"] == "dfa"]
    assert pairs == [PAIR1, PAIR3]
    assert markdown.index("(1) wrn_28_4 → wrn_16_4") < markdown.index("(3) wrn_28_4 → wrn_16_2")
    assert len(rows) == 2 * len(report.TABLE2_COLUMNS)


def test_table5_rows_schemes_columns_students(runs):
    markdown, rows = report.table5(report.load_summaries(runs))
    last = _row(rows, PAIR3, "last")
    assert (last["n"], last["median_last"], last["paper"]) == (1, 75.51, 75.51)
    assert _row(rows, PAIR1, "random")["paper"] == 78.92
    assert (
        "| Method | cifar100: (1) wrn_28_4 → wrn_16_4 | cifar100: (3) wrn_28_4 → wrn_16_2 |"
        in markdown.splitlines()
    )
    random_line = next(line for line in markdown.splitlines() if line.startswith("| Random"))
    assert random_line == "| Random | – [paper 78.92] | – [paper 74.25] |"
    # The paper's rows always; 'start' (not the paper's) only where a run trained it.
    assert {r["method"] for r in rows} == {
        label for label, _ in report.TABLE5_ROWS if label not in report.TABLE5_OWN_ROWS
    }
    assert "| Start" not in markdown


def test_the_search_start_control_is_shown_and_paired_where_runs_have_it(tmp_path):
    """A run that also trained 'start' (the search's alpha unsearched) gets its Table 5 row and
    DFA - Start per seed; the paper has no number for it."""
    root = str(tmp_path / "runs")
    for seed, (dfa, start) in enumerate(((0.760, 0.751), (0.770, 0.768))):
        stages = {
            "distill/dfa": _stage("distill/dfa", dfa),
            "distill/start": _stage("distill/start", start),
        }
        _write(root, f"s{seed}", PAIR3, seed, stages)
    summaries = report.load_summaries(root)
    markdown, rows = report.table5(summaries)
    start = _row(rows, PAIR3, "start")
    assert (start["n"], start["median_last"], start["paper"]) == (2, 75.95, None)
    assert "| Start | 75.95" in markdown
    (row,) = report.paired_table(summaries)[1]
    assert row["against"] == "start" and row["paper"] is None
    assert row["differences"] == pytest.approx([0.9, 0.2])


def test_table4_holds_the_cinic_runs(runs):
    summaries = report.load_summaries(runs)
    markdown, rows = report.table4(summaries)
    dfa_t = _row(rows, CINIC1, "file")
    assert (dfa_t["n"], dfa_t["median_last"], dfa_t["paper"]) == (1, 85.0, 85.41)
    teacher = _row(rows, CINIC1, "teacher")
    assert (teacher["n"], teacher["median_last"], teacher["paper"]) == (1, 86.0, 86.14)
    assert "| DFA-T |" in markdown and "– [paper 84.71]" in markdown  # No AT run.
    assert all(r["dataset"] == "cinic10" for r in rows)
    assert report.table4(s for s in summaries if s["dataset"] != "cinic10")[1] == []


def test_duplicate_seeds_are_kept_with_a_warning(tmp_path, caplog):
    for name in ("a", "b"):
        _write(str(tmp_path), name, PAIR3, 0, {"distill/dfa": _stage("distill/dfa", 0.75)})
    collected = report.collect(report.load_summaries(str(tmp_path)))
    assert len(collected[("cifar100", *PAIR3, "dfa")]) == 2
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "seed 0" in warning and "duplicate" in warning


def test_cli_writes_tables_and_csv_round_trips(runs, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert report.main([runs, "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "### Table 2" in printed and "### Table 5" in printed and "### Table 4" in printed
    names = sorted(os.listdir(out))
    # Pair 3's seed 0 has DFA and Last: the paired comparison too.
    tables = [f"table{n}.{ext}" for n in (2, 4, 5) for ext in ("csv", "md")]
    assert names == ["paired.csv", "paired.md"] + tables
    _, rows = report.table2(report.load_summaries(runs))
    with open(os.path.join(out, "table2.md")) as f:
        assert "[paper 75.85]" in f.read()
    with open(os.path.join(out, "table2.csv"), newline="") as f:
        read = list(csv.DictReader(f))
    assert len(read) == len(rows)
    for got, want in zip(read, rows):
        assert list(got) == list(report.CSV_FIELDS)
        for field in report.CSV_FIELDS:
            value = want[field]
            if value is None:
                assert got[field] == ""
            elif isinstance(value, list):  # The seeds.
                assert got[field] == ";".join(str(v) for v in value)
            elif isinstance(value, str):
                assert got[field] == value
            else:
                assert float(got[field]) == value


def test_cli_table_choice_and_nothing_found(runs, tmp_path):
    out = str(tmp_path / "only5")
    assert report.main([os.path.join(runs, "pair3"), "--out", out, "--table", "5"]) == 0
    assert sorted(os.listdir(out)) == ["paired.csv", "paired.md", "table5.csv", "table5.md"]
    # Without a CINIC-10 run, 'all' writes no Table 4.
    out = str(tmp_path / "cifar")
    assert report.main([os.path.join(runs, "pair3"), "--out", out]) == 0
    assert "table4.md" not in os.listdir(out)
    assert report.main([str(tmp_path / "empty_dir_that_is_missing")]) == 1
    assert report.main([os.path.join(runs, "pair2")]) == 1  # A teacher but no student result.


def test_teachers_count_once_per_seed_and_per_source(tmp_path):
    root = str(tmp_path)
    # Table 5's layout: one workdir per aggregation, each training the same seed-0 teacher.
    for name in ("dfa", "last"):
        stages = {"teacher": _stage("teacher", 0.79), f"distill/{name}": _stage("d", 0.75)}
        _write(root, name, PAIR3, 0, stages)
    _write(root, "s1", PAIR3, 1, {"teacher": _stage("teacher", 0.77)})
    # Two runs loading one teacher trained elsewhere (not among the runs): it counts once.
    elsewhere = {"stage": "teacher", "loaded_from": "/elsewhere/t", "last_accuracy": 0.81}
    for seed in (2, 3):
        _write(root, f"loads{seed}", PAIR3, seed, {"teacher": dict(elsewhere)})
    entries = report.collect(report.load_summaries(root))[("cifar100", "wrn_28_4", None, "teacher")]
    assert sorted(e["last"] for e in entries) == [77.0, 79.0, 81.0]


def test_t_quantiles_are_students():
    stats = pytest.importorskip("scipy.stats")
    # Every entry of the table (3 decimals: 4 seeds read df = 3) and the expansion past it.
    for df in (*range(1, 61), 100, 200, 1000):
        assert report.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=5e-4), df
    with pytest.raises(ValueError, match="df >= 1"):
        report.t_quantile_975(0)


def test_dfa_against_last_average_random_is_paired_per_seed(tmp_path):
    """Differences per seed (only seeds both arms have), their mean and 95 % t interval, the
    paper's difference beside, and the CSV the CLI writes."""
    root = str(tmp_path / "runs")
    dfa = {0: 0.760, 1: 0.770, 2: 0.750, 3: 0.790}
    last = {0: 0.755, 1: 0.762, 2: 0.749}  # No seed 3: that DFA run has no partner.
    average = {1: 0.760}
    for seed, acc in dfa.items():
        # Best epochs above the last ones by other amounts: the pairs are of last accuracies.
        stages = {"distill/dfa": _stage("distill/dfa", acc, best=acc + 0.02)}
        if seed in last:
            stages["distill/last"] = _stage("distill/last", last[seed], best=last[seed] + 0.005)
        if seed in average:
            stages["distill/average"] = _stage("distill/average", average[seed])
        _write(root, f"s{seed}", PAIR1, seed, stages)
    markdown, rows = report.paired_table(report.load_summaries(root))
    by_other = {r["against"]: r for r in rows}
    assert set(by_other) == {"last", "average"}  # No Random run: no row.
    want = [100 * (dfa[k] - last[k]) for k in (0, 1, 2)]
    row = by_other["last"]
    assert row["seeds"] == [0, 1, 2] and row["differences"] == pytest.approx(want)
    mean, std = sum(want) / 3, float(__import__("numpy").std(want, ddof=1))
    half = 4.303 * std / math.sqrt(3)
    assert row["mean"] == pytest.approx(mean)
    assert (row["ci95_low"], row["ci95_high"]) == pytest.approx((mean - half, mean + half))
    paper = paper_results.paper_value(5, "cifar100", *PAIR1, "dfa") - paper_results.paper_value(
        5, "cifar100", *PAIR1, "last"
    )
    assert row["paper"] == pytest.approx(paper)
    single = by_other["average"]
    assert single["n"] == 1 and single["ci95_low"] is None  # One seed: no interval.
    assert "DFA − Last" in markdown and f"{mean:+.2f}" in markdown

    out = str(tmp_path / "out")
    assert report.main([root, "--out", out]) == 0
    with open(os.path.join(out, "paired.csv")) as f:
        (csv_last,) = [r for r in csv.DictReader(f) if r["against"] == "last"]
    assert csv_last["seeds"] == "0;1;2" and float(csv_last["mean"]) == pytest.approx(mean)


def test_a_run_of_several_seeds_is_read_per_student(tmp_path):
    """One run with `distill.seeds` (stages `distill/<label>/seed<k>`, the run's own seed 0):
    each student is a seed of its cell, the same as separate one-seed runs, and pairs by it."""
    root = str(tmp_path / "runs")
    dfa, last = {0: 0.760, 1: 0.770, 2: 0.750}, {0: 0.755, 1: 0.762, 2: 0.749}
    stages = {}
    for seed in dfa:
        stages[f"distill/dfa/seed{seed}"] = _stage(f"distill/dfa/seed{seed}", dfa[seed])
        stages[f"distill/last/seed{seed}"] = _stage(f"distill/last/seed{seed}", last[seed])
    _write(root, "cohort", PAIR1, 0, stages)
    collected = report.collect(report.load_summaries(root))
    cell = collected[("cifar100", *PAIR1, "dfa")]
    assert sorted(e["seed"] for e in cell) == [0, 1, 2]
    assert report.cell_stats(e["last"] for e in cell)["n"] == 3
    (row,) = report.paired_rows(collected)
    assert row["against"] == "last" and row["seeds"] == [0, 1, 2]
    assert row["differences"] == pytest.approx([100 * (dfa[k] - last[k]) for k in (0, 1, 2)])


def test_students_pair_only_within_their_runs_batches(tmp_path):
    """Two runs of seeds (0, 1) with other run seeds (other batches): each student pairs with its
    own run's, never across; a one-seed run's student carries the seed it recorded."""
    root = str(tmp_path / "runs")
    accuracy = {(0, 0): (0.760, 0.750), (0, 1): (0.770, 0.765), (7, 0): (0.700, 0.790)}
    for run_seed in (0, 7):
        stages = {}
        for (r, k), (dfa, last) in accuracy.items():
            if r == run_seed:
                stages[f"distill/dfa/seed{k}"] = _stage(f"distill/dfa/seed{k}", dfa)
                stages[f"distill/last/seed{k}"] = _stage(f"distill/last/seed{k}", last)
        _write(root, f"run{run_seed}", PAIR1, run_seed, stages)
    (row,) = report.paired_rows(report.collect(report.load_summaries(root)))
    assert row["seeds"] == ["0/0", "0/1", "7/0"]
    want = [100 * (dfa - last) for dfa, last in accuracy.values()]
    assert row["differences"] == pytest.approx(want)

    one = str(tmp_path / "one")
    stages = {
        name: _stage(name, acc) | {"seed": 5}
        for name, acc in (("distill/dfa", 0.76), ("distill/last", 0.75))
    }
    _write(one, "seeds5", PAIR1, 0, stages)
    (row,) = report.paired_rows(report.collect(report.load_summaries(one)))
    assert row["seeds"] == [5] and row["differences"] == pytest.approx([1.0])


def test_crd_suite_numbers_are_repdistillers_and_mdistillers():
    """Spot checks against the two READMEs (RepDistiller's tables, mdistiller's DKD tables)."""
    value = paper_results.paper_value
    assert value("crd", "cifar100", "resnet32x4", "resnet8x4", "teacher") == 79.42
    assert value("crd", "cifar100", "resnet32x4", "resnet8x4", "crd") == 75.51
    assert value("crd", "cifar100", "resnet32x4", "resnet8x4", "dkd") == 76.32
    assert value("crd", "cifar100", "vgg13", "MobileNetV2", "at") == 59.40
    assert value("crd", "cifar100", "wrn_40_2", "ShuffleV1", "kd") == 74.83
    assert value("crd", "cifar100", "resnet32x4", "ShuffleV2", "dkd") == 77.07
    # mdistiller publishes no DKD for these two pairs; RepDistiller no DFA anywhere.
    assert value("crd", "cifar100", "resnet110", "resnet20", "dkd") is None
    assert value("crd", "cifar100", "ResNet50", "vgg8", "dkd") is None
    assert value("crd", "cifar100", "resnet56", "resnet20", "dfa") is None
    assert value("crd", "cifar10", "resnet56", "resnet20", "kd") is None
    # The suite is the configs' pairs, in their order; its students alone share their numbers.
    from dfa_jax import config_lib  # pylint: disable=g-import-not-at-top

    assert tuple(paper_results.CRD_SUITE) == config_lib.CRD_PAIRS
    assert value("crd", "cifar100", "resnet56", "resnet20", "none") == value(
        "crd", "cifar100", "resnet110", "resnet20", "none"
    )


def test_crd_table_holds_the_suites_pairs_with_the_published_numbers(tmp_path):
    root = str(tmp_path / "runs")
    pair = ("resnet56", "resnet20")
    for seed, (dfa, kd) in enumerate(((0.715, 0.705), (0.725, 0.709))):
        stages = {
            "teacher": _stage("teacher", 0.72),
            "distill/dfa": _stage("distill/dfa", dfa),
            "distill/kd": _stage("distill/kd", kd),
        }
        _write(root, f"r56/s{seed}", pair, seed, stages)
    _write(root, "pair3", PAIR3, 0, {"distill/dfa": _stage("distill/dfa", 0.75)})
    summaries = report.load_summaries(root)
    markdown, rows = report.table_crd(summaries)
    assert {(r["teacher"], r["student"]) for r in rows} == {pair}  # Not the paper's WRN pair.
    dfa = _row(rows, pair, "dfa")
    assert (dfa["n"], dfa["median_last"], dfa["paper"]) == (2, 72.0, None)
    assert _row(rows, pair, "kd")["paper"] == 70.66
    crd = _row(rows, pair, "crd")
    assert (crd["n"], crd["paper"]) == (0, 71.16)
    assert "| CRD | DKD | DFA |" in markdown
    # Each published number under its source and the epoch it reports: RepDistiller's tables are
    # its last epoch (beside our first number), mdistiller's DKD its best (beside our best).
    assert "– [mdistiller, best epoch 71.97]" in markdown
    assert "70.70 (70.70±0.28, n=2; best 70.70) [RepDistiller, last epoch 70.66]" in markdown
    assert "[paper" not in markdown and "which epoch it does not say" not in markdown
    kd, dkd = _row(rows, pair, "kd"), _row(rows, pair, "dkd")
    assert (kd["paper_source"], kd["paper_epoch"]) == ("RepDistiller", "last")
    assert (dkd["paper_source"], dkd["paper_epoch"]) == ("mdistiller", "best")
    # The paper's own tables keep their label; which epoch its numbers are it does not say.
    assert _row(report.table2(summaries)[1], PAIR3, "dfa")["paper_source"] == "paper"
    # Table 2 still holds every CIFAR-100 pair, the suite's among them.
    assert {(r["teacher"], r["student"]) for r in report.table2(summaries)[1]} >= {pair, PAIR3}


def _config(pair, seed, epochs=200):
    """A run's config.json, as far as the report reads it (`workdir.prepare` writes it whole)."""
    return {
        "seed": seed,
        "data": {"dataset": "cifar100", "data_dir": f"/data/copy{seed}", "eval_batch_size": 500},
        "teacher": {"model": pair[0], "checkpoint": None, "optim": {"epochs": epochs}},
        "student": {"model": pair[1]},
        "distill": {"seeds": [], "optim": {"epochs": epochs}},
        "baselines": {"kd_weight": 0.9},
    }


def _write_config(workdir, config):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, report.CONFIG_FILE), "w") as f:
        json.dump(config, f)
    with open(os.path.join(workdir, report.HASH_FILE), "w") as f:
        f.write("0123456789ab\n")


def test_workdir_file_names_are_the_pipelines():
    """The report names a workdir's files itself (their modules import JAX): the same names."""
    # pylint: disable=g-import-not-at-top
    from dfa_jax import alpha_file
    from dfa_jax import distill
    from dfa_jax import reporting
    from dfa_jax import teacher
    from dfa_jax import train_loop
    from dfa_jax import workdir

    assert report.VARIABLES_DIR == teacher.VARIABLES_DIR
    assert report.BEST_VARIABLES_DIR == teacher.BEST_VARIABLES_DIR
    assert (report.CONFIG_FILE, report.HASH_FILE) == (workdir.CONFIG_FILE, workdir.HASH_FILE)
    assert report.RESULT_FILE == train_loop.RESULT_FILE
    assert (report.STUDENT_FILE, report.COHORTS_DIR) == (distill.STUDENT_FILE, distill.COHORTS_DIR)
    assert report.SUMMARY_FILE == reporting.SUMMARY_FILE
    assert report.ALPHA_FILE == alpha_file.NAME  # search.ALPHA_FILE, where a search writes it.


def test_report_imports_without_jax():
    code = "import sys, dfa_jax.report; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_teacher_reused_from_best_variables_counts_once(tmp_path):
    """The default `teacher.distill_from='best'` loads `W/teacher/best_variables`: the teacher is
    W's, with W's seed and last epoch, not a second teacher at its best-epoch accuracy."""
    root = str(tmp_path)
    trained = {"teacher": _stage("teacher", 0.79, 0.80), "distill/dfa": _stage("d", 0.755)}
    a = _write(root, "pair3/s0", PAIR3, 0, trained)
    loaded = {
        "stage": "teacher",
        "loaded_from": os.path.join(a, "teacher", "best_variables"),
        "best_accuracy": 0.80,
        "last_accuracy": 0.80,
    }
    _write(root, "pair1/s0", PAIR1, 0, {"teacher": loaded, "distill/dfa": _stage("d", 0.789)})
    cells = report.collect(report.load_summaries(root))
    (entry,) = cells[("cifar100", "wrn_28_4", None, "teacher")]
    assert (entry["last"], entry["best"], entry["seed"]) == (79.0, 80.0, 0)


def test_a_teacher_loaded_from_best_variables_of_an_absent_run_has_no_last_epoch(tmp_path):
    """Its training run not among the runs, the loading run's evaluation is of the best epoch:
    it counts as a best-epoch accuracy, never in the last-epoch statistics."""
    root = str(tmp_path)
    loaded = {
        "stage": "teacher",
        "loaded_from": "/elsewhere/W/teacher/best_variables",
        "best_accuracy": 0.81,
        "last_accuracy": 0.81,
    }
    _write(root, "loads", PAIR3, 0, {"teacher": loaded, "distill/dfa": _stage("d", 0.75)})
    _write(root, "trains", PAIR3, 1, {"teacher": _stage("teacher", 0.77, 0.78)})
    markdown, rows = report.table2(report.load_summaries(root))
    teacher = _row(rows, PAIR3, "teacher")
    assert (teacher["n"], teacher["median_last"], teacher["median_best"]) == (1, 77.0, 79.5)
    assert "77.00 (77.00±–, n=1; best 79.50)" in markdown


def test_a_cell_mixing_protocols_warns(tmp_path, caplog):
    """A 1-epoch smoke run beside 200-epoch runs: pooled, but with a warning naming the field
    and the runs; runs that differ only in their seeds (and data copies) raise none."""
    root = str(tmp_path)
    smoke = _write(root, "a", PAIR3, 0, {"distill/kd": {**_stage("kd", 0.60), "epochs": 1}})
    _write(root, "b", PAIR3, 1, {"distill/kd": _stage("kd", 0.74)})
    report.collect(report.load_summaries(root))
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "epochs" in warning and smoke in warning and os.path.join(root, "b") in warning

    caplog.clear()
    root = str(tmp_path / "configs")
    for seed in (0, 1):
        workdir = _write(root, f"s{seed}", PAIR3, seed, {"distill/kd": _stage("kd", 0.74)})
        _write_config(workdir, _config(PAIR3, seed))
    report.collect(report.load_summaries(root))
    assert caplog.records == []
    # Same stage epochs, another config: a changed KD weight.
    workdir = _write(root, "s2", PAIR3, 2, {"distill/kd": _stage("kd", 0.70)})
    _write_config(workdir, {**_config(PAIR3, 2), "baselines": {"kd_weight": 0.5}})
    report.collect(report.load_summaries(root))
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "baselines.kd_weight" in warning and workdir in warning and "seed" not in warning


def test_pairs_only_runs_whose_protocols_agree_where_both_students_read_them(tmp_path, caplog):
    """DFA of a 3-epoch run against Last of a 200-epoch run of the same seeds is no pair: left
    out with a warning naming the field and both runs. Fields one side cannot read (the search's
    for Last, the baselines' for either) neither stop a pair nor make a cell warn."""
    root = str(tmp_path / "epochs")
    short = _write(root, "dfa", PAIR3, 0, {"distill/dfa": {**_stage("d", 0.70), "epochs": 3}})
    long = _write(root, "last", PAIR3, 0, {"distill/last": _stage("l", 0.74)})
    assert report.paired_rows(report.collect(report.load_summaries(root))) == []
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "not paired" in warning and "epochs: 3 vs 200" in warning
    assert short in warning and long in warning

    caplog.clear()
    root = str(tmp_path / "configs")
    for seed in (0, 1):
        searched = {**_config(PAIR3, seed), "search": {"beta_lr": 0.01 * (seed + 1)}}
        searched["baselines"] = {"kd_weight": 0.5 + seed}
        stages = {"distill/dfa": _stage("d", 0.75 + seed / 100)}
        _write_config(_write(root, f"dfa{seed}", PAIR3, seed, stages), searched)
        unsearched = {**_config(PAIR3, seed), "search": {"beta_lr": 0.3}}
        stages = {"distill/last": _stage("l", 0.74)}
        _write_config(_write(root, f"last{seed}", PAIR3, seed, stages), unsearched)
    (row,) = report.paired_rows(report.collect(report.load_summaries(root)))
    assert row["seeds"] == [0, 1] and row["differences"] == pytest.approx([1.0, 2.0])
    # The DFA cell's runs differ in the search's rate (a warning) but not in a field only the
    # baselines read; the Last cell's in neither.
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "search.beta_lr" in warning and "kd_weight" not in warning and "-> last" not in warning


def test_a_seed_of_several_runs_pairs_as_their_mean_whatever_the_order(tmp_path, caplog):
    """Two DFA runs of seed 0 and one Last run: DFA's seed 0 is the mean of its two runs, as in
    Table 5's cell, whatever the order the runs are passed in (it used to depend on it), and the
    row says so; the duplicate is warned about."""
    root = str(tmp_path)
    paths = [
        _write(root, "a", PAIR3, 0, {"distill/dfa": _stage("d", 0.70)}),
        _write(root, "b", PAIR3, 0, {"distill/dfa": _stage("d", 0.75)}),
        _write(root, "c", PAIR3, 0, {"distill/last": _stage("l", 0.74)}),
    ]
    for order in (paths, paths[::-1]):
        caplog.clear()
        summaries = [s for p in order for s in report.load_summaries(p)]
        (row,) = report.paired_rows(report.collect(summaries))
        assert row["seeds"] == [0] and row["differences"] == pytest.approx([72.5 - 74.0])
        assert row["repeated_seeds"] == ["0x2/1"]
        assert not [r for r in caplog.records if "not paired" in r.getMessage()]
        (warning,) = [r.getMessage() for r in caplog.records]
        assert "seed 0 is in 2 runs" in warning and "mean" in warning


def test_teachers_of_one_seed_and_other_protocols_are_kept_apart(tmp_path, caplog):
    """A `:tiny` teacher and the full one, both of seed 0, are two teachers, with a warning."""
    root = str(tmp_path)
    for name, epochs, accuracy in (("tiny", 1, 0.05), ("full", 200, 0.79)):
        stages = {"teacher": {**_stage("teacher", accuracy), "epochs": epochs}}
        _write_config(_write(root, name, PAIR3, 0, stages), _config(PAIR3, 0, epochs))
    entries = report.collect(report.load_summaries(root))[("cifar100", "wrn_28_4", None, "teacher")]
    assert sorted(e["last"] for e in entries) == [5.0, 79.0]
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "teacher.optim.epochs" in warning and "tiny" in warning and "full" in warning


def _result_file(directory, result, student=None):
    os.makedirs(directory, exist_ok=True)
    if result is not None:
        with open(os.path.join(directory, report.RESULT_FILE), "w") as f:
            json.dump(result, f)
    if student is not None:
        with open(os.path.join(directory, report.STUDENT_FILE), "w") as f:
            json.dump(student, f)


def test_an_unfinished_run_reports_its_finished_stages(tmp_path, caplog):
    """A workdir with config.json but no summary.json (stopped before its end): its teacher and
    finished students count, each student with its seed; helper stages, students still
    training and cohort checkpoints do not; and a warning says the run is partial."""
    root = str(tmp_path / "runs")
    workdir = os.path.join(root, "pair3")
    _write_config(workdir, {**_config(PAIR3, 7), "distill": {"seeds": [0, 1]}})
    _result_file(os.path.join(workdir, "teacher"), _stage("teacher", 0.79, 0.80))
    distill = os.path.join(workdir, "distill")
    _result_file(os.path.join(distill, "dfa", "seed0"), _stage("distill/dfa/seed0", 0.76), {})
    _result_file(os.path.join(distill, "dfa", "seed1"), _stage("distill/dfa/seed1", 0.74))
    _result_file(os.path.join(distill, "ab", "seed0", "init"), _stage("distill/ab/init", 0.1))
    _result_file(os.path.join(distill, "ab", "seed0"), None, {"label": "ab", "seed": 0})
    _result_file(os.path.join(distill, "cohorts", "0123456789ab"), None)
    # A run of one seed, its student's seed recorded in student.json.
    one = os.path.join(root, "pair1")
    _write_config(one, _config(PAIR1, 0))
    _result_file(os.path.join(one, "distill", "kd"), _stage("d", 0.77), {"label": "kd", "seed": 3})
    _write(root, "finished", PAIR3, 2, {"distill/dfa": _stage("d", 0.75)})

    summaries = report.load_summaries(root)
    assert len(summaries) == 3
    partial = [s for s in summaries if s.get(report.COMPLETE_KEY) is False]
    assert {s["workdir"] for s in partial} == {workdir, one}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("not finished" in w for w in warnings)
    assert any(workdir in w for w in warnings) and any(one in w for w in warnings)
    cells = report.collect(summaries)
    dfa = cells[("cifar100", *PAIR3, "dfa")]
    assert sorted((e["run_seed"], e["seed"], e["last"]) for e in dfa) == [
        (2, 2, 75.0),
        (7, 0, 76.0),
        (7, 1, 74.0),
    ]
    assert ("cifar100", *PAIR3, "ab") not in cells
    (teacher,) = cells[("cifar100", "wrn_28_4", None, "teacher")]
    assert (teacher["seed"], teacher["last"]) == (7, 79.0)
    (kd,) = cells[("cifar100", *PAIR1, "kd")]
    assert (kd["seed"], kd["last"]) == (3, 77.0)
    assert _row(report.table2(summaries)[1], PAIR3, "dfa")["n"] == 3


@pytest.mark.parametrize("first", ["variables", "best_variables"])
def test_a_teacher_loaded_as_last_and_as_best_by_two_runs_is_one_with_both(tmp_path, first):
    """Its trainer not given, one run loaded the teacher's last-epoch variables and another its
    best's: one teacher, its last from the former, its best from the latter, whichever the walk
    reads first."""
    root = str(tmp_path / "runs")
    trainer = str(tmp_path / "elsewhere")
    accuracy = {"variables": 0.79, "best_variables": 0.80}
    second = "best_variables" if first == "variables" else "variables"
    for seed, (name, directory) in enumerate((("a", first), ("b", second))):
        loaded = {
            "stage": "teacher",
            "loaded_from": os.path.join(trainer, "teacher", directory),
            "best_accuracy": accuracy[directory],
            "last_accuracy": accuracy[directory],
        }
        _write(root, name, PAIR3, seed, {"teacher": loaded, "distill/kd": _stage("d", 0.7)})
    cells = report.collect(report.load_summaries(root))
    (teacher,) = cells[("cifar100", "wrn_28_4", None, "teacher")]
    assert (teacher["last"], teacher["best"]) == (79.0, 80.0)


def test_a_summary_under_another_name_is_read_and_a_config_stands_for_its_run(tmp_path, caplog):
    """Summaries copied off a cluster under their own names are summaries still; a workdir's
    config.json given by hand stands for the run, its summary.json where it has one."""
    root = str(tmp_path / "runs")
    workdir = _write(root, "pair3", PAIR3, 0, {"distill/kd": _stage("distill/kd", 0.70)})
    _write_config(workdir, _config(PAIR3, 0))
    copied = tmp_path / "pair3_kd_seed0.json"
    shutil.copy(os.path.join(workdir, report.SUMMARY_FILE), copied)
    for given in (str(copied), os.path.join(workdir, report.CONFIG_FILE)):
        (summary,) = report.load_summaries(given)
        assert summary["stages"] == {"distill/kd": _stage("distill/kd", 0.70)}, given
        assert summary.get(report.COMPLETE_KEY, True) is True, given
    assert not caplog.records


def test_students_finished_after_a_stale_summary_are_reported(tmp_path, caplog):
    """A finished run extended in place (a seed and a label more) whose later invocation did
    not end keeps its old summary.json; the students it finished since count, once each: the
    one-seed layout's student moved to `seed0` is the summary's, not another."""
    root = str(tmp_path / "runs")
    workdir = _write(
        root, "pair3", PAIR3, 0, {"distill/dfa": {**_stage("distill/dfa", 0.76), "seed": 0}}
    )
    _write_config(workdir, {**_config(PAIR3, 0), "distill": {"seeds": [0, 1]}})
    distill = os.path.join(workdir, "distill")
    _result_file(os.path.join(distill, "dfa", "seed0"), _stage("distill/dfa/seed0", 0.76))
    _result_file(os.path.join(distill, "dfa", "seed1"), _stage("distill/dfa/seed1", 0.74))
    _result_file(os.path.join(distill, "start", "seed0"), _stage("distill/start/seed0", 0.75))
    (summary,) = report.load_summaries(root)
    assert set(summary["stages"]) == {"distill/dfa", "distill/dfa/seed1", "distill/start/seed0"}
    assert summary[report.COMPLETE_KEY] is False
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "2 students finished after its summary.json" in warning
    cells = report.collect([summary])
    assert sorted(e["seed"] for e in cells[("cifar100", *PAIR3, "dfa")]) == [0, 1]
    assert [e["last"] for e in cells[("cifar100", *PAIR3, "start")]] == [75.0]


def test_a_bucket_without_its_file_system_package_is_a_one_line_error(monkeypatch, capsys):
    """Without gcsfs (or TensorFlow) etils.epath cannot reach gs://: the CLI says what to
    install instead of a traceback."""

    def no_gcsfs(paths):
        raise ImportError("Install gcsfs to access Google Storage")

    monkeypatch.setattr(report, "load_summaries", no_gcsfs)
    assert report.main(["gs://bucket/runs"]) == 2
    assert "pip install 'dfa_jax[gcs]'" in capsys.readouterr().err


def test_runs_are_read_through_epath_from_an_object_store(tmp_path, monkeypatch):
    """`gs://` run directories: the same runs, the same cells, paths kept as gs:// paths."""
    from etils.epath import gpath  # pylint: disable=g-import-not-at-top
    from etils.epath import testing  # pylint: disable=g-import-not-at-top

    local = str(tmp_path / "bucket")
    bucket = "gs://bucket"
    _write(local, "pair3/s0", PAIR3, 0, {"distill/dfa": _stage("d", 0.75)})
    workdir = os.path.join(local, "pair3", "s1")
    _write_config(workdir, _config(PAIR3, 1))
    _result_file(os.path.join(workdir, "distill", "dfa"), _stage("d", 0.77), {"seed": 1})

    def to_local(path):
        path = os.fspath(path)
        return local + path[len(bucket) :] if path.startswith(bucket) else path

    def walk(original, top, **kwargs):
        remote = os.fspath(top).startswith(bucket)
        for root, dirs, names in original(to_local(top), **kwargs):
            root = os.fspath(root)
            yield (bucket + root[len(local) :] if remote else root), dirs, names

    # The bucket is the local tree: every file operation of epath goes through these.
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
    with testing.mock_epath(
        open=lambda original, path, mode: original(to_local(path), mode),
        exists=lambda original, path: original(to_local(path)),
        isdir=lambda original, path: original(to_local(path)),
        listdir=lambda original, path: original(to_local(path)),
        walk=walk,
    ):
        summaries = report.load_summaries(bucket + "/pair3")
    assert sorted(s[report.PATH_KEY] for s in summaries) == [
        f"{bucket}/pair3/s0/{report.SUMMARY_FILE}",
        f"{bucket}/pair3/s1/{report.CONFIG_FILE}",
    ]
    cell = report.collect(summaries)[("cifar100", *PAIR3, "dfa")]
    assert sorted(e["last"] for e in cell) == [75.0, 77.0]


def test_runs_sharing_a_loaded_teacher_pair_and_runs_of_other_teachers_do_not(tmp_path, caplog):
    """DFA runs that trained their teacher (5 epochs) and Random runs that loaded it pair (the
    loading runs' own teacher fields were never used); runs that loaded another teacher do not."""
    root = str(tmp_path)
    for seed in (0, 1):
        own = _write(
            root, f"dfa{seed}", PAIR3, seed, {"distill/dfa": _stage("d", 0.75 + seed / 100)}
        )
        short_teacher = _config(PAIR3, seed)
        short_teacher["teacher"]["optim"]["epochs"] = 5
        _write_config(own, short_teacher)
        loads = {
            "teacher": {**_stage("teacher", 0.79), "loaded_from": f"{root}/dfa0/teacher/variables"},
            "distill/random": _stage("r", 0.74),
        }
        _write_config(_write(root, f"random{seed}", PAIR3, seed, loads), _config(PAIR3, seed))
    rows = report.paired_rows(report.collect(report.load_summaries(root)))
    # Seed 0's pair shares dfa0's teacher; seed 1's DFA trained its own (dfa1), not the one
    # its Random run loaded.
    (row,) = rows
    assert row["against"] == "random" and row["seeds"] == [0]
    assert row["differences"] == pytest.approx([1.0])
    (warning,) = [r.getMessage() for r in caplog.records if "not paired" in r.getMessage()]
    assert "other teachers" in warning and "dfa1" in warning


def test_baseline_cells_say_which_preset_their_runs_used(tmp_path):
    """Table 2's KD / AT / SP / Margin depend on `baselines.preset`: a cell of the authors'
    settings is marked, one pooling both presets says so, the others (and DFA) are unmarked."""
    root = str(tmp_path)
    for seed, preset in ((0, "authors"), (1, "authors")):
        config = {**_config(PAIR3, seed), "baselines": {"preset": preset}}
        stages = {"distill/kd": _stage("kd", 0.74), "distill/dfa": _stage("d", 0.75)}
        _write_config(_write(root, f"a{seed}", PAIR3, seed, stages), config)
    rows = report.table2(report.load_summaries(root))[1]
    assert _row(rows, PAIR3, "kd")["preset"] == "authors"
    assert _row(rows, PAIR3, "dfa")["preset"] is None
    assert "⟨authors⟩" in report.format_cell(_row(rows, PAIR3, "kd"))
    assert "⟨" not in report.format_cell(_row(rows, PAIR3, "dfa"))
    _write_config(
        _write(root, "p2", PAIR3, 2, {"distill/kd": _stage("kd", 0.70)}), _config(PAIR3, 2)
    )
    mixed = _row(report.table2(report.load_summaries(root))[1], PAIR3, "kd")
    assert mixed["preset"] == "mixed" and "⟨peers + authors⟩" in report.format_cell(mixed)


DIGITS = ("wrn_16_2", "wrn_10_1")  # The offline demo's pair: in none of the paper's tables.


def _lines(path):
    with open(path) as f:
        return f.read().splitlines()


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_table5_columns_name_dataset_and_teacher_even_when_all_pairs_share_them(tmp_path):
    """One dataset and teacher for every pair (the demo's digits, wrn_16_2): each column still
    says `dataset: teacher → student`, as Table 2's rows and paired.md do."""
    root = str(tmp_path)
    stages = {"distill/dfa": _stage("d", 0.944), "distill/last": _stage("l", 0.944)}
    _write(root, "demo", DIGITS, 0, stages, dataset="digits")
    _write(root, "other", ("wrn_16_2", "wrn_16_1"), 0, stages, dataset="digits")
    markdown, _ = report.table5(report.load_summaries(root))
    header = next(line for line in markdown.splitlines() if line.startswith("| Method"))
    assert header == "| Method | digits: wrn_16_2 → wrn_10_1 | digits: wrn_16_2 → wrn_16_1 |"


def test_paper_source_and_epoch_are_empty_where_there_is_no_paper_number(tmp_path):
    """A cell without a published number says nobody published it; one with the paper's number
    says 'paper', of an epoch it does not state."""
    root = str(tmp_path)
    _write(root, "demo", DIGITS, 0, {"distill/dfa": _stage("d", 0.944)}, dataset="digits")
    _write(root, "pair3", PAIR3, 0, {"distill/dfa": _stage("d", 0.75)})
    out = str(tmp_path / "out")
    assert report.main([root, "--out", out]) == 0
    for table in ("table2", "table5"):
        read = _csv(os.path.join(out, f"{table}.csv"))
        digits = [r for r in read if r["dataset"] == "digits"]
        assert digits and all(r["paper"] == "" for r in digits), table
        assert all((r["paper_source"], r["paper_epoch"]) == ("", "") for r in digits), table
        (dfa,) = [r for r in read if r["student"] == PAIR3[1] and r["method"] == "dfa"]
        assert (dfa["paper"], dfa["paper_source"], dfa["paper_epoch"]) == (
            "75.85",
            "paper",
            "unstated",
        )


def test_tables_name_each_cells_seeds_in_the_csv_and_under_the_table(runs, tmp_path):
    """`seeds` (paired.csv's format, ';'-joined) in table2/table5.csv, and per pair the cells'
    seeds under each markdown table, the columns (rows) of one set of seeds together."""
    out = str(tmp_path / "out")
    assert report.main([runs, "--out", out]) == 0
    table2 = _csv(os.path.join(out, "table2.csv"))
    seeds = {(r["student"], r["method"]): r["seeds"] for r in table2}
    assert seeds[(PAIR3[1], "dfa")] == "0;1;2"
    assert seeds[(PAIR3[1], "kd")] == "0;1"
    assert seeds[(PAIR3[1], "fitnets")] == ""  # No run.
    # Pair 3's three teachers and pair 2's (seed 5); pair 1's loaded copy is seed 0's.
    assert seeds[(PAIR3[1], "teacher")] == "0;1;2;5"
    assert seeds[(PAIR1[1], "dfa")] == "0"
    table5 = _csv(os.path.join(out, "table5.csv"))
    assert [r["seeds"] for r in table5 if r["student"] == PAIR3[1]] == [
        "0;1;2",  # Student
        "",  # Random
        "0",  # Last
        "",  # Average
        "0;1;2",  # DFA
    ]
    legend = report._SEEDS_LEGEND
    assert legend.startswith("Seeds of each cell's n (student seeds; run seed/student seed")
    lines = _lines(os.path.join(out, "table2.md"))
    assert lines[lines.index(legend) :] == [
        legend,
        "- cifar100: (1) wrn_28_4 → wrn_16_4: 0, 1, 2, 5 (Teacher); 0 (DFA)",
        "- cifar100: (3) wrn_28_4 → wrn_16_2: 0, 1, 2, 5 (Teacher); 0, 1, 2 (Student, DFA);"
        " 0, 1 (KD)",
    ]
    lines = _lines(os.path.join(out, "table5.md"))
    assert lines[lines.index(legend) :] == [
        legend,
        "- cifar100: (1) wrn_28_4 → wrn_16_4: 0 (DFA)",
        "- cifar100: (3) wrn_28_4 → wrn_16_2: 0, 1, 2 (Student, DFA); 0 (Last)",
    ]
    assert lines[lines.index(legend) - 1] == ""  # Not a row of the table above.


def test_seeds_of_runs_of_other_run_seeds_read_run_slash_student(tmp_path):
    """Students of seed 0 from runs of run seeds 0 and 7 (other batches): `run/student`, as in
    paired.csv, in run-seed order; a teacher loaded from a run not given has no seed: '?'."""
    root = str(tmp_path)
    loaded = {"stage": "teacher", "loaded_from": "/elsewhere/t/variables", "last_accuracy": 0.8}
    for run_seed in (7, 0):
        stages = {f"distill/dfa/seed{k}": _stage("d", 0.75) for k in (0, 1)}
        _write(root, f"run{run_seed}", PAIR3, run_seed, {"teacher": dict(loaded), **stages})
    rows = report.table2(report.load_summaries(root))[1]
    assert _row(rows, PAIR3, "dfa")["seeds"] == ["0/0", "0/1", "7/0", "7/1"]
    assert _row(rows, PAIR3, "teacher")["seeds"] == ["?"]


def _alpha_json(workdir, groups, teacher="wrn_16_2"):
    record = {
        "teacher": teacher,
        "groups": [
            {"group": i + 1, "layers": layers, "beta": [0.0] * len(alpha), "alpha": alpha}
            for i, (layers, alpha) in enumerate(groups)
        ],
    }
    with open(os.path.join(workdir, report.ALPHA_FILE), "w") as f:
        json.dump(record, f)


def test_alpha_table_lists_each_runs_searched_alpha_per_group(tmp_path, caplog):
    """alpha.md / alpha.csv: per run with an alpha.json, per group, the maps, alpha, 1 - alpha
    of the last map and its value at the search's start, the run's seed; one row per run where
    several seeds searched; a malformed alpha.json is skipped with a warning."""
    root = str(tmp_path / "runs")
    config = {**_config(DIGITS, 0), "search": {"init_last_logit": 4.0}}
    config["data"]["dataset"] = "digits"
    groups = {
        0: [(["g1_b1", "g1_b2"], [0.25, 0.75]), (["g2_b1", "g2_b2", "g2_b3"], [0.1, 0.2, 0.7])],
        1: [(["g1_b1", "g1_b2"], [0.5, 0.5]), (["g2_b1", "g2_b2", "g2_b3"], [0.0, 0.0, 1.0])],
    }
    for seed in (1, 0):
        stages = {"distill/dfa": _stage("d", 0.94)}
        workdir = _write(root, f"s{seed}", DIGITS, seed, stages, dataset="digits")
        _alpha_json(workdir, groups[seed])
        if seed == 0:
            _write_config(workdir, config)
    bad = _write(root, "bad", DIGITS, 2, {"distill/dfa": _stage("d", 0.9)}, dataset="digits")
    _alpha_json(bad, [(["g1_b1", "g1_b2"], [1.0])])  # One alpha for two maps.
    _write(root, "none", DIGITS, 3, {"distill/last": _stage("d", 0.9)}, dataset="digits")

    out = str(tmp_path / "out")
    assert report.main([root, "--out", out]) == 0
    lines = _lines(os.path.join(out, "alpha.md"))
    s0, s1 = os.path.join(root, "s0"), os.path.join(root, "s1")
    assert lines[0] == (
        "### Searched alpha (the paper's Fig. 4, left): per group, the weight on each map"
    )
    header = "| Pair | Run | Seed | Group | Maps | α | 1 − α_last | at start |"
    # 1 - alpha_last at the start: 1 - e^4 / (e^4 + N - 1), N = 2 and 3 maps.
    assert lines[lines.index(header) + 2 :] == [
        f"| digits: wrn_16_2 → wrn_10_1 | {s0} | 0 | 1 | g1_b1, g1_b2 | 0.250, 0.750 | 0.250"
        " | 0.018 |",
        f"| digits: wrn_16_2 → wrn_10_1 | {s0} | 0 | 2 | g2_b1, g2_b2, g2_b3 | 0.100, 0.200,"
        " 0.700 | 0.300 | 0.035 |",
        f"| digits: wrn_16_2 → wrn_10_1 | {s1} | 1 | 1 | g1_b1, g1_b2 | 0.500, 0.500 | 0.500 | – |",
        f"| digits: wrn_16_2 → wrn_10_1 | {s1} | 1 | 2 | g2_b1, g2_b2, g2_b3 | 0.000, 0.000,"
        " 1.000 | 0.000 | – |",
    ]
    read = _csv(os.path.join(out, "alpha.csv"))
    assert list(read[0]) == list(report.ALPHA_FIELDS)
    assert read[1] == {
        "dataset": "digits",
        "teacher": "wrn_16_2",
        "student": "wrn_10_1",
        "run": s0,
        "seed": "0",
        "group": "2",
        "layers": "g2_b1;g2_b2;g2_b3",
        "alpha": "0.1;0.2;0.7",
        "beta": "0.0;0.0;0.0",
        "one_minus_alpha_last": "0.3",
        "start_one_minus_alpha_last": str(round(2 / (math.exp(4.0) + 2), 6)),
    }
    assert [(r["seed"], r["start_one_minus_alpha_last"]) for r in read[2:]] == [("1", "")] * 2
    warnings = [r.getMessage() for r in caplog.records if "alpha" in r.getMessage()]
    assert len(warnings) == 1 and bad in warnings[0] and "1 alpha for 2 layers" in warnings[0]


def test_no_search_no_alpha_file_and_the_alpha_table_alone(runs, tmp_path):
    """Runs without an alpha.json write no alpha.md under 'all'; `--table alpha` writes it
    alone."""
    out = str(tmp_path / "out")
    assert report.main([runs, "--out", out]) == 0
    assert "alpha.md" not in os.listdir(out)
    workdir = os.path.join(runs, "pair3", "s0")
    _alpha_json(workdir, [(["a", "b"], [0.2, 0.8])], teacher=PAIR3[0])
    out = str(tmp_path / "alpha_only")
    assert report.main([runs, "--out", out, "--table", "alpha"]) == 0
    assert sorted(os.listdir(out)) == ["alpha.csv", "alpha.md"]
    (row,) = _csv(os.path.join(out, "alpha.csv"))
    assert (row["student"], row["seed"], row["alpha"], row["one_minus_alpha_last"]) == (
        PAIR3[1],
        "0",
        "0.2;0.8",
        "0.2",
    )


def test_cells_and_paired_rows_pooling_protocols_say_so_in_the_files(tmp_path):
    """Seeds 0 and 1 at 200 epochs, seed 2 a 2-epoch smoke run, for DFA and Last: each seed's
    two runs agree, but each cell and the paired row pool both protocols, and table5.md/.csv and
    paired.md/.csv say so; a cell of one protocol (the student alone) is unmarked."""
    root = str(tmp_path / "runs")
    for seed, epochs in ((0, 200), (1, 200), (2, 2)):
        stages = {
            name: {**_stage(name, accuracy), "epochs": epochs}
            for name, accuracy in (("distill/dfa", 0.76), ("distill/last", 0.75 - seed / 100))
        }
        workdir = _write(root, f"s{seed}", PAIR1, seed, stages)
        _write_config(workdir, _config(PAIR1, seed, epochs))
        if seed < 2:
            none = _write(root, f"none{seed}", PAIR1, seed, {"distill/none": _stage("n", 0.7)})
            _write_config(none, _config(PAIR1, seed))
    out = str(tmp_path / "out")
    assert report.main([root, "--out", out, "--table", "5"]) == 0
    differing = "epochs;distill.optim.epochs;teacher.optim.epochs"
    table5 = {r["method"]: r for r in _csv(os.path.join(out, "table5.csv"))}
    assert table5["dfa"]["protocols_differ"] == differing
    assert table5["last"]["protocols_differ"] == differing
    assert table5["none"]["protocols_differ"] == ""
    lines = _lines(os.path.join(out, "table5.md"))
    mark = "⟨protocols differ: epochs, distill.optim.epochs, teacher.optim.epochs⟩"
    (dfa,) = [line for line in lines if line.startswith("| DFA |")]
    assert mark in dfa
    (none,) = [line for line in lines if line.startswith("| Student |")]
    assert "⟨" not in none
    (row,) = _csv(os.path.join(out, "paired.csv"))
    assert row["seeds"] == "0;1;2" and row["protocols_differ"] == differing
    (line,) = [line for line in _lines(os.path.join(out, "paired.md")) if "DFA − Last" in line]
    assert mark in line


def test_the_same_run_given_twice_counts_once(tmp_path, caplog):
    """A workdir and its own config.json, or a workdir and a copy of its summary.json under
    another name, are one run: read once, the copy skipped with a warning naming both."""
    root = str(tmp_path / "runs")
    workdir = _write(root, "s1", PAIR3, 1, {"distill/dfa": _stage("d", 0.75)})
    _write_config(workdir, _config(PAIR3, 1))
    copy = str(tmp_path / "s1_summary.json")
    shutil.copy(os.path.join(workdir, report.SUMMARY_FILE), copy)
    (summary,) = report.load_summaries([workdir, os.path.join(workdir, report.CONFIG_FILE)])
    assert summary[report.PATH_KEY] == os.path.join(workdir, report.SUMMARY_FILE)
    assert not caplog.records
    summaries = report.load_summaries([workdir, copy])
    assert len(summaries) == 1
    (warning,) = [r.getMessage() for r in caplog.records]
    assert copy in warning and os.path.join(workdir, report.SUMMARY_FILE) in warning
    assert _row(report.table5(summaries)[1], PAIR3, "dfa")["n"] == 1


def test_a_seed_of_several_runs_counts_once_in_cells_and_pairs_alike(tmp_path):
    """Seed 0 run twice (two workdirs), seed 1 once: DFA's cell has n=2 over seeds 0 and 1, seed
    0 the mean of its runs, marked in the markdown and the CSV; the paired row uses the same
    value for seed 0."""
    root = str(tmp_path / "runs")
    runs = (("a", 0, 0.75, 0.74), ("rerun", 0, 0.79, None), ("b", 1, 0.80, 0.78))
    for name, seed, dfa, last in runs:
        stages = {"distill/dfa": _stage("d", dfa)}
        if last is not None:
            stages["distill/last"] = _stage("l", last)
        _write(root, name, PAIR3, seed, stages)
    out = str(tmp_path / "out")
    assert report.main([root, "--out", out, "--table", "5"]) == 0
    table5 = {r["method"]: r for r in _csv(os.path.join(out, "table5.csv"))}
    dfa = table5["dfa"]
    assert (dfa["n"], dfa["seeds"], dfa["repeated_seeds"]) == ("2", "0;1", "0x2")
    assert float(dfa["mean_last"]) == pytest.approx(78.5)  # (77 + 80) / 2, not (75 + 79 + 80) / 3.
    assert float(dfa["std_last"]) == pytest.approx(math.sqrt(4.5))
    assert table5["last"]["repeated_seeds"] == ""
    (line,) = [line for line in _lines(os.path.join(out, "table5.md")) if line.startswith("| DFA")]
    assert "n=2" in line and "⟨seed 0 ×2⟩" in line
    (row,) = _csv(os.path.join(out, "paired.csv"))
    assert (row["seeds"], row["repeated_seeds"]) == ("0;1", "0x2/1")
    assert [float(d) for d in row["differences"].split(";")] == pytest.approx([3.0, 2.0])
    (line,) = [line for line in _lines(os.path.join(out, "paired.md")) if "DFA − Last" in line]
    assert "0 (DFA ×2): +3.00, 1: +2.00" in line


def test_cinic_results_outside_table4_are_shown_paired_or_named(tmp_path, caplog):
    """CINIC-10 runs of DFA, Last and KD: Table 4 has DFA, Table 5 gets a CINIC-10 column for
    Last (Table 4 has none), the paired table DFA − Last (no paper number), and KD, which no
    table has a column for, is named in a warning with its numbers."""
    root = str(tmp_path / "runs")
    for seed in (0, 1):
        stages = {
            "distill/dfa": _stage("d", 0.85 + seed / 100),
            "distill/last": _stage("l", 0.84),
            "distill/kd": _stage("k", 0.83),
        }
        _write(root, f"s{seed}", CINIC1, seed, stages, dataset="cinic10")
    out = str(tmp_path / "out")
    assert report.main([root, "--out", out]) == 0
    assert _row(_csv(os.path.join(out, "table4.csv")), CINIC1, "dfa")["n"] == "2"
    last = _row(_csv(os.path.join(out, "table5.csv")), CINIC1, "last")
    assert (last["dataset"], last["n"], last["paper"]) == ("cinic10", "2", "")
    (row,) = _csv(os.path.join(out, "paired.csv"))
    assert (row["dataset"], row["against"], row["seeds"], row["paper"]) == (
        "cinic10",
        "last",
        "0;1",
        "",
    )
    assert [float(d) for d in row["differences"].split(";")] == pytest.approx([1.0, 2.0])
    warnings = [r.getMessage() for r in caplog.records if "in no table" in r.getMessage()]
    (warning,) = warnings
    assert "cinic10 shufflenet_v2_2.0 -> shufflenet_v2_1.0 kd" in warning
    assert "n=2" in warning and "83.00" in warning


def test_a_student_carried_over_by_a_later_command_keeps_its_seed(tmp_path):
    """`distill.seeds=(5,)`, run seed 0: a first command trained DFA and Last; a second trains
    DFA alone. The summary it writes carries Last over with its seed 5 (from its student.json),
    so the report pairs the two; a summary written before without it is read with it too."""
    from dfa_jax import pipeline  # pylint: disable=g-import-not-at-top

    root = str(tmp_path / "runs")
    last = _stage("distill/last", 0.75)
    workdir = _write(root, "w", PAIR1, 0, {"distill/dfa": _stage("d", 0.76), "distill/last": last})
    _write_config(workdir, {**_config(PAIR1, 0), "distill": {"seeds": [5]}})
    for label, accuracy in (("dfa", 0.76), ("last", 0.75)):
        directory = os.path.join(workdir, "distill", label)
        _result_file(directory, _stage(f"distill/{label}", accuracy), {"label": label, "seed": 5})
    _result_file(os.path.join(workdir, "distill", "old"), _stage("distill/old", 0.7))
    with open(os.path.join(workdir, report.SUMMARY_FILE)) as f:
        summary = json.load(f)
    summary["stages"]["distill/old"] = _stage("distill/old", 0.7)
    with open(os.path.join(workdir, report.SUMMARY_FILE), "w") as f:
        json.dump(summary, f)
    this_command = {"distill/dfa": {**_stage("distill/dfa", 0.76), "seed": 5}}
    carried = pipeline._finished_before(workdir, this_command)
    assert carried["distill/last"] == {**last, "seed": 5}
    assert "seed" not in carried["distill/old"]  # No student.json: a student of before them.

    (row,) = report.paired_rows(report.collect(report.load_summaries(root)))
    assert row["seeds"] == [5] and row["differences"] == pytest.approx([1.0])


def test_a_legacy_seedless_student_absorbs_only_the_run_seeds(tmp_path, caplog):
    """A summary from before students recorded their seed holds `distill/dfa` (the run seed 0's
    student); a later `distill.seeds=(0, 1, 2)` invocation finished seeds 0-2 and stopped before
    its summary: seeds 1 and 2 count, seed 0 once."""
    root = str(tmp_path / "runs")
    stage = _stage("distill/dfa", 0.76)
    workdir = _write(root, "w", PAIR3, 0, {"distill/dfa": stage})
    _write_config(workdir, {**_config(PAIR3, 0), "distill": {"seeds": [0, 1, 2]}})
    for seed, accuracy in ((0, 0.76), (1, 0.74), (2, 0.78)):
        directory = os.path.join(workdir, "distill", "dfa", f"seed{seed}")
        _result_file(directory, _stage(f"distill/dfa/seed{seed}", accuracy))
    (summary,) = report.load_summaries(root)
    assert set(summary["stages"]) == {"distill/dfa", "distill/dfa/seed1", "distill/dfa/seed2"}
    dfa = _row(report.table2([summary])[1], PAIR3, "dfa")
    assert (dfa["n"], dfa["seeds"], dfa["repeated_seeds"]) == (3, [0, 1, 2], [])
    assert "2 students finished after its summary.json" in caplog.records[0].getMessage()


def test_seeds_are_in_numeric_order_in_the_paired_table_and_the_cells(tmp_path):
    """Seeds 1, 2 and 10, their runs given in another order: 1, 2, 10 in paired.md, paired.csv
    and the cells (not 1, 10, 2); students of seed 0 of run seeds 10 and 2 read '2/0', '10/0'."""
    root = str(tmp_path / "runs")
    for seed in (10, 1, 2):
        stages = {"distill/dfa": _stage("d", 0.76), "distill/last": _stage("l", 0.75 - seed / 1e3)}
        _write(root, f"s{seed}", PAIR1, seed, stages)
    summaries = [
        s for seed in (10, 2, 1) for s in report.load_summaries(os.path.join(root, f"s{seed}"))
    ]
    (row,) = report.paired_rows(report.collect(summaries))
    assert row["seeds"] == [1, 2, 10]
    assert row["differences"] == pytest.approx([1.1, 1.2, 2.0])
    assert _row(report.table5(summaries)[1], PAIR1, "dfa")["seeds"] == [1, 2, 10]
    markdown, _ = report.paired_table(summaries)
    assert "1: +1.10, 2: +1.20, 10: +2.00" in markdown
    out = str(tmp_path / "out")
    assert report.main([root, "--out", out]) == 0
    assert _csv(os.path.join(out, "paired.csv"))[0]["seeds"] == "1;2;10"

    shared = str(tmp_path / "shared")
    for run_seed in (10, 2):
        stages = {f"distill/{label}/seed0": _stage(label, 0.75) for label in ("dfa", "last")}
        _write(shared, f"run{run_seed}", PAIR1, run_seed, stages)
    summaries = [s for r in (10, 2) for s in report.load_summaries(os.path.join(shared, f"run{r}"))]
    (row,) = report.paired_rows(report.collect(summaries))
    assert row["seeds"] == ["2/0", "10/0"]
    assert _row(report.table5(summaries)[1], PAIR1, "dfa")["seeds"] == ["2/0", "10/0"]


def test_an_interval_of_two_seeds():
    """n = 2: mean ± t(0.975, 1) · s / √2, t = 12.706 (df = 1)."""
    got = report.paired_difference([1.0, 3.0])
    half = 12.706 * math.sqrt(2.0) / math.sqrt(2.0)
    assert got["n"] == 2 and got["mean"] == pytest.approx(2.0)
    assert (got["ci95_low"], got["ci95_high"]) == pytest.approx((2.0 - half, 2.0 + half))


def test_accuracies_keep_more_than_two_decimals_and_non_finite_ones_are_dropped(tmp_path):
    """75.5123 % stays 75.5123 in the CSV (only the markdown rounds); a NaN last-epoch accuracy
    is no result, an infinite best-epoch one no best."""
    root = str(tmp_path / "runs")
    _write(root, "s0", PAIR3, 0, {"distill/dfa": _stage("d", 0.755123, best=0.761234)})
    _write(root, "s1", PAIR3, 1, {"distill/dfa": _stage("d", float("nan"))})
    _write(root, "s2", PAIR3, 2, {"distill/dfa": _stage("d", 0.75, best=float("inf"))})
    with open(os.path.join(root, "s1", report.SUMMARY_FILE)) as f:
        assert "NaN" in f.read()  # As JSON writes it; Python reads it back as a float.
    out = str(tmp_path / "out")
    assert report.main([root, "--out", out, "--table", "2"]) == 0
    dfa = _row(_csv(os.path.join(out, "table2.csv")), PAIR3, "dfa")
    assert (dfa["n"], dfa["seeds"]) == ("2", "0;2")  # Seed 1's NaN: no run.
    assert float(dfa["median_last"]) == pytest.approx(75.25615, abs=1e-9)
    assert float(dfa["median_best"]) == pytest.approx(76.1234, abs=1e-9)  # Seed 2's inf: none.
    (entry,) = [
        e
        for e in report.collect(report.load_summaries(root))[("cifar100", *PAIR3, "dfa")]
        if e["seed"] == 0
    ]
    assert (entry["last"], entry["best"]) == (75.5123, 76.1234)


def test_start_reads_the_searchs_starting_logit_alone(tmp_path, caplog):
    """The 'start' student reads `search.init_last_logit` and no other search field: DFA and Start
    runs that differ in the search's rate pair and leave Start's cell unmarked; runs whose
    starting logit differs do not pair, and Start's cell says so."""
    root = str(tmp_path / "rate")
    for seed in (0, 1):
        for label, rate in (("dfa", 0.01), ("start", 0.3 + seed)):
            config = {**_config(PAIR3, seed), "search": {"beta_lr": rate, "init_last_logit": 4.0}}
            stages = {f"distill/{label}": _stage(label, 0.76 if label == "dfa" else 0.75)}
            _write_config(_write(root, f"{label}{seed}", PAIR3, seed, stages), config)
    summaries = report.load_summaries(root)
    (row,) = report.paired_rows(report.collect(summaries))
    assert row["against"] == "start" and row["seeds"] == [0, 1]
    assert row["protocols_differ"] == []
    assert _row(report.table5(summaries)[1], PAIR3, "start")["protocols_differ"] == []
    assert not caplog.records

    root = str(tmp_path / "logit")
    for seed in (0, 1):
        for label, logit in (("dfa", 4.0), ("start", 4.0 + seed)):
            config = {**_config(PAIR3, seed), "search": {"init_last_logit": logit}}
            stages = {f"distill/{label}": _stage(label, 0.76 if label == "dfa" else 0.75)}
            _write_config(_write(root, f"{label}{seed}", PAIR3, seed, stages), config)
    summaries = report.load_summaries(root)
    (row,) = report.paired_rows(report.collect(summaries))
    assert row["seeds"] == [0]  # Seed 1's two runs started the search elsewhere.
    start = _row(report.table5(summaries)[1], PAIR3, "start")
    assert start["protocols_differ"] == ["search.init_last_logit"]
    warnings = [r.getMessage() for r in caplog.records if "not paired" in r.getMessage()]
    assert len(warnings) == 1 and "search.init_last_logit: 4.0 vs 5.0" in warnings[0]


def test_published_statistics_say_what_their_sources_say():
    """The DFA paper states neither its runs nor its epoch; RepDistiller's README is its last
    epoch's, mdistiller's DKD its trainer's best's."""
    assert paper_results.published_statistic(2, "dfa") == ("paper", "unstated")
    assert paper_results.published_statistic(4, "file") == ("paper", "unstated")
    assert paper_results.published_statistic(5, "last") == ("paper", "unstated")
    assert paper_results.published_statistic("crd", "kd") == ("RepDistiller", "last")
    assert paper_results.published_statistic("crd", "dkd") == ("mdistiller", "best")


# Tables 2, 4 and 5 of shared/paper/dfa_eccv2020.md, row by row as printed there.
PAPER_TABLE2 = {  # Teacher, Student, KD, FitNets, AT, Jacobian, FT, AB, SP, Margin, DFA.
    1: (79.17, 77.24, 78.4, 78.17, 77.49, 77.84, 78.26, 78.65, 78.7, 79.11, 79.74),
    2: (79.17, 75.78, 76.61, 76.14, 75.54, 76.24, 76.51, 76.81, 77.41, 77.84, 78.18),
    3: (79.17, 73.42, 73.35, 73.65, 73.3, 73.28, 74.17, 73.9, 74.09, 75.51, 75.85),
}
PAPER_TABLE4 = {  # Teacher Acc, Student Acc, AT, SP, Margin, DFA, DFA-T.
    1: (86.14, 83.28, 84.71, 85.32, 85.29, 85.38, 85.41),
    2: (86.14, 77.34, 79.06, 79.15, 78.79, 79.51, 79.45),
    3: (83.28, 77.34, 78.42, 79.02, 79.69, 79.97, 79.38),
}
PAPER_TABLE5 = {  # Rows Student, Random, Last, Average, DFA; columns WRN_16_2, WRN_16_4, WRN_28_2.
    "none": (73.42, 77.24, 75.78),
    "random": (74.25, 78.92, 77.07),
    "last": (75.51, 79.11, 77.86),
    "average": (74.11, 78.81, 76.99),
    "dfa": (75.85, 79.74, 78.18),
}


def test_paper_tables_equal_the_papers_whole():
    """Every number of Tables 2, 4 and 5 under its pair and method, and nothing else."""
    table2 = ("teacher", "none", "kd", "fitnets", "at", "jacobian", "ft", "ab", "sp", "margin")
    table2 += ("dfa",)
    assert paper_results.TABLE2 == {
        number: dict(zip(table2, values)) for number, values in PAPER_TABLE2.items()
    }
    table4 = ("teacher", "none", "at", "sp", "margin", "dfa", "file")
    assert paper_results.TABLE4 == {
        number: dict(zip(table4, values)) for number, values in PAPER_TABLE4.items()
    }
    students = ("wrn_16_2", "wrn_16_4", "wrn_28_2")
    assert paper_results.TABLE5 == {
        student: {label: values[i] for label, values in PAPER_TABLE5.items()}
        for i, student in enumerate(students)
    }
    # Table 1's and Table 4's pairs, as the tables number them.
    assert paper_results.TABLE2_PAIRS == {1: PAIR1, 2: PAIR2, 3: PAIR3}
    assert paper_results.TABLE4_PAIRS == {
        1: ("shufflenet_v2_2.0", "shufflenet_v2_1.0"),
        2: ("shufflenet_v2_2.0", "shufflenet_v2_0.5"),
        3: ("shufflenet_v2_1.0", "shufflenet_v2_0.5"),
    }
    # Read through the lookup the report uses, every cell lands where the paper prints it.
    for number, (teacher, student) in paper_results.TABLE2_PAIRS.items():
        for label, value in zip(table2, PAPER_TABLE2[number]):
            assert paper_results.paper_value(2, "cifar100", teacher, student, label) == value
    for number, (teacher, student) in paper_results.TABLE4_PAIRS.items():
        for label, value in zip(table4, PAPER_TABLE4[number]):
            assert paper_results.paper_value(4, "cinic10", teacher, student, label) == value
    for i, student in enumerate(students):
        for label, values in PAPER_TABLE5.items():
            assert paper_results.paper_value(5, "cifar100", "wrn_28_4", student, label) == values[i]


def test_every_record_the_docs_cite_exists():
    """The results the README, BENCHMARKS.md and the design notes quote name their records under
    benchmarks/results/: each named file or folder is there."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cited = set()
    for doc in ("README.md", "BENCHMARKS.md", os.path.join("docs", "design.md")):
        with open(os.path.join(root, doc), encoding="utf-8") as f:
            cited |= set(re.findall(r"benchmarks/results/[\w.\-/]*\w/?", f.read()))
    assert len(cited) > 10
    missing = sorted(p for p in cited if not os.path.exists(os.path.join(root, p)))
    assert not missing, missing


# RepDistiller's README, "Benchmark Results on CIFAR-100" (github.com/HobbitLong/RepDistiller),
# its rows as printed there (columns in its order), and mdistiller's README "Main Benchmark
# Results" DKD row (github.com/megvii-research/mdistiller; 77.07 is under ResNet32x4 ->
# ShuffleNet-V2, paper_results says why). None: mdistiller has no DKD for that pair.
REPDISTILLER_PAIRS = (
    ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"),
    ("resnet110", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
    ("vgg13", "vgg8"), ("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"),
    ("ResNet50", "vgg8"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
    ("wrn_40_2", "ShuffleV1"),
)  # fmt: skip
REPDISTILLER_README = {
    "teacher": "75.61 75.61 72.34 74.31 74.31 79.42 74.64 74.64 79.34 79.34 79.42 79.42 75.61",
    "none": "73.26 71.98 69.06 69.06 71.14 72.50 70.36 64.60 64.60 70.36 70.50 71.82 70.50",
    "kd": "74.92 73.54 70.66 70.67 73.08 73.33 72.98 67.37 67.35 73.81 74.07 74.45 74.83",
    "fitnets": "73.58 72.24 69.21 68.99 71.06 73.50 71.02 64.14 63.16 70.69 73.59 73.54 73.73",
    "at": "74.08 72.77 70.55 70.22 72.31 73.44 71.43 59.40 58.58 71.84 71.73 72.73 73.32",
    "sp": "73.83 72.43 69.67 70.04 72.69 72.94 72.68 66.30 68.08 73.34 73.48 74.56 74.52",
    "ab": "72.50 72.38 69.47 69.53 70.98 73.17 70.94 66.06 67.20 70.65 73.55 74.31 73.34",
    "ft": "73.25 71.59 69.84 70.22 72.37 72.86 70.58 61.78 60.99 70.29 71.75 72.50 72.03",
    "crd": "75.48 74.14 71.16 71.46 73.48 75.51 73.94 69.73 69.11 74.30 75.11 75.65 76.05",
    "dkd": "76.23 74.81 71.97 None 74.11 76.32 74.68 69.71 70.35 None 76.45 77.07 76.70",
}


def test_crd_suite_numbers_equal_repdistillers_and_mdistillers_readmes_whole():
    """Every published number of the CRD suite under its pair and method, as RepDistiller's
    README (teacher, student, KD, FitNet, AT, SP, AB, FT, CRD) and mdistiller's (DKD) print it."""
    want = {
        pair: {
            label: None if row.split()[i] == "None" else float(row.split()[i])
            for label, row in REPDISTILLER_README.items()
        }
        for i, pair in enumerate(REPDISTILLER_PAIRS)
    }
    assert paper_results.CRD_SUITE == want
    for (teacher, student), values in want.items():
        for label, value in values.items():
            assert paper_results.paper_value("crd", "cifar100", teacher, student, label) == value


def test_runs_without_a_recorded_seed_each_count_as_a_seed_of_their_own(tmp_path):
    """Two runs whose summaries record no seed are two samples of the cell (n = 2, their median,
    mean and sample std), not one seed averaged over them."""
    root = str(tmp_path / "runs")
    _write(root, "a", PAIR3, None, {"distill/kd": _stage("distill/kd", 0.74)})
    _write(root, "b", PAIR3, None, {"distill/kd": _stage("distill/kd", 0.77)})
    row = _row(report.table2(report.load_summaries(root))[1], PAIR3, "kd")
    assert row["n"] == 2
    assert (row["median_last"], row["mean_last"]) == pytest.approx((75.5, 75.5))
    assert row["std_last"] == pytest.approx(3.0 / math.sqrt(2), abs=1e-6)


def test_runs_without_a_recorded_seed_are_never_paired(tmp_path):
    """DFA − Last pairs students of one recorded seed only: a DFA run and a Last run that record
    no seed may have seen other batches and initialisations, so they make no pair."""
    root = str(tmp_path / "runs")
    _write(
        root, "s0", PAIR1, 0, {"distill/dfa": _stage("d", 0.79), "distill/last": _stage("l", 0.78)}
    )
    _write(root, "u1", PAIR1, None, {"distill/dfa": _stage("d", 0.70)})
    _write(root, "u2", PAIR1, None, {"distill/last": _stage("l", 0.60)})
    (row,) = report.paired_rows(report.collect(report.load_summaries(root)))
    assert row["against"] == "last" and row["seeds"] == [0]
    assert row["differences"] == pytest.approx([1.0])


def test_table_headers_are_the_papers():
    """Each table heads its columns (rows) with the names the paper prints: Table 2's header row
    (Teacher … DFA), Table 4's methods (the teacher's and student's Acc, AT, SP, Margin, DFA,
    DFA-T) and Table 5's rows (Student, Random, Last, Average, DFA; Start is ours)."""
    assert [name for _, name in report.TABLE2_COLUMNS] == [
        "Teacher", "Student", "KD", "FitNets", "AT", "Jacobian", "FT", "AB", "SP", "Margin", "DFA"
    ]  # fmt: skip
    assert dict(report.TABLE4_COLUMNS) == {
        "teacher": "Teacher", "none": "Student", "at": "AT", "sp": "SP", "margin": "Margin",
        "dfa": "DFA", "file": "DFA-T",
    }  # fmt: skip
    assert dict(report.TABLE5_ROWS) == {
        "none": "Student", "random": "Random", "last": "Last", "start": "Start",
        "average": "Average", "dfa": "DFA",
    }  # fmt: skip
