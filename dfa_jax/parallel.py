"""Data parallelism: one `('data',)` mesh, replicated state, sharded batches, device prefetch.

We `jax.jit` over a `Mesh` rather than `pmap`: since JAX 0.8 `pmap` is in maintenance mode and is
itself `jit(shard_map)`. Under `jit` the batch axis is sharded over 'data' and XLA inserts the
collectives, so BatchNorm sees global-batch statistics with no `axis_name` plumbing.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def configure_cpu_devices(num_cpu_devices: int) -> None:
    """Splits a CPU-only host into several JAX devices (call before JAX initialises a backend).

    One device per core measured 1.2-1.6x faster than one device for WRN steps on a 2-core host:
    XLA:CPU keeps only ~1.5 cores busy on a single device. No effect on GPU/TPU hosts.
    """
    count = num_cpu_devices or os.cpu_count() or 1
    jax.config.update("jax_num_cpu_devices", count)
    # The CPU devices meet in in-process collectives (the global BatchNorm statistics, the gradient
    # sum). XLA aborts the process when one of them waits more than 40 s for the others, which an
    # oversubscribed host (another job on the same cores) reaches; a long run should wait instead.
    if "xla_cpu_collective_call_terminate_timeout_seconds" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + " --xla_cpu_collective_call_terminate_timeout_seconds=3600"
        ).strip()


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all devices of all processes (or `devices`), axis 'data'.

    Built with `Mesh` directly: `jax.make_mesh` defaults to Explicit axes, under which slicing a
    sharded batch raises a ShardingTypeError.
    """
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def local_batch_size(global_batch_size: int) -> int:
    """This process's share of a global batch (validate() checks divisibility by device count)."""
    return global_batch_size // jax.process_count()


def jit_step(step, mesh: Mesh):
    """Jits a `step(state, batch, val_batch, aux)`: the state donated and kept replicated, the
    teacher (`aux`) an ordinary, never-donated argument."""
    return jax.jit(step, donate_argnums=0, out_shardings=(replicated(mesh), None))


def to_global(batch: dict, mesh: Mesh) -> dict:
    """Assembles per-process numpy batches into global arrays sharded along 'data'."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


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
