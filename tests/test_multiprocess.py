"""Two processes on loopback (`launch/local.sh --processes 2`) make the same run as one process
with the same number of devices, and a checkpoint they write resumes in one process."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Teacher -> search (three groups) -> DFA distillation, seconds per stage.
TINY = [
    "--config=configs/demo.py:tiny",
    "--config.distill.compare_with=()",
    "--config.log_every_steps=1",
]
TIMEOUT_S = 900


def _env():
    env = dict(os.environ, PYTHON=sys.executable, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    env.pop("XLA_FLAGS", None)  # main.py sets its own; the tests' 2-device flag must not leak.
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process(workdir, *extra) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "dfa_jax.main", *TINY, f"--workdir={workdir}", *extra],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def _stages(workdir) -> dict:
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)["stages"]


def _losses(path) -> list[float]:
    with open(path) as f:
        return [row["train/loss"] for row in map(json.loads, f) if "train/loss" in row]


def _assert_same_run(a, b):
    """Same accuracies and alpha (to float tolerance: the two runs reduce in the same order, but
    nothing promises bitwise equality across process layouts)."""
    assert a.keys() == b.keys()
    for stage in a:
        for key in ("best_accuracy", "last_accuracy", "student_last_accuracy"):
            if key in a[stage]:
                assert a[stage][key] == pytest.approx(b[stage][key], abs=1e-6), (stage, key)
    for group, alpha in a["search"]["alpha"].items():
        np.testing.assert_allclose(alpha, b["search"]["alpha"][group], rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multiprocess")
    one, two = str(base / "one"), str(base / "two")
    # One process with two CPU devices: the same 2-device mesh as two processes of one each.
    _one_process(one, "--config.num_cpu_devices=2")
    out = subprocess.run(
        [
            "bash",
            "launch/local.sh",
            "--processes",
            "2",
            "--port",
            str(_free_port()),
            *TINY,
            f"--workdir={two}",
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    log = os.path.join(two, "logs", "process_1.log")
    assert out.returncode == 0, out.stderr[-3000:] + (
        open(log).read()[-2000:] if os.path.exists(log) else ""
    )
    return one, two


def test_two_processes_make_the_same_run_as_one(runs):
    one, two = runs
    _assert_same_run(_stages(one), _stages(two))
    for stage in ("teacher", "distill/dfa"):
        np.testing.assert_allclose(
            _losses(os.path.join(two, stage, "metrics.jsonl")),
            _losses(os.path.join(one, stage, "metrics.jsonl")),
            rtol=1e-5,
        )
    # Only process 0 writes the run's records: the same rows as one process wrote, none twice.
    for name in ("teacher/metrics.jsonl", "search/g2/metrics.jsonl", "search/alpha_history.json"):
        with open(os.path.join(one, name)) as f, open(os.path.join(two, name)) as g:
            assert len(f.read().splitlines()) == len(g.read().splitlines()), name


def test_checkpoint_of_two_processes_resumes_in_one(runs, tmp_path):
    _, two = runs
    resumed = str(tmp_path / "resumed")
    shutil.copytree(two, resumed)
    # As if killed in distillation after its last-but-one checkpoint.
    stage = os.path.join(resumed, "distill", "dfa")
    checkpoints = os.path.join(stage, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit())
    assert len(steps) >= 2
    shutil.rmtree(os.path.join(checkpoints, str(steps[-1])))
    os.remove(os.path.join(stage, "result.json"))
    os.remove(os.path.join(resumed, "summary.json"))
    log = _one_process(resumed, "--config.num_cpu_devices=2")
    assert f"[distill/dfa] resuming from step {steps[-2]}" in log
    _assert_same_run(_stages(two), _stages(resumed))
