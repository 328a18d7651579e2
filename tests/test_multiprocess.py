"""Two processes on loopback (`launch/local.sh --processes 2`) make the same run as one process
with the same number of devices, and a checkpoint they write resumes in one process."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

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


def _run(command) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )


def _one_process(workdir, *extra) -> str:
    out = _run([sys.executable, "-m", "dfa_jax.main", *TINY, f"--workdir={workdir}", *extra])
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
    port = str(_free_port())
    out = _run(
        ["bash", "launch/local.sh", "--processes", "2", "--port", port, *TINY, f"--workdir={two}"]
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


def test_sigterm_stops_both_processes_at_one_step_and_resumes(runs, tmp_path):
    """A preemption notice (SIGTERM to the launcher, forwarded to every process): JAX's
    preemption service makes both processes checkpoint the same step and exit 143; the same
    command then finishes the run with the numbers of the uninterrupted one."""
    _, two = runs
    workdir = str(tmp_path / "stopped")
    # The teacher stage alone (`stages` cannot change its numbers): the stop lands in it.
    command = [
        "bash",
        "launch/local.sh",
        "--processes",
        "2",
        "--port",
        str(_free_port()),
        *TINY,
        "--config.stages=('teacher',)",
    ]
    launcher = subprocess.Popen(
        [*command, f"--workdir={workdir}"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = os.path.join(workdir, "teacher", "metrics.jsonl")
    deadline = time.time() + TIMEOUT_S
    while not (os.path.exists(metrics) and len(_losses(metrics)) >= 2):
        assert launcher.poll() is None and time.time() < deadline, launcher.stdout.read()[-3000:]
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    output = launcher.communicate(timeout=TIMEOUT_S)[0]
    assert launcher.returncode == 143, output[-3000:]
    stopped = re.findall(r"stopped by SIGTERM in stage '(\S+)' at step (\d+)/", output)
    with open(os.path.join(workdir, "logs", "process_1.log")) as f:
        stopped_1 = re.findall(r"stopped by SIGTERM in stage '(\S+)' at step (\d+)/", f.read())
    assert len(stopped) == 1 and stopped == stopped_1, (stopped, stopped_1)

    resumed = _run([*command, f"--workdir={workdir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {stopped[0][1]}" in resumed.stdout + resumed.stderr
    stopped_run, straight_run = _stages(workdir)["teacher"], _stages(two)["teacher"]
    for key in ("best_accuracy", "best_epoch", "last_accuracy", "steps"):
        assert stopped_run[key] == pytest.approx(straight_run[key], abs=1e-6), key
    np.testing.assert_allclose(
        _losses(os.path.join(workdir, "teacher", "metrics.jsonl")),
        _losses(os.path.join(two, "teacher", "metrics.jsonl")),
        rtol=1e-5,
    )
