"""The one training loop every stage shares: iterate, log, evaluate, checkpoint, guard, resume.

A stage (teacher, search, distill) hands the loop a `Stage`: its jitted step, its step-0 state, its
data and its evaluation. The loop owns everything else, identically for every stage:
- epochs of seeded batches (the same seed and epoch give the same batches), prefetched to the mesh;
- no host round-trip inside the step loop: metrics stay on device and are fetched every
  `log_every_steps` (also where the non-finite guard looks at them);
- the test-split evaluation at each epoch end, best and last accuracy;
- TensorBoard scalars, `metrics.jsonl`, progress lines with images/s and ETA;
- orbax checkpoints every `checkpoint_every_steps` and at the end, and resuming from the latest one,
  so re-running the same command continues exactly where the last run stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging

from dfa_jax import checkpointing
from dfa_jax import errors
from dfa_jax import files
from dfa_jax import parallel
from dfa_jax import preemption
from dfa_jax import scalar_writer
from dfa_jax.data import loader

RESULT_FILE = "result.json"
# Steps dispatched ahead of the last finished one: enough to keep the devices busy.
MAX_STEPS_IN_FLIGHT = 2


class NonFiniteError(errors.InputError):
    """A loss or gradient became NaN/inf; the message names the stage, the step and what to do
    (`python -m dfa_jax.main` prints it as one line)."""


@dataclasses.dataclass
class Stage:
    """What a stage gives the loop."""

    name: str  # 'teacher' | 'search' | 'distill' (used in messages and metric names).
    directory: str  # WORKDIR/<name>: checkpoints, TensorBoard events, metrics.jsonl, result.json.
    state: Any  # Step-0 bilevel.TrainState, replicated on the mesh (replaced when resuming).
    step_fn: Callable  # Jitted `step(state, batch, val_batch, aux) -> (state, metrics)`.
    # `state -> {'accuracy': float, 'loss': float}` on the test split; None: no evaluation.
    eval_fn: Callable[[Any], dict] | None
    # The training split as every process indexes it (labels [N], images read on demand).
    train_data: loader.Examples
    epochs: int
    batch_size: int  # Global batch size.
    seed: int
    # beta's batches (search); None otherwise.
    val_data: loader.Examples | None = None
    aux: Any = None  # Passed to every step un-donated (the frozen teacher's variables).
    lr_fn: Callable[[int], Any] | None = None  # For the 'lr' scalar.
    # `(state, epoch) -> scalars` logged with the epoch's evaluation, e.g. alpha.
    epoch_end_fn: Callable[[Any, int], dict] | None = None
    # `state -> fields | None` after the last step, before result.json marks the stage done
    # (exports that a done stage must have); the fields it returns join its result.json.
    finalize_fn: Callable[[Any], dict | None] | None = None
    # `(state, epoch) -> None` when an epoch's test accuracy beats every earlier epoch's (the
    # first of equals wins), before that epoch's checkpoint, so a resumed run never misses one.
    best_fn: Callable[[Any, int], None] | None = None
    # Steps of the stages that follow this one in the same progress (the search's later
    # groups): the ETA counts them at this stage's speed.
    steps_after: int = 0
    # Steps of the same data stream the stages before this one drew (the search's earlier
    # groups): its batches continue that stream, new shuffles as one data loader's over the
    # whole search would be, not the first group's again.
    data_steps_before: int = 0
    # What `eval_fn` measures, in the progress lines ('test accuracy of ...').
    eval_label: str = "test accuracy"
    # A cohort stage: the students of a stacked state (`cohort.py`), in the order of its student
    # axis, or of several methods' stacks (each member's hooks and `metrics_fn` pick its own).
    # Each member gets its own records and result; the stage's directory holds the one
    # checkpoint of them all, and `eval_fn`, `best_fn`, `epoch_end_fn` and `finalize_fn` above
    # are the members' own instead.
    members: tuple["Member", ...] = ()


@dataclasses.dataclass
class Member:
    """One student of a cohort stage: its name in messages, where its records go, its hooks
    (each given the whole stacked state; the member picks its student)."""

    name: str  # e.g. 'distill/dfa/seed1'
    directory: str  # result.json, metrics.jsonl, TensorBoard events.
    eval_fn: Callable[[Any], dict] | None = None
    best_fn: Callable[[Any, int], None] | None = None
    epoch_end_fn: Callable[[Any, int], dict] | None = None
    finalize_fn: Callable[[Any], dict | None] | None = None
    # Its scalars out of one step's metrics (on device or fetched); None: entry k of each metric,
    # k its place among the members (one method's stacked [K] metrics).
    metrics_fn: Callable[[Any], dict] | None = None


def parameter_summary(params) -> str:
    """'N parameters', with the student's share where the stage trains helpers too; `params` may
    be a tuple of several methods' (`cohort.Mixed`)."""

    def count(tree) -> int:
        return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))

    trees = params if isinstance(params, tuple) else (params,)
    total = count(trees)
    student = sum(count(tree["student"]) for tree in trees if "student" in tree)
    if student in (0, total):
        return f"{total:,} parameters"
    return f"{total:,} parameters (student {student:,}, connectors and helpers {total - student:,})"


def is_done(directory: str) -> bool:
    """Whether the stage in `directory` finished: its result.json exists and reads (one that
    does not, e.g. emptied by a host crash on a file system that lost the write, is not done:
    the stage resumes from its last checkpoint and writes it again)."""
    path = os.path.join(directory, RESULT_FILE)
    if not files.exists(path):
        return False
    try:
        return isinstance(files.read_json(path), dict)
    except (OSError, ValueError):
        logging.warning("%s cannot be read: the stage is taken as unfinished", path)
        return False


def read_result(directory: str) -> dict:
    return files.read_json(os.path.join(directory, RESULT_FILE))


def rate_fields(stage_name: str) -> str:
    """The config fields whose values a non-finite loss in stage `stage_name` points at."""
    if stage_name == "teacher":
        return "teacher.optim.lr"
    if stage_name.startswith("search/"):
        return "search.w_lr or search.beta_lr (or search.gamma_st / gamma_ts)"
    if stage_name == "distill/ft/paraphraser":
        return "baselines.ft_pretrain_lr"
    if stage_name == "distill/ab/init":
        return "baselines.ab_init_lr"
    return "distill.optim.lr or the method's loss weight (distill.gamma_fd, baselines.*_weight)"


class _MetricsFile:
    """`metrics.jsonl`, one JSON object per line; on resume, rows after the checkpoint are dropped
    so that the file reads as if the run had never been interrupted.

    The whole file is rewritten atomically at each write (object stores cannot append; a few
    thousand rows per stage keep that cheap), so a killed run never leaves a torn line. In a
    bucket rows are written as `files.WriteSchedule` allows, and always before a checkpoint and
    at the end: a killed run loses only rows after its last checkpoint, which its resumed run
    logs again.
    """

    def __init__(self, path: str, resume_step: int):
        self._path = path
        self._enabled = jax.process_index() == 0
        self._schedule = files.WriteSchedule(path)
        self._lines: list[str] = []
        self._unwritten = False
        if self._enabled and files.exists(path):
            self._lines = [
                line + "\n"
                for line in files.read_text(path).splitlines()
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]

    def write(self, row: dict) -> None:
        if self._enabled:
            self._lines.append(json.dumps(row, sort_keys=True) + "\n")
            self._unwritten = True
            if self._schedule.due():
                self.flush()

    def flush(self) -> None:
        """Writes the rows not yet on disk (before a checkpoint, and at the end)."""
        if self._enabled and self._unwritten:
            files.write_text_atomic(self._path, "".join(self._lines))
            self._unwritten = False
            self._schedule.written()


def _batches(
    examples: loader.Examples, batch_size: int, seed: int, start_step: int, rows: slice
) -> Iterator[dict]:
    """Endless seeded batches (this process's `rows` of each) from `start_step` on."""
    steps_per_epoch = loader.steps_per_epoch(len(examples.labels), batch_size)
    epoch = start_step // steps_per_epoch
    start_batch = start_step % steps_per_epoch
    while True:
        yield from loader.train_batches(examples, batch_size, seed, epoch, start_batch, rows)
        epoch, start_batch = epoch + 1, 0


def _mean_metrics(fetched: list[dict]) -> dict:
    """Per key, the mean over a logging interval's steps, in float64 and in step order.

    The steps' float32 values widen to float64 exactly, so an interval whose first steps were
    saved in a checkpoint (as Python floats) and whose others were fetched after the resume
    averages to the same number as the interval of an uninterrupted run.
    """
    # Keys every step has: rows a checkpoint kept from an older step function may hold metrics
    # the resumed one no longer logs (or miss new ones), for that one interval.
    keys = [k for k in fetched[0] if k != "finite" and all(k in m for m in fetched[1:])]
    return {
        k: float(np.mean(np.array([float(m[k]) for m in fetched], dtype=np.float64))) for k in keys
    }


def run(stage: Stage, config, mesh) -> dict:
    """Trains `stage` to its last epoch (resuming if it has checkpoints) and returns its result.

    The result (also written to `stage.directory/result.json`, which marks the stage as done) has
    `best_accuracy`, `best_epoch`, `last_accuracy`, `epochs`, `steps`, `wall_time_s`. A cohort
    stage (`stage.members`) writes one such result, metrics.jsonl and TensorBoard file per member
    in the member's directory and returns `{'members': {name: result}, 'state': ...}`.
    """
    files.makedirs(stage.directory)
    try:
        steps_per_epoch = loader.steps_per_epoch(len(stage.train_data.labels), stage.batch_size)
    except ValueError as e:
        raise ValueError(f"stage {stage.name!r}: {e}") from None
    total_steps = steps_per_epoch * stage.epochs
    stacked = bool(stage.members)
    members = stage.members or (
        Member(
            stage.name,
            stage.directory,
            stage.eval_fn,
            stage.best_fn,
            stage.epoch_end_fn,
            stage.finalize_fn,
        ),
    )

    ckpt = checkpointing.Checkpointer(
        os.path.join(stage.directory, "checkpoints"), config.checkpoints_to_keep
    )
    state = stage.state
    meta = {
        "step": 0,
        "history": {m.name: [] for m in members} if stacked else [],
        "wall_time_s": 0.0,
    }
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(state)
        logging.info(
            "[%s] resuming from step %d/%d (%s)",
            stage.name,
            meta["step"],
            total_steps,
            ckpt.directory,
        )
    step = int(meta["step"])
    # Per member, its epoch rows (a one-member stage keeps its checkpoints' plain list).
    histories: dict[str, list[dict]] = (
        {m.name: list(meta["history"][m.name]) for m in members}
        if stacked
        else {members[0].name: list(meta["history"])}
    )
    # Metrics of steps not logged yet when a stop request checkpointed mid-interval: the next log
    # row averages them with the steps after the resume, as an uninterrupted run does.
    pending: list[tuple[int, dict]] = [(s, m) for s, m in meta.get("pending", [])]
    wall_before = float(meta["wall_time_s"])

    # TensorBoard only: the progress line below is the human-readable log.
    writers = {}
    metrics_files = {}
    for member in members:
        if stacked:  # A one-member stage's directory is the stage's, made above.
            files.makedirs(member.directory)
        if jax.process_index() == 0:
            # Steps after the checkpoint, logged by a run killed since, are logged again below.
            scalar_writer.truncate(member.directory, step)
            writers[member.name] = scalar_writer.ScalarWriter(member.directory)
        else:
            writers[member.name] = scalar_writer.NullWriter()
        metrics_files[member.name] = _MetricsFile(
            os.path.join(member.directory, "metrics.jsonl"), step
        )

    def of_member(metrics, k: int) -> dict:
        """Member k's scalars of one step's (fetched) metrics."""
        if not stacked:
            return metrics
        if members[k].metrics_fn is not None:
            return members[k].metrics_fn(metrics)
        return {key: v[k] for key, v in metrics.items()}

    rows = parallel.process_rows(mesh, stage.batch_size)
    data_step = stage.data_steps_before + step
    train_iter = _batches(stage.train_data, stage.batch_size, stage.seed, data_step, rows)
    if stage.val_data is not None:
        val_iter = _batches(stage.val_data, stage.batch_size, stage.seed + 1, data_step, rows)
        pairs = ({"train": t, "val": v} for t, v in zip(train_iter, val_iter))
    else:
        pairs = ({"train": t} for t in train_iter)

    remaining = (next(pairs) for _ in range(total_steps - step))
    device_batches = parallel.prefetch_to_mesh(remaining, mesh, config.data.prefetch)
    run_start = time.time()
    interval_start, interval_steps = time.time(), 0
    epoch_end_s = 0.0  # How long the last epoch's end (evaluation, records) took, for the ETA.
    first_step = step
    trains = f" for {len(members)} students" if stacked else ""
    logging.info("[%s] %s%s", stage.name, parameter_summary(state.params), trains)

    def fetch_and_guard() -> list[dict]:
        """Fetches pending metrics (the one host sync) and stops on a non-finite one."""
        fetched = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, fetched):
            for k, member in enumerate(members):
                mine = of_member(m, k)
                if not bool(mine["finite"]):
                    saved = ckpt.latest_step()
                    where = (
                        f"the last checkpoint before it (step {saved}) is in {ckpt.directory}"
                        if saved is not None
                        else "no checkpoint was saved before it"
                    )
                    others = [m.name for m in members if m is not member]
                    together = (
                        f" The students trained in its step ({', '.join(others)}) stopped with"
                        " it: to train them, leave it out of this command (distill.method and"
                        " distill.compare_with may change in a workdir)."
                        if others
                        else ""
                    )
                    raise NonFiniteError(
                        f"stage {member.name!r}: non-finite loss or gradient at step {s} (epoch"
                        f" {(s - 1) // steps_per_epoch + 1}): loss={mine['loss']},"
                        f" grad_norm={mine['grad_norm']}; {where}. Lower"
                        f" {rate_fields(member.name)} or check the input data; a changed rate or"
                        " weight is another config: run it in"
                        " another --workdir (with --config.teacher.checkpoint=<this workdir>"
                        " to keep a finished teacher), or pass --config.restart=True to move"
                        f" this run aside.{together}"
                    )
        return fetched

    def flush():
        """Logs the mean of the pending metrics (train scalars, metrics.jsonl, progress line)."""
        nonlocal interval_start, interval_steps
        if not pending:
            return
        fetched = fetch_and_guard()
        last_step = pending[-1][0]
        shared = {}
        if stage.lr_fn is not None:
            shared["train/lr"] = float(stage.lr_fn(last_step - 1))
        if interval_steps:
            steps_per_s = interval_steps / max(time.time() - interval_start, 1e-9)
            shared["train/images_per_s"] = steps_per_s * stage.batch_size
            eta = (total_steps - last_step + stage.steps_after) / max(steps_per_s, 1e-9)
            # The epoch ends still to come (that of `last_step` included: it runs after this
            # row) cost what the last one did.
            eta += (stage.epochs - (last_step - 1) // steps_per_epoch) * epoch_end_s
            speed = f"{shared['train/images_per_s']:.1f} img/s | ETA {_format_seconds(eta)}"
        else:  # Only the compiling first step since the last row: no speed to report yet.
            speed = "compiled"
        losses = []
        for k, member in enumerate(members):
            mean = _mean_metrics([of_member(m, k) for m in fetched])
            scalars = {f"train/{key}": v for key, v in mean.items()}
            scalars.update(shared)  # After the means: the keys' order of a one-member stage.
            writers[member.name].write_scalars(last_step, scalars)
            # On disk at once, as metrics.jsonl: a killed run loses no row it logged.
            writers[member.name].flush()
            metrics_files[member.name].write({"step": last_step, **scalars})
            losses.append(scalars["train/loss"])
        logging.info(
            "[%s] step %d/%d epoch %d/%d loss %s | %s",
            stage.name,
            last_step,
            total_steps,
            (last_step - 1) // steps_per_epoch + 1,
            stage.epochs,
            " ".join(f"{loss:.4f}" for loss in losses),
            speed,
        )
        pending.clear()
        interval_start, interval_steps = time.time(), 0

    def save(unlogged: list | None = None):
        meta_now = {
            "step": step,
            "history": histories if stacked else histories[members[0].name],
            "wall_time_s": wall_before + time.time() - run_start,
        }
        if unlogged:
            meta_now["pending"] = unlogged
        for metrics_file in metrics_files.values():
            metrics_file.flush()  # The rows up to a checkpoint are on disk with it.
        for writer in writers.values():
            writer.flush(force=True)  # And in TensorBoard's files (a bucket's are throttled).
        ckpt.save(step, state, meta_now)

    def end_epoch(epoch: int) -> None:
        """Each member's test evaluation, best-epoch export and records at an epoch's end."""
        for member in members:
            history = histories[member.name]
            evaluation = member.eval_fn(state) if member.eval_fn is not None else {}
            row = {
                "epoch": epoch,
                "step": step,
                **{f"test/{k}": v for k, v in evaluation.items()},
            }
            if member.epoch_end_fn is not None:
                row.update(member.epoch_end_fn(state, epoch))
            history.append(row)
            accuracy = evaluation.get("accuracy")
            if (
                member.best_fn is not None
                and accuracy is not None
                and all(accuracy > h["test/accuracy"] for h in history[:-1])
            ):
                member.best_fn(state, epoch)
            writers[member.name].write_scalars(
                step,
                {
                    k: v
                    for k, v in row.items()
                    if k not in ("epoch", "step") and isinstance(v, float)
                },
            )
            writers[member.name].flush()
            metrics_files[member.name].write(row)
            metrics_files[member.name].flush()  # Epoch rows are read back (the search's alpha).
            if "accuracy" in evaluation:
                logging.info(
                    "[%s] epoch %d/%d %s %.4f (best %.4f)",
                    member.name,
                    epoch,
                    stage.epochs,
                    stage.eval_label,
                    evaluation["accuracy"],
                    max(h["test/accuracy"] for h in history),
                )

    try:
        for batches in device_batches:
            state, metrics = stage.step_fn(state, batches["train"], batches.get("val"), stage.aux)
            step += 1
            if step == first_step + 1:
                # This call compiled the step: images/s and ETA time the steps after it.
                jax.block_until_ready(metrics)
                interval_start, interval_steps = time.time(), 0
            else:
                interval_steps += 1
            pending.append((step, metrics))
            if len(pending) > MAX_STEPS_IN_FLIGHT:
                # Bound the dispatch queue: waits for an older step to finish (no transfer), so
                # that at most a few steps' inputs and programs are in flight on the devices.
                jax.block_until_ready(pending[-MAX_STEPS_IN_FLIGHT - 1][1])
            epoch_end = step % steps_per_epoch == 0
            wants_checkpoint = step % config.checkpoint_every_steps == 0
            if step % config.log_every_steps == 0 or wants_checkpoint or epoch_end:
                flush()  # The guard runs before any save: no checkpoint holds a non-finite state.
            if epoch_end:
                started = time.time()
                end_epoch(step // steps_per_epoch)
                epoch_end_s = time.time() - started
                interval_start, interval_steps = time.time(), 0  # Keep evaluation out of images/s.
            # Saved after the epoch-end evaluation so a resumed run never skips one.
            if wants_checkpoint or step == total_steps:
                save()
                # Nor the save's blocking part (the interval is empty: a save follows a row).
                interval_start = time.time()
            if preemption.should_stop() and step < total_steps:
                # The guard runs before the save; the unlogged metrics go into the checkpoint.
                fetched = fetch_and_guard() if pending else []
                unlogged = [
                    (s, jax.tree.map(lambda v: np.asarray(v).tolist(), m))
                    for (s, _), m in zip(pending, fetched)
                ]
                if not wants_checkpoint:
                    save(unlogged)
                ckpt.wait()
                raise preemption.Stopped(
                    preemption.requested_by(), stage.name, step, total_steps, ckpt.directory
                )
    finally:
        ckpt.wait()
        for writer in writers.values():
            writer.close()
        for metrics_file in metrics_files.values():
            metrics_file.flush()

    # What each member's finalize returns joins its result (a rerun after a kill before the
    # result was written restores the final checkpoint and finalizes again).
    extra = {m.name: (m.finalize_fn(state) if m.finalize_fn else None) or {} for m in members}
    # One wall time for the stage: a cohort's students all took it (each export counted).
    wall_time_s = wall_before + time.time() - run_start
    results = {}
    for member in members:
        history = histories[member.name]
        result = {"stage": member.name}
        if member.eval_fn is not None:
            best = max(history, key=lambda h: h["test/accuracy"])
            result |= {
                "best_accuracy": best["test/accuracy"],
                "best_epoch": best["epoch"],
                "last_accuracy": history[-1]["test/accuracy"],
            }
        result |= {
            "epochs": stage.epochs,
            "steps": total_steps,
            "wall_time_s": wall_time_s,
            **extra[member.name],
        }
        files.write_json_atomic(os.path.join(member.directory, RESULT_FILE), result)
        results[member.name] = result
    # Process 0 alone writes them, and every process reads them next (the distillation's
    # students, a later stage's `is_done`): none may go on before they are there (on a bucket
    # a write takes seconds; the others failed with FileNotFoundError after a finished run).
    parallel.sync(f"{stage.name}: results written")
    ckpt.close()
    if stacked:
        return {"members": results, "state": state}
    return results[members[0].name] | {"state": state}


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
