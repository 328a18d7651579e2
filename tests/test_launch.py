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
