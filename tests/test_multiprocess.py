"""Two processes on loopback (`launch/local.sh --processes 2`) make the run of one process with
the same number of devices to the README's stated tolerance (different programs: their devices
meet over loopback, not in one process), a checkpoint they write resumes in one process, and a
stopped and resumed two-process run equals its uninterrupted self bitwise (the same program)."""

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import SUBPROCESS_XLA_FLAGS
from dfa_jax import pipeline
from test_config import load_config
from test_train_loop import assert_within_layout_tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # benchmarks/ is run from the repository root, outside the package.
from benchmarks import layout_agreement  # noqa: E402

# Teacher -> search (three groups), seconds per stage; one metrics row per step. (Distillation is
# the teacher's w step with the teacher's forward as input, which the search has too.) Four
# teacher epochs: the SIGTERM test's stop lands well inside the teacher stage, and the teacher
# leaves several checkpoints to resume from.
TINY = [
    "--config=configs/demo.py:tiny",
    "--config.stages=('teacher', 'search')",
    "--config.log_every_steps=1",
    "--config.teacher.optim.epochs=4",
    # Two teacher checkpoints (steps 8 and 16) to resume from; a 2-process save costs seconds.
    "--config.checkpoint_every_steps=8",
]
TEACHER_ONLY = "--config.stages=('teacher',)"
TWO_PROCESSES = ["bash", "launch/local.sh", "--processes", "2"]
# One CPU device per process, whatever the host's core count (local.sh would split the cores);
# after TINY, whose --config must come first.
ONE_DEVICE_EACH = "--config.num_cpu_devices=1"
TIMEOUT_S = 900


def _env():
    # main.py adds its own XLA flags to these.
    return dict(
        os.environ,
        PYTHON=sys.executable,
        JAX_PLATFORMS="cpu",
        CUDA_VISIBLE_DEVICES="",
        XLA_FLAGS=SUBPROCESS_XLA_FLAGS,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S
    )


def _stages(workdir) -> dict:
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)["stages"]


def _losses(path) -> list[float]:
    with open(path) as f:
        return [row["train/loss"] for row in map(json.loads, f) if "train/loss" in row]


def _records(path) -> list[dict]:
    """metrics.jsonl without the one field that is a wall-clock measurement."""
    with open(path) as f:
        return [
            {k: v for k, v in json.loads(line).items() if k != "train/images_per_s"} for line in f
        ]


def _tiny_config():
    """TINY, in this process."""
    config = load_config("demo", "tiny")
    config.stages = ("teacher", "search")
    config.log_every_steps = 1
    config.teacher.optim.epochs = 4
    config.checkpoint_every_steps = 8
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multiprocess")
    one, two = str(base / "one"), str(base / "two")
    # One process with two CPU devices (this one's): the same 2-device mesh as two processes of
    # one each.
    pipeline.run(_tiny_config(), one)
    port = str(_free_port())
    out = _run([*TWO_PROCESSES, "--port", port, *TINY, ONE_DEVICE_EACH, f"--workdir={two}"])
    log = os.path.join(two, "logs", "process_1.log")
    assert out.returncode == 0, out.stderr[-3000:] + (
        open(log).read()[-2000:] if os.path.exists(log) else ""
    )
    return one, two


def test_two_processes_make_the_same_run_as_one(runs):
    """Every stage's per-step losses, alpha and the final teacher and student parameters agree
    to the stated tolerance (test_train_loop.LAYOUT_TOLERANCE, the README's promise across
    layouts)."""
    one, two = runs
    assert _stages(one).keys() == _stages(two).keys()
    assert_within_layout_tolerance(layout_agreement.compare(two, one))
    # Only process 0 writes the run's records: the same rows as one process wrote, none twice.
    for name in ("teacher/metrics.jsonl", "search/g2/metrics.jsonl", "search/alpha_history.json"):
        with open(os.path.join(one, name)) as f, open(os.path.join(two, name)) as g:
            assert len(f.read().splitlines()) == len(g.read().splitlines()), name


def test_checkpoint_of_two_processes_resumes_in_one(runs, tmp_path, caplog):
    _, two = runs
    resumed = str(tmp_path / "resumed")
    shutil.copytree(two, resumed)
    # As if killed in the teacher stage after its last-but-one checkpoint.
    stage = os.path.join(resumed, "teacher")
    checkpoints = os.path.join(stage, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit())
    assert len(steps) >= 2
    shutil.rmtree(os.path.join(checkpoints, str(steps[-1])))
    os.remove(os.path.join(stage, "result.json"))
    os.remove(os.path.join(resumed, "summary.json"))
    # In this process, with its two devices (the programs of the one-process run above). The
    # absl logger's own level, whatever verbosity an earlier test in this worker left it at.
    caplog.set_level(logging.INFO, logger="absl")
    pipeline.run(_tiny_config(), resumed)
    assert f"[teacher] resuming from step {steps[-2]}" in caplog.text
    assert _stages(resumed).keys() == _stages(two).keys()
    # The last steps ran as another program (one process): the layout tolerance, not bitwise.
    assert_within_layout_tolerance(layout_agreement.compare(resumed, two))


def test_two_processes_set_a_damaged_checkpoint_aside_together(runs, tmp_path):
    """The newest checkpoint's files cut short: both processes find it unreadable, process 0
    alone moves it aside, and both resume from the one before (not one process moving on alone,
    which cost the intact checkpoint too or hung the run)."""
    _, two = runs
    workdir = str(tmp_path / "damaged")
    shutil.copytree(two, workdir)
    shutil.rmtree(os.path.join(workdir, "search"))
    os.remove(os.path.join(workdir, "teacher", "result.json"))
    os.remove(os.path.join(workdir, "summary.json"))
    checkpoints = os.path.join(workdir, "teacher", "checkpoints")
    steps = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit())
    for root, _, names in os.walk(os.path.join(checkpoints, str(steps[-1]))):
        for name in names:
            if os.sep + "d" in root:  # The arrays' data files.
                path = os.path.join(root, name)
                os.truncate(path, os.path.getsize(path) // 2)
    command = [
        *TWO_PROCESSES,
        "--port",
        str(_free_port()),
        *[flag if not flag.startswith("--config.stages=") else TEACHER_ONLY for flag in TINY],
        ONE_DEVICE_EACH,
        f"--workdir={workdir}",
    ]
    out = _run(command)
    with open(os.path.join(workdir, "logs", "process_1.log")) as f:
        log_1 = f.read()
    assert out.returncode == 0, out.stderr[-3000:] + log_1[-2000:]
    (aside,) = os.listdir(checkpoints + "-unreadable")
    assert aside.startswith(f"{steps[-1]}-")
    for output in (out.stdout + out.stderr, log_1):
        assert f"moved it to {checkpoints}-unreadable/{aside}" in output
        assert f"[teacher] resuming from step {steps[-2]}" in output
    assert _stages(workdir)["teacher"]["steps"] == _stages(two)["teacher"]["steps"]


# Process 1's read of its 6th training batch fails (a local read error on one host): the hook
# replaces `loader.train_batches` as the module is first imported.
_FAILING_READ = """
import importlib.abc, importlib.machinery, sys

class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "dfa_jax.data.loader":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            batches, read = module.train_batches, []

            def failing(*args, **kwargs):
                for batch in batches(*args, **kwargs):
                    read.append(1)
                    if len(read) == 6:
                        raise OSError(5, "Input/output error (on process 1 only)")
                    yield batch

            module.train_batches = failing

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _Hook())
"""


def test_an_error_in_one_process_ends_both_at_once(tmp_path):
    """Process 1 alone fails mid-training: it leaves at once, where JAX's exit-time shutdown
    kept it waiting (five minutes, silent) for process 0, which waited for it in the step's
    collective; process 0 then fails in that collective. The limit, far above their start-up
    and a few steps, is far below the five minutes."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_FAILING_READ)
    port = str(_free_port())
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dfa_jax.main",
                *[
                    flag if not flag.startswith("--config.stages=") else TEACHER_ONLY
                    for flag in TINY
                ],
                ONE_DEVICE_EACH,
                f"--workdir={tmp_path / 'run'}",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=ROOT,
            env=dict(_env(), **({"PYTHONPATH": str(hook)} if i == 1 else {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=150)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert processes[1].returncode == 1, outputs[1][-3000:]
    assert "Input/output error (on process 1 only)" in outputs[1]
    assert processes[0].returncode != 0, outputs[0][-3000:]


# One process of a run: its rows of a global batch of 12 (rows i hold the value i), made global
# and gathered back.
_UNEVEN = """
import sys
import numpy as np
from dfa_jax import parallel
parallel.configure_cpu_devices(int(sys.argv[1]))
parallel.initialize_distributed(sys.argv[2], 2, int(sys.argv[3]))
from jax.experimental import multihost_utils
mesh = parallel.make_mesh()
rows = parallel.process_rows(mesh, 12)
batch = parallel.to_global({"x": np.arange(12, dtype=np.float32)[rows]}, mesh)
print("gathered", multihost_utils.process_allgather(batch["x"], tiled=True).tolist())
"""


def test_processes_of_different_device_counts_assemble_the_global_batch():
    """Process 0 with two devices, process 1 with one: each holds its devices' share of the rows
    (8 and 4 of 12), and the global batch is the 12 rows in order (its size was taken as the
    local rows times the process count: 16, refused by JAX)."""
    address = f"127.0.0.1:{_free_port()}"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _UNEVEN, str(devices), address, str(i)],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, devices in ((0, 2), (1, 1))
    ]
    try:
        outputs = [p.communicate(timeout=150)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
        assert f"gathered {[float(i) for i in range(12)]}" in output


def test_sigterm_stops_both_processes_at_one_step_and_resumes(runs, tmp_path):
    """A preemption notice (SIGTERM to the launcher, forwarded to every process): JAX's
    preemption service makes both processes checkpoint the same step and exit 143; the same
    command then finishes the run with the numbers of the uninterrupted one."""
    _, two = runs
    workdir = str(tmp_path / "stopped")
    # The teacher stage alone (`stages` cannot change its numbers): the stop lands in it. Given
    # once: a second `--config.stages` would append to the first.
    command = [
        *TWO_PROCESSES,
        "--port",
        str(_free_port()),
        *[flag if not flag.startswith("--config.stages=") else TEACHER_ONLY for flag in TINY],
        ONE_DEVICE_EACH,
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
    # Waits for the first step's row (an event, not a fixed delay), then stops the run: 15 of its
    # 16 teacher steps are still to come.
    while not (os.path.exists(metrics) and len(_losses(metrics)) >= 1):
        assert launcher.poll() is None and time.time() < deadline, launcher.stdout.read()[-3000:]
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    output = launcher.communicate(timeout=TIMEOUT_S)[0]
    assert launcher.returncode == 143, output[-3000:]
    stopped = re.findall(r"stopped by SIGTERM in stage '(\S+)' at step (\d+)/", output)
    with open(os.path.join(workdir, "logs", "process_1.log")) as f:
        stopped_1 = re.findall(r"stopped by SIGTERM in stage '(\S+)' at step (\d+)/", f.read())
    assert len(stopped) == 1 and stopped == stopped_1, (stopped, stopped_1)

    resumed = _run([*command, f"--workdir={workdir}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not os.path.exists(os.path.join(workdir, "search"))
    assert f"resuming from step {stopped[0][1]}" in resumed.stdout + resumed.stderr
    # The same layout, so the same program: bitwise, records and result alike.
    stopped_run, straight_run = _stages(workdir)["teacher"], _stages(two)["teacher"]
    for key in ("best_accuracy", "best_epoch", "last_accuracy", "steps"):
        assert stopped_run[key] == straight_run[key], key
    assert _records(os.path.join(workdir, "teacher", "metrics.jsonl")) == _records(
        os.path.join(two, "teacher", "metrics.jsonl")
    )


def test_a_held_workdir_stops_every_process_of_a_second_run(tmp_path):
    """Process 0 takes the workdir's lock; when another run holds it, process 1 stops with the
    same error instead of waiting for process 0 at the next sync until a timeout kills it."""
    from dfa_jax import workdir as workdir_lib

    workdir = str(tmp_path / "held")
    command = [
        *TWO_PROCESSES,
        "--port",
        str(_free_port()),
        *[flag if not flag.startswith("--config.stages=") else TEACHER_ONLY for flag in TINY],
        ONE_DEVICE_EACH,
        f"--workdir={workdir}",
    ]
    with workdir_lib.locked(workdir):
        done = _run(command)
    assert done.returncode != 0
    assert "is in use by another run" in done.stderr, done.stderr[-3000:]
    with open(os.path.join(workdir, "logs", "process_1.log")) as f:
        log = f.read()
    assert "is in use by another run" in log and "DEADLINE_EXCEEDED" not in log, log[-3000:]
    assert not os.path.exists(os.path.join(workdir, "config.json"))
