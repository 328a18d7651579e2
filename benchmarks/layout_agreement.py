"""How far the same config and seed drift apart on different device and process layouts.

    python -m benchmarks.layout_agreement [--workdir /tmp/dfa_jax_layouts] [--seeds 0,1,2]

The tiny demo pipeline (`configs/demo.py:tiny`: teacher -> search over three groups -> DFA
distillation, one row of metrics per step) runs on four layouts: one process with two CPU
devices (the reference), the same again (which must be bitwise equal), one process with one
device, and two processes of one device each (`launch/local.sh --processes 2`). Different layouts
are different compiled programs (BatchNorm's and the gradients' cross-device reductions), so XLA
promises nothing bitwise between them; this measures what they do give. Per layout it prints one
JSON line: per stage the largest relative difference of a step's train loss from the
reference's (first step and all steps), the largest difference of alpha and of the accuracies,
and of the final teacher and student parameters taken as one vector each (||a - b|| / ||b||; a
per-array relative measure would be dominated by BatchNorm biases that start at zero), with the
largest difference of any single value. The README's promise and the tests' tolerances come from
these numbers. `--compare-only` recomputes the lines from the workdirs of an earlier run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np

from benchmarks import crash_suite  # For its subprocess environment.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = [
    "--config=configs/demo.py:tiny",
    "--config.distill.compare_with=()",
    "--config.log_every_steps=1",
]
LAYOUTS = {
    "1 process x 2 devices (reference)": ("direct", 2),
    "1 process x 2 devices, again": ("direct", 2),
    "1 process x 1 device": ("direct", 1),
    "2 processes x 1 device": ("local", 1),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(workdir: str, launcher: str, devices: int, seed: int, env: dict) -> None:
    flags = [*FLAGS, f"--config.num_cpu_devices={devices}", f"--config.seed={seed}"]
    if launcher == "direct":
        command = [sys.executable, "-m", "dfa_jax.main", *flags]
    else:
        command = ["bash", "launch/local.sh", "--processes", "2", "--port", str(_free_port())]
        command += flags
    subprocess.run(
        [*command, f"--workdir={workdir}"],
        cwd=ROOT,
        env=dict(env, PYTHON=sys.executable),
        check=True,
        capture_output=True,
    )


def _losses(workdir: str) -> dict[str, np.ndarray]:
    """Per stage, the train loss of every step."""
    found = {}
    for parent, _, names in os.walk(workdir):
        if "metrics.jsonl" in names:
            with open(os.path.join(parent, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f]
            losses = [r["train/loss"] for r in rows if "train/loss" in r]
            if losses:
                found[os.path.relpath(parent, workdir)] = np.array(losses, np.float64)
    return found


def parameter_difference(a: dict, b: dict) -> dict:
    """`{'rel_l2': ||a - b|| / ||b||, 'max_abs': max |a - b|}`, every array of `b` as one vector."""
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    diff = np.concatenate([(a[k].astype(np.float64) - b[k]).ravel() for k in sorted(b)])
    ref = np.concatenate([b[k].astype(np.float64).ravel() for k in sorted(b)])
    return {
        "rel_l2": float(np.linalg.norm(diff) / np.linalg.norm(ref)),
        "max_abs": float(np.max(np.abs(diff))),
    }


def _restore(path: str) -> dict:
    """An orbax checkpoint's arrays as NumPy on this process, whatever layout saved them."""
    import jax  # pylint: disable=g-import-not-at-top
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        checkpointer.metadata(path).item_metadata.tree,
    )
    return jax.device_get(checkpointer.restore(path, target))


def final_arrays(workdir: str) -> dict[str, np.ndarray]:
    """The exported teacher's arrays and, where the run distilled, the DFA student's final ones."""
    arrays = {
        "teacher/" + k: v
        for k, v in _leaves(_restore(os.path.join(workdir, "teacher", "variables")))
    }
    student_dir = os.path.join(workdir, "distill", "dfa", "checkpoints")
    if os.path.isdir(student_dir):
        last = max(int(d) for d in os.listdir(student_dir) if d.isdigit())
        state = _restore(os.path.join(student_dir, str(last), "state"))
        arrays.update(("student/" + k, v) for k, v in _leaves(state["params"]["student"]))
    return arrays


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves(tree[k], f"{prefix}/{k}" if prefix else str(k))
    else:
        yield prefix, np.asarray(tree)


def compare(workdir: str, reference: str) -> dict:
    """Differences of `workdir`'s run from `reference`'s (see the module docstring)."""
    la, lb = _losses(workdir), _losses(reference)
    assert la.keys() == lb.keys(), (sorted(la), sorted(lb))
    steps = {}
    for stage in sorted(la):
        assert la[stage].shape == lb[stage].shape, stage
        rel = np.abs(la[stage] - lb[stage]) / np.abs(lb[stage])
        steps[stage] = {"first_step": float(rel[0]), "all_steps": float(rel.max())}
    result = {"loss_rel_diff": steps}
    alpha_file = os.path.join(reference, "alpha.json")
    if os.path.exists(alpha_file):
        with open(os.path.join(workdir, "alpha.json")) as f, open(alpha_file) as g:
            a, b = json.load(f)["groups"], json.load(g)["groups"]
        result["alpha_abs_diff"] = max(
            float(np.max(np.abs(np.array(x["alpha"]) - np.array(y["alpha"])))) for x, y in zip(a, b)
        )
    arrays_a, arrays_b = final_arrays(workdir), final_arrays(reference)
    assert arrays_a.keys() == arrays_b.keys()
    result["parameters"] = {
        name: parameter_difference(
            {k: v for k, v in arrays_a.items() if k.startswith(name + "/")},
            {k: v for k, v in arrays_b.items() if k.startswith(name + "/")},
        )
        for name in ("teacher", "student")
        if any(k.startswith(name + "/") for k in arrays_b)
    }
    with (
        open(os.path.join(workdir, "summary.json")) as f,
        open(os.path.join(reference, "summary.json")) as g,
    ):
        a, b = json.load(f)["stages"], json.load(g)["stages"]
    result["accuracy_abs_diff"] = max(
        abs(a[stage][k] - v) for stage in b for k, v in b[stage].items() if k.endswith("accuracy")
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/dfa_jax_layouts")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--compare-only", action="store_true", help="reuse the workdirs")
    args = parser.parse_args()
    import jax  # pylint: disable=g-import-not-at-top

    jax.config.update("jax_num_cpu_devices", 2)  # Orbax restores the saved arrays onto these.
    os.makedirs(args.workdir, exist_ok=True)
    env = crash_suite._env(os.path.join(args.workdir, "compilation_cache"))
    for seed in (int(s) for s in args.seeds.split(",")):
        reference = None
        for i, (name, (launcher, devices)) in enumerate(LAYOUTS.items()):
            workdir = os.path.join(args.workdir, f"seed{seed}", f"layout{i}")
            if not args.compare_only:
                shutil.rmtree(workdir, ignore_errors=True)
                _run(workdir, launcher, devices, seed, env)
            if reference is None:
                reference = workdir
                continue
            print(json.dumps({"seed": seed, "layout": name, **compare(workdir, reference)}))


if __name__ == "__main__":
    main()
