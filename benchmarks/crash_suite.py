"""Kill -9 a tiny pipeline at random moments, run the same command again, compare with a run that
was never interrupted.

    python -m benchmarks.crash_suite --trials 20 [--seed 0] [--workdir /tmp/crash_suite]

A warm-up run fills a persistent compilation cache that every later run uses. The pipeline is
the demo's, shrunk (`configs/demo.py:tiny`: teacher -> search over three groups
-> DFA distillation). A reference run goes first; its wall time bounds the kill moments. Each
trial starts the command, sends SIGKILL after a uniformly drawn delay (so kills land in start-up,
compilation, any stage's steps, evaluation, checkpoint writes, exports and the final records),
then re-runs the same command to the end and compares with the reference, bitwise: every
accuracy of `summary.json`, `alpha.json`, the teacher's exported variables and the final student
parameters, and every stage's records: `metrics.jsonl` and the TensorBoard scalars, read without
TensorBoard's purging of restarted steps (images/s aside). Prints one JSON line per trial and a
final "N/N identical" line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
    "--config=configs/demo.py:tiny",
    "--config.distill.compare_with=()",
    "--config.num_cpu_devices=2",
    "--config.checkpoint_every_steps=2",
    # A row every step: a kill between checkpoints leaves rows the resumed run logs again.
    "--config.log_every_steps=1",
]


def _command(workdir: str) -> list[str]:
    return [sys.executable, "-m", "dfa_jax.main", *FLAGS, f"--workdir={workdir}"]


def _env(cache_dir: str) -> dict:
    # A persistent compilation cache, filled by a warm-up run: a trial then spends its time in
    # the run's own work (steps, evaluation, checkpoints), where kills are meant to land.
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        CUDA_VISIBLE_DEVICES="",
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    env.pop("XLA_FLAGS", None)
    return env


def _run_to_end(workdir: str, env: dict, log) -> float:
    start = time.time()
    subprocess.run(_command(workdir), cwd=ROOT, env=env, stdout=log, stderr=log, check=True)
    return time.time() - start


def _fingerprint(workdir: str) -> dict:
    """What must not change: accuracies, alpha, the teacher's and the student's final arrays."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    with open(os.path.join(workdir, "summary.json")) as f:
        stages = json.load(f)["stages"]
    accuracies = {
        f"{stage}/{k}": v for stage, r in stages.items() for k, v in r.items() if "accuracy" in k
    }
    with open(os.path.join(workdir, "alpha.json")) as f:
        alpha = json.load(f)
    teacher = ocp.StandardCheckpointer().restore(os.path.join(workdir, "teacher", "variables"))
    student_dir = os.path.join(workdir, "distill", "dfa", "checkpoints")
    with ocp.CheckpointManager(student_dir) as manager:
        step = manager.latest_step()
        student = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
        ).state["params"]["student"]
    arrays = {}
    for name, tree in (("teacher", teacher), ("student", student)):
        for path, leaf in _leaves(tree):
            arrays[f"{name}/{path}"] = np.asarray(leaf)
    return {
        "accuracies": accuracies,
        "alpha": alpha,
        "arrays": arrays,
        "student_step": step,
        "records": _records(workdir),
    }


def _records(workdir: str) -> dict:
    """Per stage directory: its metrics.jsonl rows and its TensorBoard scalars as (step, value)
    per tag, images/s aside (a time), each step as often as it shows."""
    from tensorboard.backend.event_processing import (  # pylint: disable=g-import-not-at-top
        event_accumulator,
    )

    records = {}
    for directory, _, names in sorted(os.walk(workdir)):
        if "metrics.jsonl" not in names:
            continue
        stage = os.path.relpath(directory, workdir)
        with open(os.path.join(directory, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        records[f"{stage}/metrics.jsonl"] = [
            {k: v for k, v in row.items() if k != "train/images_per_s"} for row in rows
        ]
        events = event_accumulator.EventAccumulator(directory, purge_orphaned_data=False)
        events.Reload()
        records[f"{stage}/tensorboard"] = {
            tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in sorted(events.Tags()["scalars"])
            if tag != "train/images_per_s"
        }
    return records


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves(tree[k], f"{prefix}/{k}" if prefix else str(k))
    else:
        yield prefix, tree


def _differences(a: dict, b: dict) -> list[str]:
    found = []
    for key in ("accuracies", "alpha", "student_step"):
        if a[key] != b[key]:
            found.append(key)
    found += [
        name
        for name in sorted(set(a["records"]) | set(b["records"]))
        if a["records"].get(name) != b["records"].get(name)
    ]
    if a["arrays"].keys() != b["arrays"].keys():
        found.append("array names")
    else:
        found += [k for k in a["arrays"] if not np.array_equal(a["arrays"][k], b["arrays"][k])]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--workdir", default="/tmp/dfa_jax_crash_suite")
    args = parser.parse_args()
    import jax  # pylint: disable=g-import-not-at-top

    # The runs save from 2 CPU devices; orbax restores onto the same device layout.
    jax.config.update("jax_num_cpu_devices", 2)
    rng = random.Random(args.seed)
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    log = open(os.path.join(args.workdir, "log.txt"), "w")

    env = _env(os.path.join(args.workdir, "compilation_cache"))
    _run_to_end(os.path.join(args.workdir, "warm_up"), env, log)
    reference_dir = os.path.join(args.workdir, "reference")
    reference_s = _run_to_end(reference_dir, env, log)
    reference = _fingerprint(reference_dir)
    print(json.dumps({"reference_wall_s": round(reference_s, 1)}), flush=True)

    identical = 0
    for trial in range(args.trials):
        workdir = os.path.join(args.workdir, f"trial{trial:02d}")
        delay = rng.uniform(0.0, reference_s)
        process = subprocess.Popen(_command(workdir), cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            process.wait(timeout=delay)
            killed = False  # Finished before the kill moment.
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            killed = True
        progress = sorted(
            os.path.relpath(os.path.join(d, "result.json"), workdir)
            for d, _, names in os.walk(workdir)
            if "result.json" in names
        )
        _run_to_end(workdir, env, log)
        differences = _differences(reference, _fingerprint(workdir))
        identical += not differences
        print(
            json.dumps(
                {
                    "trial": trial,
                    "kill_after_s": round(delay, 1),
                    "killed": killed,
                    "stages_done_at_kill": progress,
                    "identical": not differences,
                    "differences": differences[:5],
                }
            ),
            flush=True,
        )
        shutil.rmtree(workdir)
    print(f"{identical}/{args.trials} identical", flush=True)
    sys.exit(0 if identical == args.trials else 1)


if __name__ == "__main__":
    main()
