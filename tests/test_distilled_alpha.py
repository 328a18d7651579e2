"""A distilled student of DFA's aggregations records, in its result.json (and so summary.json),
the alpha it trained with (`alpha`: softmax of its state's frozen beta) and where that came from
(`aggregation`), alone or in a cohort, resumed or not; other methods' students record neither."""

import hashlib
import json
import logging
import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train_loop import tiny_demo

from dfa_jax import distill, methods, pipeline, preemption, train_loop
from dfa_jax import teacher as teacher_lib

TEACHER = "wrn_16_1"  # The tiny demo's: three groups of two maps.
# The 'file' aggregation's alpha.json, written by hand (DFA-T: another run's search).
FILE_ALPHA = [[0.3, 0.7], [0.9, 0.1], [0.25, 0.75]]


def _softmax(beta) -> np.ndarray:
    beta = np.asarray(beta, np.float64)
    e = np.exp(beta - beta.max())
    return e / e.sum()


def _expected(alpha: list) -> dict:
    """Per group, NumPy's softmax of the frozen beta = log(alpha) (`methods.frozen_beta`)."""
    with np.errstate(divide="ignore"):  # log(0) = -inf: Last's one-hot.
        return {f"g{i + 1}": _softmax(np.log(a)) for i, a in enumerate(alpha)}


def _write_alpha_file(path, alpha) -> str:
    t_model = teacher_lib.build_model(TEACHER, 10, "float32")
    groups = [{"layers": list(n), "alpha": a} for n, a in zip(t_model.feature_groups(), alpha)]
    with open(path, "w") as f:
        json.dump({"teacher": TEACHER, "groups": groups}, f)
    return str(path)


def _config(alpha_path, **overrides):
    return tiny_demo(
        **{
            "stages": ("teacher", "distill"),
            "distill.alpha_file": alpha_path,
            "checkpoint_every_steps": 1000,
            **overrides,
        }
    )


def _read(path):
    with open(path) as f:
        return json.load(f)


def _assert_alpha(recorded: dict, expected: dict):
    assert sorted(recorded) == sorted(expected)
    for key, alpha in expected.items():
        np.testing.assert_allclose(recorded[key], alpha, rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.fixture(scope="module")
def teacher_workdir(tiny_demo_teacher):
    """A finished tiny teacher (the tiny demo's, these configs' teacher: conftest's), which each
    test copies without its config: each records its own."""
    return tiny_demo_teacher


def _copy(teacher_workdir, tmp_path) -> str:
    workdir = str(tmp_path / "run")
    ignore = shutil.ignore_patterns("summary.json", "config.json", "config_hash")
    shutil.copytree(teacher_workdir, workdir, ignore=ignore)
    return workdir


def test_each_aggregations_result_records_its_alpha_and_source(teacher_workdir, tmp_path):
    """Last, Average and Random (seed 3) share a step; File trains alone (the limit of three a
    step): each result.json has its alpha, as NumPy computes it from the expected beta, and its
    source; summary.json copies them; a second run of the finished command rewrites nothing."""
    workdir = _copy(teacher_workdir, tmp_path)
    alpha_path = _write_alpha_file(tmp_path / "other_run_alpha.json", FILE_ALPHA)
    seed = 3
    config = _config(
        alpha_path,
        **{
            "distill.aggregation": "last",
            "distill.compare_with": ("average", "random", "file"),
            "distill.seeds": (seed,),
            "distill.max_students_per_step": 3,
        },
    )
    summary = pipeline.run(config, workdir)
    assert len(os.listdir(os.path.join(workdir, "distill", distill.COHORTS_DIR))) == 1
    assert os.path.isdir(os.path.join(workdir, "distill", "file", "checkpoints"))  # Alone.

    t_model = teacher_lib.build_model(TEACHER, 10, "float32")
    seeded = tiny_demo(seed=seed)
    random_alpha = methods.aggregation_alpha("random", t_model, seeded, "")  # The seeded draw.
    with open(alpha_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    expected = {
        "last": (_expected([[0.0, 1.0]] * 3), {"kind": "last"}),
        "average": (_expected([[0.5, 0.5]] * 3), {"kind": "average"}),
        "random": (_expected(random_alpha), {"kind": "random", "seed": seed}),
        "file": (
            _expected(FILE_ALPHA),
            {"kind": "file", "file": os.path.abspath(alpha_path), "sha256": digest},
        ),
    }
    on_disk = _read(os.path.join(workdir, "summary.json"))["stages"]
    for label, (alpha, aggregation) in expected.items():
        result = _read(os.path.join(workdir, "distill", label, "result.json"))
        _assert_alpha(result["alpha"], alpha)
        assert result["aggregation"] == aggregation, label
        for stages in (summary["stages"], on_disk):
            entry = stages[f"distill/{label}"]
            assert (entry["alpha"], entry["aggregation"]) == (result["alpha"], aggregation)
    assert _read(os.path.join(workdir, "distill", "last", "result.json"))["alpha"] == {
        f"g{g}": [0.0, 1.0] for g in (1, 2, 3)
    }
    # The draw is no accident of this seed: another seed draws another alpha.
    assert not np.allclose(
        random_alpha[0], methods.aggregation_alpha("random", t_model, config, "")[0]
    )

    results = {label: os.path.join(workdir, "distill", label, "result.json") for label in expected}
    before = {label: (os.stat(p).st_mtime_ns, open(p).read()) for label, p in results.items()}
    pipeline.run(config, workdir)
    assert {
        label: (os.stat(p).st_mtime_ns, open(p).read()) for label, p in results.items()
    } == before


def _raw_checkpoint_betas(cohort_dir) -> list[dict]:
    """Each method's stacked frozen beta in the cohort's latest checkpoint, read from disk
    without the run's state as a template."""
    manager = ocp.CheckpointManager(os.path.join(cohort_dir, "checkpoints"))
    state = manager.restore(
        manager.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )["state"]
    manager.close()
    groups = state["groups"]
    groups = [groups[k] for k in sorted(groups, key=int)] if isinstance(groups, dict) else groups
    return [{k: np.asarray(v) for k, v in g["beta"].items()} for g in groups]


def test_a_resumed_cohorts_results_record_the_alpha_of_its_state(
    teacher_workdir, tmp_path, monkeypatch
):
    """Random (seeds 0 and 1) and KD share a step, stopped at step 3 and resumed: each Random
    student's alpha is softmax of its frozen beta in the cohort's final state and checkpoint;
    KD's results record no alpha."""
    workdir = _copy(teacher_workdir, tmp_path)
    config = _config(
        None,  # No 'file' student: no alpha file.
        **{
            "distill.aggregation": "random",
            "distill.compare_with": ("kd",),
            "distill.seeds": (0, 1),
        },
    )
    calls = []
    monkeypatch.setattr(preemption, "should_stop", lambda: calls.append(1) or len(calls) == 3)
    with pytest.raises(preemption.Stopped, match=r"at step 3/"):
        pipeline.run(config, workdir)
    assert not train_loop.is_done(os.path.join(workdir, "distill", "random", "seed0"))
    monkeypatch.setattr(preemption, "should_stop", lambda: False)
    final, real_run = {}, train_loop.run

    def keeping_state(stage, config, mesh):
        result = real_run(stage, config, mesh)
        final["state"] = result["state"]
        return result

    monkeypatch.setattr(train_loop, "run", keeping_state)
    summary = pipeline.run(config, workdir)

    (cohort_dir,) = os.listdir(os.path.join(workdir, "distill", distill.COHORTS_DIR))
    on_disk = _raw_checkpoint_betas(
        os.path.join(workdir, "distill", distill.COHORTS_DIR, cohort_dir)
    )
    dfa_state = final["state"].groups[0]  # Methods in order of their first student: DFA, KD.
    alphas = []
    for k, seed in enumerate((0, 1)):
        name = f"distill/random/seed{seed}"
        result = _read(os.path.join(workdir, name, "result.json"))
        assert result["aggregation"] == {"kind": "random", "seed": seed}
        in_state = {g: _softmax(np.asarray(b)[k]) for g, b in dfa_state.beta.items()}
        _assert_alpha(result["alpha"], in_state)
        _assert_alpha(result["alpha"], {g: _softmax(b[k]) for g, b in on_disk[0].items()})
        assert summary["stages"][name]["alpha"] == result["alpha"]
        alphas.append(result["alpha"])
    assert alphas[0] != alphas[1]  # Each seed its own draw.
    for seed in (0, 1):
        result = _read(os.path.join(workdir, f"distill/kd/seed{seed}", "result.json"))
        assert "alpha" not in result and "aggregation" not in result
        assert "alpha" not in summary["stages"][f"distill/kd/seed{seed}"]


def test_a_student_resumed_after_its_alpha_file_changed_records_what_it_trained_with(
    teacher_workdir, tmp_path, monkeypatch, caplog
):
    """File (in a cohort with the demo's Last and student alone): stopped, its alpha.json
    rewritten, resumed. It trains on with its
    checkpoint's alpha, which its result records; the file's source, now another alpha's, is
    left out, with a warning."""
    workdir = _copy(teacher_workdir, tmp_path)
    alpha_path = _write_alpha_file(tmp_path / "alpha.json", FILE_ALPHA)
    config = _config(alpha_path, **{"distill.aggregation": "file"})
    calls = []
    monkeypatch.setattr(preemption, "should_stop", lambda: calls.append(1) or len(calls) == 3)
    with pytest.raises(preemption.Stopped):
        pipeline.run(config, workdir)
    monkeypatch.setattr(preemption, "should_stop", lambda: False)
    _write_alpha_file(alpha_path, [[0.5, 0.5]] * 3)
    caplog.set_level(logging.WARNING, logger="absl")
    pipeline.run(config, workdir)
    result = _read(os.path.join(workdir, "distill", "file", "result.json"))
    _assert_alpha(result["alpha"], _expected(FILE_ALPHA))
    assert "aggregation" not in result
    assert "its result records the alpha alone" in caplog.text


def test_start_and_dfa_students_start_from_the_alpha_their_source_names(tmp_path):
    """'start' and 'dfa' (a search's alpha.json in the workdir), without training: DFA's start
    freezes beta = log(alpha) and records where that alpha came from."""
    t_model = teacher_lib.build_model(TEACHER, 10, "float32")
    pair = methods.Pair(teacher=t_model, student=teacher_lib.build_model("wrn_10_1", 10, "float32"))
    workdir = str(tmp_path)
    path = _write_alpha_file(tmp_path / "alpha.json", FILE_ALPHA)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    config = tiny_demo()
    logits = np.zeros(2)
    logits[-1] = config.search.init_last_logit
    expected = {
        "start": (
            {f"g{g}": _softmax(logits) for g in (1, 2, 3)},
            {"kind": "start", "init_last_logit": config.search.init_last_logit},
        ),
        "dfa": (_expected(FILE_ALPHA), {"kind": "dfa", "file": path, "sha256": digest}),
    }
    for label, (alpha, aggregation) in expected.items():
        setup = methods.Setup(label, 0, config, workdir, "", pair, *[None] * 5)
        start = methods.implementation(label).start(setup, methods.Start({}, ({}, {}), None))
        assert start.record == {"aggregation": aggregation}
        _assert_alpha(distill.trained_alpha(start.beta), alpha)
