"""Data parallelism: one `('data',)` mesh over every device of every process, replicated state,
sharded batches, device prefetch, and the multi-process set-up.

We `jax.jit` over a `Mesh` rather than `pmap`: since JAX 0.8 `pmap` is in maintenance mode and is
itself `jit(shard_map)`. Under `jit` the batch axis is sharded over 'data' and XLA inserts the
collectives, so BatchNorm sees global-batch statistics with no `axis_name` plumbing.

Several processes (TPU pod hosts, one process per GPU under SLURM, N processes on loopback) run
the same program: `initialize_distributed` first, then the same mesh spans all their devices;
each process feeds its rows of every global batch (`process_rows`) and
`jax.make_array_from_process_local_data` assembles them.
"""

from __future__ import annotations

import ctypes
import contextlib
import functools
import glob
import os
import queue
import threading
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dfa_jax import errors

DATA_AXIS = "data"


def keep_freed_host_memory() -> bool:
    """Keeps freed memory in glibc's heap instead of returning it to the kernel.

    XLA:CPU allocates every step's large buffers afresh; glibc serves blocks over 32 MiB (and any
    block of a thread's secondary arena that outgrows it) with mmap and unmaps them on free, so
    each step pays a page fault per 4 KiB it touches again: ~100k faults and ~20 % of a WRN-16-2
    CPU step on a 2-core virtual machine (BENCHMARKS.md). One arena, no mmap, no trimming: the
    pages stay mapped and the process's footprint stays at its peak. Call before JAX starts its
    threads (glibc binds a thread to an arena at its first allocation). Returns False where
    glibc's `mallopt` is unavailable (another C library), changing nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_max, m_arena_max = -1, -2, -4, -8
    ok = libc.mallopt(m_arena_max, 1) and libc.mallopt(m_mmap_max, 0)
    ok = ok and libc.mallopt(m_trim_threshold, 2**31 - 1) and libc.mallopt(m_top_pad, 64 << 20)
    return bool(ok)


# The global batch sizes that must divide by the device count (validate checks each of them,
# whichever stages run; evaluation pads its last batch, so data.eval_batch_size is free).
BATCH_SIZE_FIELDS = ("teacher.optim.batch_size", "distill.optim.batch_size", "search.batch_size")


def global_batch_sizes(config) -> dict[str, int]:
    """`{field: value}` of `BATCH_SIZE_FIELDS` in `config`."""
    sizes = {}
    for field in BATCH_SIZE_FIELDS:
        node = config
        for name in field.split("."):
            node = node[name]
        sizes[field] = node
    return sizes


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity (what taskset, a cgroup cpuset or SLURM's
    --cpus-per-task leave it; `os.cpu_count()` counts the machine's), capped by a container's
    CPU quota (`docker --cpus=2`, a Kubernetes CPU limit) where the cgroup sets one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # Not Linux.
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, quota) if quota else cores)


# Where a container's CPU quota is read: (quota file, period file or None if the quota file
# holds both). cgroup v2: "QUOTA PERIOD" or "max PERIOD"; v1: a quota of -1 is none.
CGROUP_CPU_FILES = (
    ("/sys/fs/cgroup/cpu.max", None),
    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
)


def _cgroup_cpu_quota() -> int | None:
    """The CPUs a cgroup's quota allows, rounded up (None: no quota, or no cgroup files)."""
    for quota_file, period_file in CGROUP_CPU_FILES:
        try:
            with open(quota_file) as f:
                fields = f.read().split()
            if period_file is not None:
                with open(period_file) as f:
                    fields += f.read().split()
            quota, period = int(fields[0]), int(fields[1])
        except (OSError, ValueError, IndexError):  # Absent, or "max": no quota.
            continue
        if quota > 0 and period > 0:
            return -(-quota // period)
        return None
    return None


def cpu_device_count(
    num_cpu_devices: int,
    batch_sizes: dict[str, int],
    processes: int = 1,
    cores: int | None = None,
) -> tuple[int, str]:
    """The JAX devices to split this process's CPU into, and a line to log ('' if none).

    A positive `num_cpu_devices` is taken as given. 0 means one device per usable core
    (`usable_cores()`, or `cores`), unless a batch size does not divide by that many devices
    over the `processes` of the run: then the largest count below it that divides every batch
    size, with a line saying why (a 12-core host gets 8 devices for batches of 64). When no
    count does (the process count alone does not divide a batch), 1: validate then names the
    batch size and the process count.
    """
    if isinstance(num_cpu_devices, int) and num_cpu_devices > 0:
        return num_cpu_devices, ""  # (Another value is validate's to refuse: the default here.)
    cores = usable_cores() if cores is None else max(1, cores)
    sizes = {f: b for f, b in batch_sizes.items() if isinstance(b, int) and b > 0}
    fitting = (
        c for c in range(cores, 0, -1) if all(b % (c * processes) == 0 for b in sizes.values())
    )
    count = next(fitting, None)
    if count is None:
        return 1, ""
    if count == cores:
        return count, ""
    listed = ", ".join(f"{f} = {b}" for f, b in sizes.items())
    times = f" x {processes} processes" if processes > 1 else ""
    return count, (
        f"num_cpu_devices = 0: using {count} CPU devices, not one per usable core ({cores}):"
        f" {count}{times} is the most that divides every batch size ({listed})."
        f" --config.num_cpu_devices=N sets another count (every batch size must divide by"
        f" N{times})."
    )


def configure_cpu_devices(
    num_cpu_devices: int, batch_sizes: dict[str, int] | None = None, processes: int = 1
) -> str:
    """Splits a CPU-only host into several JAX devices (call before JAX initialises a backend,
    after `initialize_distributed`): `cpu_device_count(num_cpu_devices, batch_sizes,
    processes)` of them. Returns that function's line to log ('' if none); log it only where
    JAX runs on the CPU.

    One device per core measured 1.2-1.6x faster than one device for WRN steps on a 2-core host:
    XLA:CPU keeps only ~1.5 cores busy on a single device. No effect on GPU/TPU hosts.
    """
    count, note = cpu_device_count(num_cpu_devices, batch_sizes or {}, processes)
    jax.config.update("jax_num_cpu_devices", count)
    # The CPU devices meet in in-process collectives (the global BatchNorm statistics, the gradient
    # sum). XLA aborts the process when one of them waits more than 40 s for the others, which an
    # oversubscribed host (another job on the same cores) reaches; a long run should wait instead.
    if "xla_cpu_collective_call_terminate_timeout_seconds" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_cpu_collective_call_terminate_timeout_seconds=3600"
        ).strip()
    return note


def device_count_hint(num_cpu_devices: int, batch_sizes: dict[str, int]) -> str:
    """Where JAX runs on the CPU and a batch size does not divide by the device count: a line
    saying how `num_cpu_devices` set that count and what to pass instead ('' otherwise)."""
    if not isinstance(num_cpu_devices, int) or jax.default_backend() != "cpu":
        return ""
    devices, processes = jax.device_count(), jax.process_count()
    sizes = {f: b for f, b in batch_sizes.items() if isinstance(b, int) and b > 0}
    if all(b % devices == 0 for b in sizes.values()):
        return ""
    if processes == 1:
        if num_cpu_devices <= 0:
            return ""  # Not set up by `configure_cpu_devices` (a library caller's devices).
        cores = usable_cores()
        fits, _ = cpu_device_count(0, sizes, cores=cores)
        return (
            f"num_cpu_devices = {num_cpu_devices} splits this host into these {devices} devices:"
            f" pass --config.num_cpu_devices={fits} (the most devices, up to its {cores} usable"
            " cores, that divide every batch size; 0 picks it) rather than changing the batch"
            " sizes, which changes the recipe."
        )
    per_process = num_cpu_devices if num_cpu_devices > 0 else jax.local_device_count()
    made = (
        f"num_cpu_devices = {num_cpu_devices} gives each of the {processes} processes"
        f" {per_process} of these {devices} devices"
    )
    if any(b % processes for b in sizes.values()):
        return (
            f"{made}; no count fits: with {processes} processes every batch size must be a"
            f" multiple of {processes} (or run fewer processes)."
        )
    # Several processes may share a host's cores: the most that fit up to the count given.
    fits, _ = cpu_device_count(0, sizes, processes, cores=per_process)
    return (
        f"{made}: pass --config.num_cpu_devices={fits} ({processes} x {fits} devices divide every"
        " batch size) rather than changing the batch sizes, which changes the recipe."
    )


def joined_processes() -> int:
    """The processes of the run `initialize_distributed` joined (1 if none), known before any
    backend starts (`jax.process_count()` would start one, fixing the CPU device count)."""
    if not jax.distributed.is_initialized():
        return 1
    try:  # JAX's own record of the run it joined (not public API: 1 if it moves).
        from jax._src import distributed  # pylint: disable=g-import-not-at-top
    except ImportError:
        return 1
    state = getattr(distributed, "global_state", None)
    return int(getattr(state, "num_processes", None) or 1)


def use_compilation_cache(directory: str) -> None:
    """Keeps compiled steps on disk, so a resumed or repeated run skips XLA's compile (seconds to
    a minute per step on CPU, tens of seconds on a GPU). Call before the first compile.

    `directory` ('~' expanded; '' = off) is used unless JAX_COMPILATION_CACHE_DIR is set, which
    JAX reads itself and which wins. Entries are keyed by the program, the backend and the JAX
    version, so one directory serves every run, method and stage on a host.
    """
    if directory and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins this process to a multi-process run (call before any other JAX call).

    With no arguments JAX detects the cluster itself (TPU pod VMs, SLURM tasks, Open MPI); the
    explicit form is how `launch/local.sh --processes N` starts N processes on one host. CPU
    processes reach each other through gloo collectives (JAX's default on CPU).
    """
    if coordinator_address is not None:
        # JAX waits minutes for every process to join and then names neither: say what it waits
        # for, so a wrong address or a process that never started shows on the console.
        logging.info(
            "joining a run of %s processes through %s as process %s (JAX waits up to 5 min for"
            " them all)",
            num_processes,
            coordinator_address,
            process_id,
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        # Given explicitly, the run is the one named: inside a SLURM allocation (`srun --pty
        # bash`, then local.sh) JAX's detection would still read SLURM's variables and keep
        # each process to one local GPU, whatever CUDA_VISIBLE_DEVICES gave it.
        **({"cluster_detection_method": "deactivate"} if coordinator_address else {}),
    )


# Device files by which a machine's accelerators are seen without asking JAX (which sees only
# what its jaxlib supports): NVIDIA GPUs, AMD GPUs (ROCm's kernel driver), TPU chips (v2-v4 as
# /dev/accel*, v5e and later through VFIO).
ACCELERATOR_DEVICE_FILES = {
    "NVIDIA GPU": ("/dev/nvidia[0-9]*",),
    "AMD GPU": ("/dev/kfd",),
    "TPU": ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*"),
}
# The setup.py extras that bring JAX's own build for each kind (none for ROCm: JAX's docs).
ACCELERATOR_EXTRAS = {"NVIDIA GPU": ("cuda12", "cuda13"), "AMD GPU": (), "TPU": ("tpu",)}


def visible_accelerators() -> dict[str, list[str]]:
    """Kind -> device files of the accelerators this machine has, whatever JAX runs on."""
    found = {}
    for kind, patterns in ACCELERATOR_DEVICE_FILES.items():
        paths = sorted(p for pattern in patterns for p in glob.glob(pattern))
        if paths:
            found[kind] = paths
    return found


def check_accelerators_used(allow_cpu: bool) -> None:
    """Raises InputError when the machine has a GPU or TPU but JAX runs on the CPU.

    A CPU-only jaxlib (what `pip install -e .` brings) on a GPU machine would otherwise train for
    days where hours were expected, with one warning buried in the log. `allow_cpu` (the
    `--allow_cpu` flag), or JAX_PLATFORMS=cpu set on purpose, goes on anyway.
    """
    if allow_cpu or jax.default_backend() != "cpu":
        return
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return
    found = visible_accelerators()
    if not found:
        return
    kind, paths = next(iter(found.items()))
    extras = " or ".join(f"`pip install -e '.[{e}]'`" for e in ACCELERATOR_EXTRAS[kind])
    if extras:
        install = f"install JAX's {kind} build with {extras} (the README's install table)"
    else:
        install = f"install a jaxlib with {kind} support (JAX's installation guide)"
    raise errors.InputError(
        f"this machine has a {kind} ({', '.join(paths[:4])}) but JAX runs on the CPU: its jaxlib"
        f" has no {kind} support. {install}, or pass --allow_cpu to train on the CPU anyway."
    )


def sync(tag: str) -> None:
    """Waits until every process reaches this point (no-op for one process).

    Used after process 0 writes a file that the others read next (alpha.json).
    """
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(tag)


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all devices of all processes (or `devices`), axis 'data'.

    Built with `Mesh` directly: `jax.make_mesh` defaults to Explicit axes, under which slicing a
    sharded batch raises a ShardingTypeError.
    """
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def matmul_precision(name: str):
    """A context in which traced float32 convolutions and matmuls take `name`'s precision
    (`config.matmul_precision`: 'tensorfloat32', 'float32', or 'default', the backend's own)."""
    if name == "default":
        return contextlib.nullcontext()
    return jax.default_matmul_precision(name)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def init_replicated(module, seed: int, mesh: Mesh, *shapes, **kwargs) -> dict:
    """`module.init` (a Flax module) on float32 zeros of `shapes`, straight into replicated
    device memory: its variables, e.g. {'params': ..., 'batch_stats': ...}."""
    key = (tuple(map(tuple, shapes)), tuple(sorted(kwargs.items())))
    return _jitted_init(module, mesh, *key)(jax.random.key(seed))


# One traced init per (module, mesh, input shapes, options) in a process: every seed of a cohort,
# every group's helper and every stage that builds the same network reuses it (tracing a model's
# init takes seconds on a CPU). Flax modules are frozen dataclasses: hashable, equal by fields.
@functools.lru_cache(maxsize=64)
def _jitted_init(module, mesh: Mesh, shapes: tuple, kwargs: tuple):
    def init(key):
        # The inputs are made inside the traced function: a cached closure over arrays made at
        # the first call would hold tracers when that call is itself traced (`jax.eval_shape`).
        return module.init(key, *[jnp.zeros(s, jnp.float32) for s in shapes], **dict(kwargs))

    return jax.jit(init, out_shardings=replicated(mesh))


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def process_rows(mesh: Mesh, global_batch_size: int) -> slice:
    """The contiguous rows of a global batch that this process's devices hold on `mesh`.

    validate() checks that batch sizes divide by the device count; with the mesh's devices in
    `jax.devices()` order each process holds one contiguous block (checked here).
    """
    index_map = batch_sharded(mesh).addressable_devices_indices_map((global_batch_size,))
    bounds = sorted(s[0].indices(global_batch_size)[:2] for s in index_map.values())
    start, stop = bounds[0][0], bounds[-1][1]
    covered = sum(b - a for a, b in {tuple(b) for b in bounds})
    if covered != stop - start:
        raise ValueError(
            f"this process's devices hold non-contiguous rows {bounds} of the batch; build the"
            " mesh from jax.devices() in order"
        )
    return slice(start, stop)


def jit_step(step, mesh: Mesh):
    """Jits a `step(state, batch, val_batch, aux)`: the state donated and kept replicated, the
    teacher (`aux`) an ordinary, never-donated argument."""
    return jax.jit(step, donate_argnums=0, out_shardings=(replicated(mesh), None))


def to_global(batch: dict, mesh: Mesh) -> dict:
    """Assembles per-process numpy batches (`process_rows` of each array) into global arrays
    sharded along 'data'."""
    sharding = batch_sharded(mesh)
    # Each device holds as many rows, so a process's share is its devices' share of the mesh
    # (processes may hold different numbers of devices).
    devices = mesh.devices.size
    mine = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            sharding, x, (x.shape[0] * devices // mine, *x.shape[1:])
        ),
        batch,
    )


def prefetch_to_mesh(batches: Iterable[dict], mesh: Mesh, size: int) -> Iterator[dict]:
    """Yields `batches` as global device arrays, keeping up to `size` of them in flight.

    A background thread gathers the next host batches and issues their host-to-device copies while
    the current step runs; an exception in it is re-raised here. `size` <= 0 disables prefetching.
    """
    if size <= 0:
        for batch in batches:
            yield to_global(batch, mesh)
        return
    buffer: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    end = object()

    def produce():
        try:
            for batch in batches:
                if stop.is_set():
                    return
                buffer.put(to_global(batch, mesh))
            buffer.put(end)
        except BaseException as e:  # pylint: disable=broad-except
            buffer.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # The consumer stopped early (end of run, error): let the producer exit.
        stop.set()
        while thread.is_alive():
            try:
                buffer.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.01)
