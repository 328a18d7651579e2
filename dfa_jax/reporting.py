"""What a run tells its user: `summary.json` in the workdir and a printed results table."""

from __future__ import annotations

import hashlib
import json
import os

from dfa_jax import train_loop

SUMMARY_FILE = "summary.json"


def config_hash(config) -> str:
    """A short stable hash of the config's JSON, to tell runs (and changed configs) apart."""
    return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:12]


def write_summary(workdir: str, summary: dict) -> str:
    path = os.path.join(workdir, SUMMARY_FILE)
    train_loop.write_json_atomic(path, summary)
    return path


def results_table(stages: dict) -> str:
    """A markdown table: one row per stage with its best and last test accuracy (percent)."""
    lines = [
        "| stage | best acc (%) | best epoch | last acc (%) | epochs | wall time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in stages.items():
        best_epoch = result.get("best_epoch", "-")
        epochs = result.get("epochs", "-")
        wall = result.get("wall_time_s")
        lines.append(
            f"| {name} | {100 * result['best_accuracy']:.2f} | {best_epoch} |"
            f" {100 * result['last_accuracy']:.2f} | {epochs} | {'-' if wall is None else f'{wall:.0f}'} |"
        )
    return "\n".join(lines)


def load_summary(workdir: str) -> dict:
    with open(os.path.join(workdir, SUMMARY_FILE)) as f:
        return json.load(f)
