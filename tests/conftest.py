"""Test set-up: two simulated CPU devices, quiet TensorFlow, no GPU for tf.data."""

import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The suite runs on the CPU on any machine; the runs it starts must not refuse a CPU-only jaxlib
# on a GPU machine (`parallel.check_accelerators_used`).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The tests compile far more than they compute (tiny models, a few steps each), so they trade
# XLA:CPU's code quality for compile time: the backend at optimisation level 0 (~30 % faster to
# compile), the older fusion emitters instead of the MLIR ones and one codegen thread (together
# ~3x less CPU for a tiny distillation step's compile, the step about as fast). Tests compare runs
# under the same flags, or to tolerances. Subprocesses the tests start inherit them (SUBPROCESS_
# XLA_FLAGS where a test sets its own environment).
_SPEED_FLAGS = "--xla_backend_optimization_level=0"
# An XLA that no longer knows a flag aborts the process, so these are kept only where this jaxlib
# accepts them: probed once, by the process pytest starts in (the workers inherit the answer).
_OPTIONAL_SPEED_FLAGS = (
    "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
)


def _accepted_speed_flags() -> str:
    if "DFA_JAX_TEST_XLA_FLAGS" not in os.environ:
        flags = f"{_SPEED_FLAGS} {_OPTIONAL_SPEED_FLAGS}"
        probe = subprocess.run(
            [sys.executable, "-c", "import jax; jax.devices()"],
            env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
            capture_output=True,
            check=False,
        )
        os.environ["DFA_JAX_TEST_XLA_FLAGS"] = flags if probe.returncode == 0 else _SPEED_FLAGS
    return os.environ["DFA_JAX_TEST_XLA_FLAGS"]


SUBPROCESS_XLA_FLAGS = _accepted_speed_flags()
# Two simulated devices on a shared CI core pair: let their collectives wait out a busy moment
# instead of aborting the process (see parallel.configure_cpu_devices).
# Added to flags the environment already sets (a dump flag, say), not replaced by them.
_OWN_XLA_FLAGS = (
    f"{SUBPROCESS_XLA_FLAGS} --xla_cpu_collective_call_terminate_timeout_seconds=3600".split()
)
_GIVEN_XLA_FLAGS = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join(
    _GIVEN_XLA_FLAGS
    + [
        f
        for f in _OWN_XLA_FLAGS
        if f.split("=")[0] not in {g.split("=")[0] for g in _GIVEN_XLA_FLAGS}
    ]
)

# One persistent compilation cache per test run, shared by the xdist workers and the
# subprocesses the tests start (inherited through the environment): the tiny pipelines many tests
# run compile the same steps, and on 2 CPU cores compiling is most of their time. The process
# pytest was started in makes it before it starts the workers (they inherit it) and removes it
# when the run ends (a run leaves ~35 MB there); a directory the caller set is left alone.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="dfa_jax_tests_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

# Must run before any JAX backend is initialised: every test sees a 2-device CPU mesh.
jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_platforms", "cpu")


# The files whose module fixtures and pipelines take longest on 2 cores, slowest first (measured
# with `pytest --durations=0`). xdist hands each worker one file at a time (`--dist loadfile`,
# `--no-loadscope-reorder` in pytest.ini): starting the long ones first keeps one of them from
# running alone at the end while the other worker idles.
SLOWEST_FILES = (
    "test_multiprocess.py",
    "test_cohort.py",
    "test_search_distill.py",
    "test_train_loop.py",
    "test_methods.py",
    "test_distilled_alpha.py",
    "test_logit_methods.py",
    "test_precision.py",
    "test_cross_architecture.py",
    "test_methods_against_peers.py",
    "test_models.py",
    "test_cifar_mobile_models.py",
    "test_interop.py",
    "test_cifar_models.py",
    "test_resilience.py",
    "test_evaluation.py",
)


@pytest.fixture(scope="session")
def tiny_demo_teacher(tmp_path_factory):
    """The tiny demo's finished teacher (`test_train_loop.tiny_demo()`'s teacher stage: 3
    epochs of 6 steps, an end-of-stage checkpoint only), trained once per pytest process (each
    xdist worker) for the modules whose runs start from it. Copy it (`shutil.copytree`) without
    its config.json, config_hash and summary.json: the copy then records its own config, the
    teacher stage finished; never write into it. Only a config whose teacher is tiny_demo()'s in
    every field that changes the teacher's numbers (`workdir._TEACHER_INPUTS`: seed, dtype,
    data, teacher) may start from it."""
    from dfa_jax import pipeline  # pylint: disable=g-import-not-at-top
    from test_train_loop import tiny_demo  # pylint: disable=g-import-not-at-top

    workdir = str(tmp_path_factory.mktemp("tiny_demo_teacher") / "run")
    # Only the end-of-stage checkpoint (each save costs time); its rows are not tiny_demo()'s,
    # whose checkpoint steps also log.
    pipeline.run(tiny_demo(checkpoint_every_steps=1000), workdir)
    return workdir


def _cpu_model() -> str:
    """The CPU's model as `lscpu` names it, with its family and model numbers where Linux gives
    them (Intel and AMD parts of one name differ in speed: BENCHMARKS.md, "Test suite")."""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # The first processor's block is enough.
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return "unknown CPU"
    name = fields.get("model name", "unknown CPU")
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


@pytest.hookimpl(tryfirst=True)  # Before xdist's own, registered after this file.
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per CPU this process may run on (logical CPUs, within the affinity
    a container or `taskset` sets). xdist's own count asks psutil for the whole host's physical
    cores: one worker on a 2-vCPU VM whose vCPUs share a core (the suite then takes up to twice
    as long), and a big host's count inside a container limited to two CPUs. xdist's
    PYTEST_XDIST_AUTO_NUM_WORKERS still decides where it is set."""
    del config
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # No affinity on this system (macOS).
        return os.cpu_count() or 1


@pytest.hookimpl(trylast=True)  # After the slowest durations, just above the result line.
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line just above the result, also under `-q`: which machine the suite's time was
    taken on."""
    del exitstatus
    workers = getattr(config.option, "numprocesses", None) or 0
    terminalreporter.write_line(
        f"machine: {_cpu_model()}, {os.cpu_count()} cores, {workers or 'no'} pytest workers"
    )


def pytest_sessionfinish(session, exitstatus):
    del session, exitstatus
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    del config

    def rank(item):
        name = os.path.basename(item.nodeid.split("::")[0])
        return SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)

    items.sort(key=rank)  # Stable: each file's tests keep their order.
