"""launch/local.sh passes the main command's flags through, and --dry-run runs nothing."""

import os
import subprocess

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


def test_sweep_dry_run_lists_every_run(tmp_path):
    out = subprocess.run(
        [
            "bash",
            "launch/sweep.sh",
            f"--runs={tmp_path}",
            "--configs=configs/cifar100_pair3.py",
            "--methods=kd,last,dfa",
            "--seeds=0,1",
            "--dry-run",
            "--config.teacher.checkpoint=/t",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(out) == 6
    assert all("--config.teacher.checkpoint=/t" in line for line in out)
    assert f"--workdir={tmp_path}/cifar100_pair3/kd/seed1" in out[1]
    assert "--config.distill.aggregation=last" in out[2] and "distill" in out[2]
    assert "--config.distill.aggregation=dfa" in out[4] and "stages" not in out[4]
    assert not any(tmp_path.iterdir())
