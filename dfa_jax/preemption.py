"""Stop requests: SIGTERM (TPU/SLURM preemption, `kill`) or SIGINT (Ctrl-C) end a run cleanly.

`install()` (done by `main.py`) turns the first such signal into a request; the loop finishes the
step in flight, writes a checkpoint and raises `Stopped`, and `main.py` exits non-zero with a line
saying how to resume. A second Ctrl-C interrupts at once (the last checkpoint still resumes).

Several processes must stop at the same step, or the checkpoint's collectives would wait for a
process that has left: there JAX's preemption service (started by `jax.distributed.initialize`,
listening for SIGTERM) agrees on the step, and SIGINT is turned into a SIGTERM to ourselves.
"""

from __future__ import annotations

import os
import signal

import jax
from jax.experimental import multihost_utils

_requested: str | None = None  # Name of the signal that asked us to stop.
_steps_seen = 0  # Steps run by this process, all stages: the preemption service's step ids.
# Several processes: whether they agreed on a step to stop at. It stays so: when that step is a
# stage's last, which the loop finishes without stopping, the next stage's first step stops (the
# service agrees on one step only, so asking it again would never stop).
_agreed = False


class Stopped(Exception):
    """The run stopped on request after checkpointing; re-running the same command resumes."""

    def __init__(self, signal_name: str, stage: str, step: int, total_steps: int, directory: str):
        super().__init__(
            f"stopped by {signal_name} in stage {stage!r} at step {step}/{total_steps}; a"
            f" checkpoint of that step is in {directory}. Run the same command again to resume."
        )
        self.signal_name = signal_name
        self.exit_code = 128 + getattr(signal, signal_name, signal.SIGTERM).value


def _acknowledge(name: str) -> None:
    """One line at once (a step, or a compile, may take a while before the stop shows)."""
    again = "; Ctrl-C again stops at once" if name == "SIGINT" else ""
    os.write(2, f"{name}: stopping after the step in flight, with a checkpoint{again}\n".encode())


def _on_signal(signum, frame):
    del frame
    global _requested
    name = signal.Signals(signum).name
    if _requested is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt  # A second Ctrl-C: stop now.
    if _requested is None:
        _acknowledge(name)
    _requested = name


def _forward_sigint_as_sigterm(signum, frame):
    del signum, frame
    global _requested
    if _requested is not None:
        raise KeyboardInterrupt
    _requested = "SIGINT"
    _acknowledge("SIGINT")
    os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service listens for SIGTERM.


def install() -> None:
    """Routes SIGTERM and SIGINT to a stop request (call from the main thread, after JAX's
    multi-process set-up)."""
    if jax.process_count() > 1:
        signal.signal(signal.SIGINT, _forward_sigint_as_sigterm)
    else:
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)


def request(signal_name: str = "SIGTERM") -> None:
    """Asks the running loop to stop as a signal would (tests, embedding code)."""
    global _requested
    _requested = signal_name


def clear() -> None:
    global _requested, _agreed
    _requested, _agreed = None, False


def should_stop() -> bool:
    """Called once per step by every process: whether to checkpoint and stop after this step."""
    global _steps_seen, _agreed, _requested
    _steps_seen += 1
    if jax.process_count() > 1:
        if _agreed or multihost_utils.reached_preemption_sync_point(_steps_seen):
            _agreed = True
            _requested = _requested or "SIGTERM"
            return True
        return False
    return _requested is not None


def pending() -> str | None:
    """The signal that asked for a stop not yet taken (None: none asked)."""
    return _requested


def requested_by() -> str:
    return _requested or "SIGTERM"
