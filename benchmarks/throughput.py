"""Training-step throughput of every stage's jitted step, and of a PyTorch reference of the same.

  python -m benchmarks.throughput [--quick] [--torch] [--torch-compile] [--batch 128]
      [--dtype float32|bfloat16]
      [--cases teacher_wrn_16_2,search_pair3] [--devices N] [--steps N] [--pipeline]
      [--cohort-mode auto|loop|vmap]

Each case takes its stage's own step and initial state from the stage's builder
(`teacher.build_stage`, `search.build_group_stage` for group 2, `distill.build_stage` with beta
frozen), feeds it random CIFAR-sized uint8 batches (32x32x3, 100 classes), jitted over the
project's mesh with the state donated (`parallel.jit_step`), and times it: tracing and lowering
(`trace_s`) and XLA's compile (`compile_s`) ahead of time, then the first call (`first_call_s`, which reuses that executable);
after a warm-up step, N steps run back to back with one `block_until_ready` at the end, and
`img_per_s = N * batch / time`. `--torch` times `benchmarks/torch_reference.py`'s twin of
each step in the same process, right after the JAX one, and reports `ratio = img_per_s /
`torch_img_per_s`. `--torch-compile` also times that twin under `torch.compile` (inductor: the
forward and loss, their backward, the optimizer's step), right after the eager one, with the same
protocol: its first calls, which compile, apart (`torch_compile_s`), then
`torch_compile_img_per_s` and `ratio_compile = img_per_s / torch_compile_img_per_s`.
Output: a header, one JSON line per case, then a markdown table.

`cohort_<pair>_k<K>`: K DFA students sharing the teacher in one step (`cohort.py`, in the mode
`distill.cohort='auto'` picks for the backend) and one student's step, timed in the same process;
`img_per_s` counts every student's images, `speedup` = K one-student steps' time over one
K-student step's. `mixed_<pair>`: one student of each of Table 2's methods that share a step
(MIXED_LABELS) in one step, and each of them alone; `speedup` = the sum of their own steps' times
over the shared step's.

FLOPs: `gflop_per_step` is the compiled step's own count (XLA's cost analysis, all devices),
`achieved_tflop_s` that at the measured pace, and on a chip of `PEAK_TFLOPS`
`peak_fraction_{bf16,tf32,fp32}` its share of the chip's dense peaks.

FLOPs are XLA's count: it skips a convolution's taps on the zero padding and counts elementwise
work too, so a WRN step at 32x32 counts ~6-8 % under the usual dense conv + matmul count.

Memory: `peak_mem_mb` is the process's peak resident set while the case ran (Linux's VmHWM, reset
before each case; the process maximum elsewhere), or the device's `peak_bytes_in_use` on a GPU.
On a CPU that peak includes the process's baseline (Python, the libraries, JAX's state while the
PyTorch twins run), so the sides compare by what each adds to what was in use before it was built:
`added_mem_mb`, `torch_added_mem_mb`, `torch_compile_added_mem_mb`.

Load: each case is timed `--repeats` times (3), JAX and PyTorch alternating, each side keeping its
fastest; `step_ms_spread` / `torch_step_ms_spread` (slowest over fastest) and the load average
show how quiet the machine was.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dfa_jax import bilevel, config_lib, inputs, methods, parallel
from dfa_jax import distill as distill_lib
from dfa_jax import search as search_lib
from dfa_jax import teacher as teacher_lib
from dfa_jax.data import loader, sources

NUM_CLASSES = 100
SEARCH_GROUP = 2  # A middle group: the teacher runs to its end, the student around it.
# Steps per second are small on a CPU: a case runs at least this many timed steps and at least
# `min_time_s` seconds (`--steps` fixes the count instead).
MIN_STEPS = 3

CASES = (
    "teacher_wrn_16_2",
    "teacher_wrn_28_4",
    "search_pair1",
    "search_pair3",
    "distill_pair1_dfa",
    "distill_pair3_dfa",
    "distill_pair1_kd",
    "distill_pair3_kd",
    "distill_shufflenet_2.0_0.5_dfa",
    # K students of DFA sharing the teacher in one step (cohort.py), against K one-student steps.
    *(f"cohort_{pair}_k{k}" for pair in ("pair3", "demo") for k in (1, 2, 4, 8)),
    # One student of each MIXED_LABELS method in one step, against each one's own step.
    "mixed_pair3",
    "mixed_demo",
)
# Table 2's methods whose students share a step (FT and AB train alone: a first stage of their
# own); DFA with a frozen alpha ('average': the cost does not depend on its values).
MIXED_LABELS = ("average", "kd", "fitnets", "at", "jacobian", "sp", "margin")
QUICK_CASES = ("teacher_wrn_16_2", "search_pair3", "distill_pair3_dfa", "cohort_demo_k4")
# Table 2's CIFAR-100 pairs (configs/cifar100_pair{1,3}.py) and Table 4's ShuffleNetV2 pair 2.
PAIRS = {
    "pair1": ("wrn_28_4", "wrn_16_4"),
    "pair3": ("wrn_28_4", "wrn_16_2"),
    "shufflenet_2.0_0.5": ("shufflenet_v2_2.0", "shufflenet_v2_0.5"),
    "demo": ("wrn_16_2", "wrn_10_1"),  # configs/demo.py's pair, on CIFAR-sized input.
}
KEYS = (
    "case",
    "backend",
    "devices",
    "batch",
    "dtype",
    "img_per_s",
    "compile_s",
    "peak_mem_mb",
    "torch_img_per_s",
    "ratio",
)


# ------------------------------------------------------------------------------------------------
# Process set-up
# ------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """lscpu's "Model name" (the platform's processor string where lscpu is missing), with the
    CPU family and model numbers where Linux gives them: parts of one name differ in speed (two
    2-core "AMD EPYC" machines time the same step 2.4x apart)."""
    name = platform.processor() or "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    fields = {}
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                break  # The first processor's block.
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def _reset_peak_rss() -> bool:
    """Resets Linux's VmHWM (peak RSS) to the current RSS; False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    """The process's resident set now (Linux's VmRSS; 0 elsewhere)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _in_use_mb() -> float:
    """Memory in use now, where `_peak_mem_mb` counts it: the device's bytes on a GPU, else the
    resident set."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return (device.memory_stats() or {}).get("bytes_in_use", 0) / 2**20
    return _rss_mb()


def _peak_mem_mb() -> float:
    device = jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        return stats.get("peak_bytes_in_use", 0) / 2**20
    return _peak_rss_mb()


# ------------------------------------------------------------------------------------------------
# The project's steps
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Runner:
    """One jitted step and what it is called with: `state, metrics = fn(state, *args)`."""

    fn: Callable
    make_state: Callable[[], Any]  # A fresh state: the step donates (consumes) it.
    args: tuple
    traces: list  # One entry per trace of the step's Python function.


def _counting(step):
    traces = []

    def counted(*args):
        traces.append(1)
        return step(*args)

    return counted, traces


def _runner(step, mesh, make_state, args) -> Runner:
    counted, traces = _counting(step)
    return Runner(parallel.jit_step(counted, mesh), make_state, args, traces)


def random_batch(batch_size: int, seed: int) -> dict:
    """A host batch as the loader makes it: uint8 [B, 32, 32, 3] images, int32 [B] labels."""
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8),
        "label": rng.integers(0, NUM_CLASSES, (batch_size,)).astype(np.int32),
    }


def case_config(case: str, batch: int, dtype: str, cohort_mode: str = "auto"):
    """The config whose stage the case runs: Table 2's pair 1/3 or Table 4's pair 2."""
    pair = next((p for p in PAIRS if f"_{p}" in case), "pair3")
    teacher_name, student_name = PAIRS[pair]
    if pair.startswith("shufflenet"):
        config = config_lib.cinic10_pair(teacher_name, student_name)
        # The same CIFAR-sized input and augmentation as every other case.
        config.data.augment = "pad_crop"
    else:
        config = config_lib.cifar100_pair(student_name)
        config.teacher.model = teacher_name
    config.data.dataset = "cifar100"
    config.dtype = dtype
    for optim in (config.teacher.optim, config.distill.optim):
        optim.batch_size = batch
    config.teacher.optim.nesterov = True
    config.search.batch_size = batch
    config.distill.cohort = cohort_mode
    if case.startswith("teacher_"):
        config.teacher.model = case.removeprefix("teacher_")
    return config


def _copies(state):
    """`state -> a fresh copy` each call (the step donates, i.e. consumes, its state)."""
    return lambda: jax.tree.map(jnp.copy, state)


def _stage_runner(stage, mesh, args) -> Runner:
    """The stage's own step (re-jitted around a trace counter) from copies of its state."""
    return _runner(stage.step_fn.__wrapped__, mesh, _copies(stage.state), args)


def run_data(config, train_examples: int = 50_000) -> inputs.RunData:
    """The case's dataset with CIFAR's split sizes, labels only: what the stage builders read
    (the schedules' steps per epoch; the 7:3 search split); the benchmark feeds its own batches."""

    def split(n: int) -> loader.ArrayExamples:
        return loader.ArrayExamples(np.zeros((n, 1, 1, 1), np.uint8), np.zeros(n, np.int32))

    search_train = int(train_examples * (1 - config.data.search_val_fraction))
    return inputs.RunData(
        info=sources.DATASETS[config.data.dataset],
        train=split(train_examples),
        test=split(10_000),
        search_train=split(search_train),
        search_val=split(train_examples - search_train),
    )


def build_teacher(case: str, config, mesh, batch: dict) -> dict[str, Runner]:
    """The teacher stage's step (`teacher.build_stage`): cross-entropy, SGD Nesterov + wd."""
    stage = teacher_lib.build_stage(config, mesh, run_data(config), "unused")
    return {"step": _stage_runner(stage, mesh, (batch, None, None))}


def build_search(case: str, config, mesh, batch: dict, val_batch: dict) -> dict[str, Runner]:
    """The search stage's bilevel step of group 2 (`search.build_group_stage`), and its halves
    alone: the w step (the same step with beta frozen) and the beta step (the same step with a
    zero w loss)."""
    data = run_data(config)
    search = search_lib.build(config, mesh, data)
    teacher_vars = teacher_lib.init_variables(search.teacher_model, config.seed + 1, mesh)
    stage = search_lib.build_group_stage(
        search, config, mesh, data, "unused", SEARCH_GROUP, search.state
    )
    loss_fn, beta_loss_fn = search_lib.make_bridge_loss_fn(
        search.teacher_model, search.student_model, SEARCH_GROUP, config
    )

    def zero_w_loss(params, batch_stats, beta, batch, rng, aux):
        return jnp.zeros((), jnp.float32), (batch_stats, {})

    def half(w_loss, with_beta):
        beta_args = {
            "beta_loss_fn": beta_loss_fn,
            "beta_tx": search.beta_tx,
            "beta_key": methods.group_key(SEARCH_GROUP),
        }
        return bilevel.make_bilevel_step(
            w_loss,
            search.w_tx,
            seed=config.seed,
            order=config.search.order,
            preprocess_fn=inputs.make_train_preprocess(config.data, data.info),
            w_trainable=search_lib.w_trainable(search.state.params, SEARCH_GROUP),
            **(beta_args if with_beta else {}),
        )

    args = (batch, val_batch, teacher_vars)
    copies = _copies(search.state)
    return {
        "step": _stage_runner(stage, mesh, args),
        "w_step": _runner(half(loss_fn, False), mesh, copies, args),
        "beta_step": _runner(half(zero_w_loss, True), mesh, copies, args),
    }


def _distill_runner(config, mesh, batch, students) -> Runner:
    """`distill.build_stage`'s step for `students` ((label, seed)), from their starts."""
    data = run_data(config)
    pair = distill_lib.pair_of(config, data)
    teacher_vars = teacher_lib.init_variables(pair.teacher, config.seed + 1, mesh)
    stage = distill_lib.build_stage(config, mesh, data, "unused", teacher_vars, students)
    return _stage_runner(stage, mesh, (batch, None, teacher_vars))


def build_distill(case: str, config, mesh, batch: dict) -> dict[str, Runner]:
    """The distillation step (`distill.build_stage`): DFA with a frozen alpha (the 'average'
    one: the cost does not depend on its values) or KD, SGD Nesterov + weight decay."""
    label = case.rsplit("_", 1)[1]
    label = "average" if label == "dfa" else label
    return {"step": _distill_runner(config, mesh, batch, [(label, config.seed)])}


def build_cohort(case: str, config, mesh, batch: dict) -> dict[str, Runner]:
    """K DFA students (frozen average alpha, seeds 0..K-1) in one step (`distill.build_stage`,
    in `distill.cohort_mode`'s mode for this backend) and, as 'single', one student's step."""
    students = int(case.rsplit("_k", 1)[1])
    return {
        "step": _distill_runner(config, mesh, batch, [("average", k) for k in range(students)]),
        "single": build_distill("distill_dfa", config, mesh, batch)["step"],
    }


def build_mixed(case: str, config, mesh, batch: dict) -> dict[str, Runner]:
    """One student of each MIXED_LABELS method in one step (`distill.build_stage`: the methods'
    stacks in one program, the teacher's forward once) and, as 'single/<label>', each alone."""
    return {
        "step": _distill_runner(config, mesh, batch, [(label, 0) for label in MIXED_LABELS]),
        **{
            f"single/{label}": _distill_runner(config, mesh, batch, [(label, 0)])
            for label in MIXED_LABELS
        },
    }


def build_case(
    case: str, mesh, batch_size: int, dtype: str, cohort_mode: str = "auto"
) -> dict[str, Runner]:
    """The runners of `case`: 'step' (what the stage trains with), and for the search its parts."""
    config = case_config(case, batch_size, dtype, cohort_mode)
    batch = parallel.to_global(random_batch(batch_size, 0), mesh)
    if case.startswith("teacher_"):
        return build_teacher(case, config, mesh, batch)
    if case.startswith("search_"):
        val_batch = parallel.to_global(random_batch(batch_size, 1), mesh)
        return build_search(case, config, mesh, batch, val_batch)
    if case.startswith("distill_"):
        return build_distill(case, config, mesh, batch)
    if case.startswith("cohort_"):
        return build_cohort(case, config, mesh, batch)
    if case.startswith("mixed_"):
        return build_mixed(case, config, mesh, batch)
    raise ValueError(f"unknown case {case!r}; valid: {', '.join(CASES)}")


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    step_s: float  # Seconds per step in the timed loop.
    first_call_s: float  # The first call: one step (JAX: after the step was compiled ahead).
    steps: int
    faults_per_step: float  # Minor page faults per timed step (all threads of the process).
    trace_s: float | None = None  # JAX: tracing and lowering to StableHLO.
    compile_s: float | None = None  # XLA's compilation of the lowered step; torch.compile's.
    flops: float | None = None  # JAX: the compiled step's FLOPs, all devices (XLA's cost analysis).


def _num_steps(steps: int | None, warm_step_s: float, min_time_s: float) -> int:
    """`steps`, or enough steps for `min_time_s` at the warm-up step's pace (at least MIN_STEPS)."""
    if steps is not None:
        return steps
    return max(MIN_STEPS, math.ceil(min_time_s / max(warm_step_s, 1e-6)))


def _time_steps(step: Callable[[], None], sync: Callable[[], None], steps, min_time_s):
    """One warm-up step, then N steps back to back synced once at the end (N = `steps`, or
    enough for `min_time_s` at the warm-up pace). Returns (seconds per step, N, faults per step)."""
    start = time.perf_counter()
    step()
    sync()
    n = _num_steps(steps, time.perf_counter() - start, min_time_s)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    step_s = (time.perf_counter() - start) / n
    return step_s, n, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / n


def step_flops(compiled, devices: int) -> float | None:
    """FLOPs of one call of a compiled SPMD step over its `devices` (XLA's cost analysis counts a
    multiply-add as 2 FLOPs, per device), or None where the backend reports none."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    return None if flops is None or flops <= 0 else float(flops) * devices


# Dense peak TFLOP/s of the chips the benchmark has met (NVIDIA's datasheets, SXM parts unless
# named): bf16 and TF32 on the tensor cores, fp32 on the CUDA cores. Matched against
# `device_kind` in order, the first hit wins; an NVL part (another clock and power) has no entry.
PEAK_TFLOPS = (
    ("NVL", None),
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)


def peak_tflops(device_kind: str) -> dict[str, float] | None:
    """The chip's peaks (`PEAK_TFLOPS`), or None for a chip (or CPU) not listed.

    >>> peak_tflops("NVIDIA H100 80GB HBM3")["bf16"], peak_tflops("NVIDIA H100 NVL")
    (989.4, None)
    """
    return next((peaks for name, peaks in PEAK_TFLOPS if name in device_kind), None)


def time_jax(runner: Runner, steps: int | None, min_time_s: float, devices: int = 1) -> Timing:
    """Trace and compile ahead (timed apart), the first call, then `_time_steps`. The first call
    reuses the executable compiled ahead."""
    state = runner.make_state()
    start = time.perf_counter()
    lowered = runner.fn.lower(state, *runner.args)
    trace_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    held = [runner.fn(state, *runner.args)]  # [(state, metrics)]; the step donates the state.
    jax.block_until_ready(held)
    first_call_s = time.perf_counter() - start

    def step():
        held[0] = runner.fn(held[0][0], *runner.args)

    step_s, n, faults = _time_steps(step, lambda: jax.block_until_ready(held), steps, min_time_s)
    flops = step_flops(compiled, devices)
    return Timing(
        step_s, first_call_s, n, faults, trace_s=trace_s, compile_s=compile_s, flops=flops
    )


# A torch.compile'd step compiles in its first calls: the loss's graphs in the first, the
# optimizer's again in the second (its state is created there), and inductor's CPU kernels settle
# over the next ones (measured: 12 s, 2.8 s, 1.5 s, 1.3 s, then 0.08 s a step).
COMPILED_WARMUP_CALLS = 5


def time_torch(
    step: Callable, args: tuple, steps: int | None, min_time_s: float, warmup_calls: int = 1
) -> Timing:
    """The same protocol for a PyTorch step. The eager step's first call has no compilation; a
    compiled one's first `warmup_calls` calls compile it: their time less as many steady steps
    is its `compile_s`."""
    from benchmarks.torch_reference import synchronize  # pylint: disable=g-import-not-at-top

    start = time.perf_counter()
    step(*args)
    synchronize()
    first_call_s = time.perf_counter() - start
    for _ in range(warmup_calls - 1):
        step(*args)
    synchronize()
    warmup_s = time.perf_counter() - start
    step_s, n, faults = _time_steps(lambda: step(*args), synchronize, steps, min_time_s)
    compile_s = max(warmup_s - warmup_calls * step_s, 0.0) if warmup_calls > 1 else None
    return Timing(step_s, first_call_s, n, faults, compile_s=compile_s)


def _host_batches(batch_size: int, mesh, examples: int):
    """The loop's host batches (`loader.train_batches`) over a CIFAR-sized in-memory uint8 set."""
    images = np.random.default_rng(0).integers(0, 256, (examples, 32, 32, 3), dtype=np.uint8)
    split = loader.ArrayExamples(images, np.zeros(examples, np.int32))
    rows = parallel.process_rows(mesh, batch_size)
    return loader.train_batches(split, batch_size, seed=0, epoch=0, rows=rows)


def host_batch_ms(batch_size: int, mesh, repeats: int = 20, examples: int = 50_000) -> float:
    """Host time to assemble one training batch as the loop does: gather a shuffled batch of a
    CIFAR-sized training set and place it on the mesh (what the prefetch thread does)."""
    batches = _host_batches(batch_size, mesh, examples)
    jax.block_until_ready(parallel.to_global(next(batches), mesh))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(parallel.to_global(next(batches), mesh))
    return (time.perf_counter() - start) / repeats * 1e3


def pipeline_img_per_s(runner: Runner, mesh, batch_size: int, steps: int) -> float:
    """img/s of `runner` fed as train_loop feeds it: loader batches prefetched to the mesh by
    the background thread (`parallel.prefetch_to_mesh`, 2 in flight). Single-batch steps only."""
    host = _host_batches(batch_size, mesh, max(batch_size * (steps + 2), 4096))
    device_batches = parallel.prefetch_to_mesh(host, mesh, 2)
    state, _ = runner.fn(runner.make_state(), next(device_batches), *runner.args[1:])
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, _ = runner.fn(state, next(device_batches), *runner.args[1:])
    jax.block_until_ready(state)
    return steps * batch_size / (time.perf_counter() - start)


def build_torch_case(
    case: str, dtype: str, compile_backend: str | None = None, mode: str | None = None
) -> dict[str, Callable]:
    """The PyTorch twin of `case`'s runners (same names): eager, or compiled with
    `compile_backend` in `mode` (`torch_reference.compiler`)."""
    from benchmarks import torch_reference as ref  # pylint: disable=g-import-not-at-top

    kwargs = {"bf16": dtype == "bfloat16", "compile_backend": compile_backend, "mode": mode}
    if case.startswith("teacher_"):
        name = case.removeprefix("teacher_")
        return {"step": ref.make_teacher_step(name, NUM_CLASSES, **kwargs)}
    pair = next(p for p in PAIRS if f"_{p}" in case)
    teacher_name, student_name = PAIRS[pair]
    if case.startswith("search_"):
        return ref.make_search_steps(
            teacher_name, student_name, SEARCH_GROUP, NUM_CLASSES, **kwargs
        )
    label = case.rsplit("_", 1)[1]
    gamma_fd = 1e-4 if pair.startswith("shufflenet") else 1e-3
    return {
        "step": ref.make_distill_step(
            teacher_name, student_name, label, NUM_CLASSES, gamma_fd=gamma_fd, **kwargs
        )
    }


def _torch_args(case: str, batch_size: int) -> tuple:
    import torch  # pylint: disable=g-import-not-at-top

    from benchmarks.torch_reference import DEVICE  # pylint: disable=g-import-not-at-top

    def tensors(seed):
        b = random_batch(batch_size, seed)
        return (
            torch.from_numpy(b["image"]).to(DEVICE),
            torch.from_numpy(b["label"]).long().to(DEVICE),
        )

    return tensors(0) + (tensors(1) if case.startswith("search_") else ())


# ------------------------------------------------------------------------------------------------
# One case, the report
# ------------------------------------------------------------------------------------------------


def _reset_torch_peak() -> None:
    import torch  # pylint: disable=g-import-not-at-top

    _reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _torch_in_use_mb() -> float:
    import torch  # pylint: disable=g-import-not-at-top

    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    return _rss_mb()


def _torch_peak_mb() -> float:
    """PyTorch's peak since `_reset_torch_peak`: the GPU's allocated bytes, else the RSS."""
    import torch  # pylint: disable=g-import-not-at-top

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return _peak_rss_mb()


def _significant(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _best(timings: list[Timing]) -> Timing:
    """The least disturbed of repeated timings (the fastest): other load only slows a step."""
    return min(timings, key=lambda t: t.step_s)


def _spread(timings: list[Timing]) -> float:
    """Slowest over fastest of repeated timings: near 1 on a quiet machine."""
    steps = [t.step_s for t in timings]
    return round(max(steps) / min(steps), 3)


def run_case(
    case: str,
    mesh,
    batch_size: int,
    dtype: str,
    steps: int | None = None,
    min_time_s: float = 20.0,
    with_torch: bool = False,
    pipeline: bool = False,
    host_ms: float | None = None,
    repeats: int = 1,
    cohort_mode: str = "auto",
    torch_compile: str | None = None,
    torch_compile_mode: str | None = None,
) -> dict:
    """Times `case` (and its PyTorch twins) and returns its JSON record (KEYS and extras).

    `torch_compile`: also time the twin compiled with that `torch.compile` backend ('inductor')
    in `torch_compile_mode`, after the eager one (implies `with_torch`); its first calls, which
    compile, are reported apart (`torch_compile_s`) from its steps.
    With `repeats` > 1 the JAX and PyTorch timings alternate that many times and each keeps its
    fastest, so a burst of other load on the machine hits both sides alike and is filtered out.
    """
    with_torch = with_torch or torch_compile is not None
    gc.collect()
    _reset_peak_rss()
    # On the CPU the peak resident set holds the process's baseline (Python, the libraries, what
    # earlier cases left): what each side adds to what was in use before it was built compares.
    base_mb = _in_use_mb()
    runners = build_case(case, mesh, batch_size, dtype, cohort_mode)
    devices = len(mesh.devices.flat)
    jax_runs = {name: [time_jax(r, steps, min_time_s, devices)] for name, r in runners.items()}
    first = jax_runs["step"][0]  # Later first calls hit the compilation cache.
    peak_mem_mb = _peak_mem_mb()
    torch_runs, torch_peak_mb = {}, None
    compiled_runs, compiled_peak_mb = {}, None
    # No PyTorch twin of a cohort.
    with_torch = with_torch and not case.startswith(("cohort_", "mixed_"))
    if with_torch:
        import torch  # pylint: disable=g-import-not-at-top

        torch.manual_seed(0)
        _reset_torch_peak()
        torch_base_mb = _torch_in_use_mb()
        torch_steps = build_torch_case(case, dtype)
        args = _torch_args(case, batch_size)
    for rep in range(repeats):
        if rep:
            for name, r in runners.items():
                jax_runs[name].append(time_jax(r, steps, min_time_s, devices))
        if with_torch:
            # The same number of timed steps as the JAX side.
            for name, fn in torch_steps.items():
                n = jax_runs[name][0].steps
                torch_runs.setdefault(name, []).append(time_torch(fn, args, n, min_time_s))
            if rep == 0:
                torch_peak_mb = _torch_peak_mb()
        if with_torch and torch_compile is not None:
            if rep == 0:
                torch_steps = None  # Its memory out of the compiled twin's peak.
                gc.collect()
                _reset_torch_peak()
                compiled_base_mb = _torch_in_use_mb()
                torch.manual_seed(0)
                compiled_steps = build_torch_case(case, dtype, torch_compile, torch_compile_mode)
            for name, fn in compiled_steps.items():
                n = jax_runs[name][0].steps
                compiled_runs.setdefault(name, []).append(
                    time_torch(fn, args, n, min_time_s, COMPILED_WARMUP_CALLS)
                )
            if rep == 0:
                compiled_peak_mb = _torch_peak_mb()
                if repeats > 1:
                    torch.manual_seed(0)
                    torch_steps = build_torch_case(case, dtype)
    timings = {name: _best(runs) for name, runs in jax_runs.items()}
    main = timings["step"]
    record: dict[str, Any] = {
        "case": case,
        "backend": jax.default_backend(),
        "devices": len(mesh.devices.flat),
        "batch": batch_size,
        "dtype": dtype,
        "img_per_s": round(batch_size / main.step_s, 2),
        "compile_s": round(first.compile_s, 2),
        "trace_s": round(first.trace_s, 2),
        "first_call_s": round(first.first_call_s, 2),
        "peak_mem_mb": round(peak_mem_mb, 1),
        "added_mem_mb": round(peak_mem_mb - base_mb, 1),
        "torch_img_per_s": None,
        "ratio": None,
        "step_ms": round(main.step_s * 1e3, 1),
        "steps": main.steps,
        "repeats": repeats,
        "step_ms_spread": _spread(jax_runs["step"]),
        "traces": len(runners["step"].traces),
        "page_faults_per_step": round(main.faults_per_step),
    }
    if first.flops is not None:
        # How close to the hardware: the step's FLOPs at its measured pace, against the chip's
        # peaks (a bigger batch or a cohort of students fills what is left).
        record["gflop_per_step"] = _significant(first.flops / 1e9)
        record["achieved_tflop_s"] = _significant(first.flops / main.step_s / 1e12)
        peaks = peak_tflops(jax.devices()[0].device_kind)
        for precision, peak in (peaks or {}).items():
            record[f"peak_fraction_{precision}"] = _significant(
                first.flops / main.step_s / 1e12 / (peak * devices)
            )
    # Each student's own one-student step: a cohort's K students the same one, a mixed case's
    # one per method.
    if "single" in timings:
        alone_s = [timings["single"].step_s] * int(case.rsplit("_k", 1)[1])
        record["single_step_ms"] = round(timings["single"].step_s * 1e3, 1)
    else:
        by_label = {
            name.removeprefix("single/"): t.step_s
            for name, t in timings.items()
            if name.startswith("single/")
        }
        alone_s = list(by_label.values())
        if by_label:
            record["single_step_ms"] = {k: round(v * 1e3, 1) for k, v in by_label.items()}
    if alone_s:
        # Images trained per second summed over the students, and their own steps' time summed
        # over the one shared step's.
        record["students"] = len(alone_s)
        record["mode"] = distill_lib.cohort_mode(case_config(case, batch_size, dtype, cohort_mode))
        record["img_per_s"] = round(len(alone_s) * batch_size / main.step_s, 2)
        record["speedup"] = round(sum(alone_s) / main.step_s, 3)
    if "w_step" in timings:
        parts_s = timings["w_step"].step_s + timings["beta_step"].step_s
        record["w_step_img_per_s"] = round(batch_size / timings["w_step"].step_s, 2)
        record["beta_step_img_per_s"] = round(batch_size / timings["beta_step"].step_s, 2)
        record["parts_img_per_s"] = round(batch_size / parts_s, 2)
        record["overhead_ratio"] = round(main.step_s / parts_s, 3)
    if host_ms is not None:
        host_batches = 2 if case.startswith("search_") else 1
        record["host_batch_ms"] = round(host_ms * host_batches, 2)
        record["input_share"] = round(host_ms * host_batches / (main.step_s * 1e3), 4)
    if pipeline and not case.startswith("search_"):
        record["pipeline_img_per_s"] = round(
            pipeline_img_per_s(runners["step"], mesh, batch_size, max(main.steps, MIN_STEPS)), 2
        )
    if with_torch:
        t_timings = {name: _best(runs) for name, runs in torch_runs.items()}
        record["torch_img_per_s"] = round(batch_size / t_timings["step"].step_s, 2)
        record["ratio"] = round(record["img_per_s"] / record["torch_img_per_s"], 3)
        record["torch_peak_mem_mb"] = round(torch_peak_mb, 1)
        record["torch_added_mem_mb"] = round(torch_peak_mb - torch_base_mb, 1)
        record["torch_step_ms_spread"] = _spread(torch_runs["step"])
        if "w_step" in t_timings:
            parts_s = t_timings["w_step"].step_s + t_timings["beta_step"].step_s
            record["torch_overhead_ratio"] = round(t_timings["step"].step_s / parts_s, 3)
        del torch_steps
    if compiled_runs:
        c_timings = {name: _best(runs) for name, runs in compiled_runs.items()}
        record["torch_compile_backend"] = torch_compile
        record["torch_compile_img_per_s"] = round(batch_size / c_timings["step"].step_s, 2)
        record["ratio_compile"] = round(record["img_per_s"] / record["torch_compile_img_per_s"], 3)
        # The first calls compile every graph of the step (the loss's forward and backward, the
        # optimizer's, its recompilation once its state exists): their time beyond steady steps.
        record["torch_compile_s"] = round(compiled_runs["step"][0].compile_s, 2)
        record["torch_compile_first_call_s"] = round(compiled_runs["step"][0].first_call_s, 2)
        record["torch_compile_peak_mem_mb"] = round(compiled_peak_mb, 1)
        record["torch_compile_added_mem_mb"] = round(compiled_peak_mb - compiled_base_mb, 1)
        del compiled_steps
    del runners
    gc.collect()
    return record


def markdown_table(records: list[dict]) -> str:
    """The records as a markdown table (one row per case)."""
    cols = [
        ("case", "case"),
        ("img_per_s", "JAX img/s"),
        ("torch_img_per_s", "PyTorch img/s"),
        ("ratio", "JAX/PyTorch"),
        ("torch_compile_img_per_s", "torch.compile img/s"),
        ("ratio_compile", "JAX/compiled"),
        ("torch_compile_s", "torch.compile (s)"),
        ("compile_s", "compile (s)"),
        ("achieved_tflop_s", "TFLOP/s"),
        ("peak_fraction_bf16", "of bf16 peak"),
        ("peak_fraction_tf32", "of TF32 peak"),
        ("peak_fraction_fp32", "of fp32 peak"),
        ("peak_mem_mb", "peak RSS (MiB)"),
        ("added_mem_mb", "JAX adds (MiB)"),
        ("torch_added_mem_mb", "PyTorch adds (MiB)"),
        ("step_ms_spread", "spread"),
        ("overhead_ratio", "step/(w+beta)"),
        ("input_share", "host batch / step"),
        ("speedup", "cohort speedup"),
    ]
    lines = [
        "| " + " | ".join(title for _, title in cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in records:
        cells = ["-" if r.get(key) is None else str(r[key]) for key, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_CASES)}")
    parser.add_argument("--torch", action="store_true", help="also time the PyTorch reference")
    parser.add_argument(
        "--torch-compile",
        action="store_true",
        help="also time the PyTorch reference under torch.compile (inductor); implies --torch",
    )
    parser.add_argument(
        "--torch-compile-mode",
        default=None,
        help="torch.compile's mode for --torch-compile (default; 'max-autotune', ...)",
    )
    parser.add_argument("--batch", type=int, default=128, help="global batch size")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--matmul-precision",
        default="tensorfloat32",
        choices=config_lib.MATMUL_PRECISIONS,
        help="float32 convolutions' precision, as config.matmul_precision (a run's default)",
    )
    parser.add_argument("--cases", default=None, help=f"comma-separated subset of {CASES}")
    parser.add_argument(
        "--devices", type=int, default=0, help="JAX CPU devices (0: one per core, as main.py)"
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: adaptive)")
    parser.add_argument(
        "--min-time", type=float, default=None, help="adaptive: seconds per timing (20; quick 5)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="alternate JAX and PyTorch timings this many times, keep each side's fastest (one"
        " timing is at the mercy of other load: a busy 2-core machine swung a ratio 6x)",
    )
    parser.add_argument(
        "--pipeline", action="store_true", help="also time the steps fed by the prefetching loader"
    )
    parser.add_argument(
        "--cohort-mode",
        default="auto",
        choices=("auto", "loop", "vmap"),
        help="cohort_* cases: how the students share the step (distill.cohort)",
    )
    parser.add_argument(
        "--malloc",
        default="tuned",
        choices=("tuned", "default"),
        help="'tuned': glibc keeps freed pages (parallel.keep_freed_host_memory); 'default': glibc as it comes",
    )
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    # Before JAX or PyTorch start any thread (glibc binds threads to arenas as they first malloc).
    malloc_tuned = parallel.keep_freed_host_memory() if args.malloc == "tuned" else False
    parallel.configure_cpu_devices(args.devices)
    cases = args.cases.split(",") if args.cases else list(QUICK_CASES if args.quick else CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        sys.exit(f"unknown cases {unknown}; valid: {', '.join(CASES)}")
    min_time_s = args.min_time if args.min_time is not None else (5.0 if args.quick else 20.0)
    torch_version = None
    args.torch = args.torch or args.torch_compile
    if args.torch:
        import torch  # pylint: disable=g-import-not-at-top

        torch.set_num_threads(os.cpu_count() or 1)
        torch_version = torch.__version__ + (" (cuda)" if torch.cuda.is_available() else " (cpu)")
    mesh = parallel.make_mesh()
    print(f"# cpu: {cpu_model()} ({os.cpu_count()} cores)")
    if jax.default_backend() != "cpu":
        print(f"# accelerator: {jax.devices()[0].device_kind}")
    load = os.getloadavg()[0]
    print(
        f"# jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} devices),"
        f" torch {torch_version}, malloc tuned: {malloc_tuned},"
        f" load average at start: {load:.2f}, repeats: {args.repeats}",
        flush=True,
    )
    if load > 0.5 * (os.cpu_count() or 1):
        print(
            f"# warning: the machine is busy (load {load:.2f} on {os.cpu_count()} cores): other"
            " work slows PyTorch's threads and XLA's unequally, so ratios measured now are not"
            " the machine's; see each case's step_ms_spread",
            flush=True,
        )
    host_ms = host_batch_ms(args.batch, mesh)
    records = []
    for case in cases:
        with parallel.matmul_precision(args.matmul_precision):  # As a run's steps compute.
            record = run_case(
                case,
                mesh,
                args.batch,
                args.dtype,
                steps=args.steps,
                min_time_s=min_time_s,
                with_torch=args.torch,
                pipeline=args.pipeline,
                host_ms=host_ms,
                repeats=args.repeats,
                cohort_mode=args.cohort_mode,
                torch_compile="inductor" if args.torch_compile else None,
                torch_compile_mode=args.torch_compile_mode,
            )
        record["load_avg_1m"] = round(os.getloadavg()[0], 2)
        records.append(record)
        print(json.dumps(record), flush=True)
    print()
    print(markdown_table(records))
    return records


if __name__ == "__main__":
    main()
