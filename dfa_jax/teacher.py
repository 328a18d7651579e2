"""Stage 0: train the teacher with cross-entropy (the paper's recipe), or load a trained one.

Training uses the shared bilevel step with no beta at all and the shared loop. The teacher's
variables (params and BatchNorm statistics) are exported on their own, in the format
`config.teacher.checkpoint` loads: `WORKDIR/teacher/best_variables` at each epoch whose test
accuracy is a new best, `WORKDIR/teacher/variables` after the last step. The search and the
distillation use the one `config.teacher.distill_from` names ('best', as the authors did, or
'last').
"""

from __future__ import annotations

import contextlib
import os
import shutil

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from dfa_jax import bilevel
from dfa_jax import checkpointing
from dfa_jax import errors
from dfa_jax import evaluation
from dfa_jax import files
from dfa_jax import inputs
from dfa_jax import models
from dfa_jax import optimizers
from dfa_jax import parallel
from dfa_jax import train_loop
from dfa_jax.data import loader

VARIABLES_DIR = "variables"  # The last epoch's.
BEST_VARIABLES_DIR = "best_variables"  # The epoch of highest test accuracy (the first of equals).
# What orbax writes at the top of every checkpoint directory (the second: without the first, a
# checkpoint of an older orbax).
VARIABLES_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA")
# The suffixes of a file that holds a PyTorch or safetensors checkpoint, not dfa_jax variables.
_CONVERTIBLE_SUFFIXES = (".pth", ".pt", ".tar", ".ckpt", ".bin", ".safetensors")


def build_model(name: str, num_classes: int, dtype: str):
    return models.get_model(name, num_classes, dtype=jnp.dtype(dtype))


def init_variables(model, seed: int, mesh, image_size: int = 32):
    """Initialises `model` directly into replicated device memory (abstract init -> jitted init)."""
    shape = (1, image_size, image_size, 3)
    variables = parallel.init_replicated(model, seed, mesh, shape, train=False)
    return {"params": variables["params"], "batch_stats": variables["batch_stats"]}


def cross_entropy_loss_fn(model):
    """The teacher's (and the no-distillation student's) w loss: plain cross-entropy."""

    def loss_fn(params, batch_stats, beta, batch, rng, aux):
        del beta, rng, aux
        logits, mutated = model.apply(
            {"params": params, "batch_stats": batch_stats},
            batch["image"],
            train=True,
            mutable=["batch_stats"],
        )
        logits = logits.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, (mutated["batch_stats"], {"accuracy": accuracy})

    return loss_fn


def resolve_checkpoint(path: str, field: str = "teacher.checkpoint", best: bool = False) -> str:
    """Accepts a variables directory, a teacher stage directory or a whole workdir; of a stage,
    its best-epoch variables where `best` and it has them, else its last epoch's.

    Raises `CheckpointError` (naming `field`, the config field that gave `path`) when none of
    them holds saved variables.
    """
    names = (BEST_VARIABLES_DIR, VARIABLES_DIR) if best else (VARIABLES_DIR,)
    for candidate in (
        path,
        *(os.path.join(path, name) for name in names),
        *(os.path.join(path, "teacher", name) for name in names),
    ):
        if is_variables_dir(candidate):
            return files.absolute(candidate)
    fix = (
        "give the workdir of a finished teacher run (or its teacher/variables), or unset"
        f" {field} to train a teacher"
    )
    if not files.exists(path):
        raise errors.CheckpointError(f"{field} = {path!r} does not exist; {fix}.")
    if epath.Path(path).is_file():
        # The natural mistake with a PyTorch teacher: its checkpoint file itself.
        what = "a file, not a directory of teacher variables"
        if path.endswith(_CONVERTIBLE_SUFFIXES) or _starts_like_a_checkpoint(path):
            what = "a PyTorch or safetensors checkpoint file, not dfa_jax teacher variables"
        raise errors.CheckpointError(
            f"{field} = {path!r} is {what}. Convert a PyTorch teacher first: python -m"
            f" dfa_jax.interop import --model MODEL --num-classes N {path} OUT (MODEL its"
            " architecture, e.g. wrn_40_2; N its classes), then set"
            f" --config.{field}=OUT --config.teacher.model=MODEL."
        )
    if os.path.basename(os.path.normpath(path)) == "checkpoints" or files.exists(
        os.path.join(path, "checkpoints")
    ):
        raise errors.CheckpointError(
            f"{field} = {path!r} holds training checkpoints, not the teacher's exported variables"
            f" (a teacher stage writes teacher/variables when it finishes); {fix}."
        )
    if files.exists(os.path.join(path, "teacher", "checkpoints")):
        raise errors.CheckpointError(
            f"{field} = {path!r}: its teacher stage has not finished (training checkpoints, no"
            " exported variables yet); let that run finish (or resume it with its own command),"
            f" or unset {field} to train a teacher here."
        )
    raise errors.CheckpointError(f"{field} = {path!r} holds no teacher variables; {fix}.")


def _handed_on(path: str, best: bool, named: str) -> str:
    """The variables of the teacher at `path` that the later stages get (`resolve_checkpoint`),
    warning where `best` found no best epoch's (a teacher stage of an older version): its last
    epoch's. `named` says what `path` is, for the warning."""
    source = resolve_checkpoint(path, best=best)
    if best and os.path.basename(source) == VARIABLES_DIR and source != files.absolute(path):
        logging.warning(
            "%s has no %s (a teacher stage of an older version): using its last epoch's"
            " variables, %s",
            named,
            BEST_VARIABLES_DIR,
            source,
        )
    return source


def is_variables_dir(path: str) -> bool:
    """Whether `path` is a directory of saved variables (orbax's markers at its top)."""
    return any(files.exists(os.path.join(path, marker)) for marker in VARIABLES_MARKERS)


def _starts_like_a_checkpoint(path: str) -> bool:
    """Whether the file at `path` starts as torch.save's zip or pickle, or a safetensors file."""
    try:
        with epath.Path(path).open("rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return head.startswith((b"PK\x03\x04", b"\x80")) or head[8:9] == b"{"


def check_checkpoint(
    path: str,
    model,
    *,
    field: str = "teacher.checkpoint",
    description: str = "this run's teacher",
    num_classes: int | None = None,
    image_size: int = 32,
) -> str:
    """Checks from metadata alone (nothing restored, nothing compiled) that `path` holds
    `{'params', 'batch_stats'}` of exactly `model`'s shapes; returns the variables directory.

    Raises `CheckpointError` naming `field`, the directory and the first mismatching arrays with
    their saved and expected shapes (another architecture, or a classifier for another number
    of classes, given as `num_classes`, the dataset's).
    """
    directory = resolve_checkpoint(path, field)
    try:
        with ocp.StandardCheckpointer() as reader:
            metadata = reader.metadata(directory)
        tree = getattr(metadata, "item_metadata", metadata)
        saved = checkpointing.flat_shapes(getattr(tree, "tree", tree))
    except Exception as e:  # noqa: BLE001  # Orbax raises many kinds for a foreign dir.
        raise errors.CheckpointError(
            f"{field} = {path!r}: cannot read the saved variables in {directory} ({e}); give the"
            " workdir of a finished teacher run (or its teacher/variables)."
        ) from None
    if not any(name.startswith("params/") for name in saved):
        raise errors.CheckpointError(
            f"{field} = {path!r} holds no teacher params (a training checkpoint?); give the"
            " workdir of a finished teacher run (or its teacher/variables)."
        )

    def init():
        x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        variables = model.init(jax.random.key(0), x, train=False)
        return {"params": variables["params"], "batch_stats": variables["batch_stats"]}

    expected = checkpointing.flat_shapes(jax.eval_shape(init))
    order = sorted(expected, key=lambda n: (not n.startswith("params/"), n))  # params first.
    differ = [n for n in order if n in saved and saved[n] != expected[n]]
    missing = [n for n in order if n not in saved]
    extra = sorted((n for n in saved if n not in expected), key=lambda n: (n[:7] != "params/", n))
    if not (differ or missing or extra):
        return directory
    lines = [f"{n}: saved {saved[n]}, expected {expected[n]}" for n in differ[:5]]
    lines += [f"{n}: expected {expected[n]}, not in the checkpoint" for n in missing[:3]]
    lines += [f"{n}: saved {saved[n]}, not in the model" for n in extra[:3]]
    count = len(differ) + len(missing) + len(extra)
    fix = (
        "give a teacher trained with this teacher.model and data.dataset, or set them to what"
        " the checkpoint was trained with"
    )
    # Only the classifier differs, in its class axis: a teacher of another dataset.
    classes = {saved[n][-1] if saved[n] else None for n in differ}
    if (
        num_classes is not None
        and differ
        and not (missing or extra)
        and len(classes) == 1
        and all(expected[n][-1:] == (num_classes,) for n in differ)
    ):
        fix = (
            f"its classifier has {classes.pop()} classes but the dataset has {num_classes}:"
            " give a teacher trained on this data.dataset, or set data.dataset to the teacher's"
        )
    where = "" if files.absolute(path) == directory else f" (read from {directory})"
    raise errors.CheckpointError(
        f"{field} = {path!r}{where} does not fit {description}: {count} array(s) disagree (the"
        f" checkpoint has {len(saved)}, the model {len(expected)}), first:\n  "
        + "\n  ".join(lines)
        + f"\n{fix}."
    )


def save_variables(directory: str, variables) -> None:
    """Writes `{'params', 'batch_stats'}` to `directory`, atomically: an existing `directory`
    is replaced only once the new variables are complete, so a failed save (a full disk, a
    kill while writing) leaves the old ones in place; a kill between the two renames leaves
    them at `.NAME.replaced`, where the next save to `directory` takes them back first.

    On a local disk the variables are written to a sibling directory, then swapped in with two
    renames. An object store cannot rename a directory: there orbax replaces `directory` (its
    `force`), which deletes the old variables before writing the new ones.
    """
    path = files.absolute(directory)
    # Closed on the way out: an open checkpointer keeps its background threads.
    with ocp.StandardCheckpointer() as checkpointer:
        _write_variables(checkpointer, path, variables)


def _write_variables(checkpointer, path: str, variables) -> None:
    """`save_variables`' writes and renames, with `checkpointer` and the absolute `path`."""
    if files.is_remote(path):
        checkpointer.save(path, variables, force=True)
        checkpointer.wait_until_finished()
        return
    # Names every process of a run agrees on (orbax writes one directory from all of them), and
    # leftovers of a save killed before, removed first: orbax refuses an existing target.
    parent, name = os.path.split(path)
    new, old = os.path.join(parent, f".{name}.saving"), os.path.join(parent, f".{name}.replaced")
    primary = jax.process_index() == 0
    if primary:
        if not os.path.lexists(path) and is_variables_dir(old):
            os.rename(old, path)  # A save killed between its two renames: the old ones back.
        _remove_leftovers(new, old)
    parallel.sync(f"save_variables {path}: leftovers removed")
    try:
        checkpointer.save(new, variables)
        checkpointer.wait_until_finished()
    except BaseException as e:
        # Orbax's background thread may still create its temporary directory after the error:
        # wait for it before cleaning up.
        with contextlib.suppress(Exception):
            checkpointer.wait_until_finished()
        if primary:
            _remove_leftovers(new)
        if isinstance(e, Exception) and checkpointing.is_storage_error(e):
            reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            raise errors.WorkdirError(
                f"writing the variables {path} failed ({reason}); the ones there before, if"
                " any, are kept. Free disk space or fix the permissions, then run the same"
                " command again."
            ) from e
        raise
    if primary:
        if os.path.lexists(path):
            os.rename(path, old)
        try:
            os.rename(new, path)
        except BaseException:
            if os.path.lexists(old) and not os.path.lexists(path):
                os.rename(old, path)  # The old variables back under their name.
            raise
        _remove_leftovers(old)
    parallel.sync(f"save_variables {path}: swapped in")


def _remove_leftovers(*paths: str) -> None:
    """Removes each of `paths` and what orbax writes beside it (`PATH.orbax-checkpoint-tmp*`)."""
    for path in paths:
        parent, name = os.path.split(path)
        for entry in os.listdir(parent) if os.path.isdir(parent) else []:
            if entry == name or entry.startswith(f"{name}.orbax-checkpoint-tmp"):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def load_variables(path: str, model, mesh, field: str = "teacher.checkpoint"):
    """Restores teacher variables saved by `save_variables`, replicated on `mesh`.

    The saved shapes are checked against `model` first (`check_checkpoint`), so a checkpoint
    of another architecture or class count fails with the differing arrays listed.
    """
    directory = check_checkpoint(path, model, field=field)
    like = jax.eval_shape(lambda: init_variables(model, 0, mesh))
    sharding = parallel.replicated(mesh)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), like
    )
    with ocp.StandardCheckpointer() as reader:
        return reader.restore(directory, abstract)


def build_stage(
    config, mesh, data: inputs.RunData, directory: str, model=None, eval_fn=None
) -> train_loop.Stage:
    """The teacher stage as the loop runs it (initial state, jitted cross-entropy step, schedule,
    exports), built without reading or writing a file. `model` and `eval_fn` default to the
    config's teacher and its test-split evaluation."""
    model = model or build_model(config.teacher.model, data.info.num_classes, config.dtype)
    if eval_fn is None:
        eval_fn = evaluation.make_model_eval_fn(model, config, data, mesh)
    optim = config.teacher.optim
    steps_per_epoch = max(loader.steps_per_epoch(len(data.train.labels), optim.batch_size), 1)
    tx = optimizers.sgd(optim, steps_per_epoch)
    variables = init_variables(model, config.seed, mesh)
    state = jax.jit(
        lambda v: bilevel.create_state(v["params"], v["batch_stats"], tx),
        out_shardings=parallel.replicated(mesh),
    )(variables)
    step = bilevel.make_bilevel_step(
        cross_entropy_loss_fn(model),
        tx,
        seed=config.seed,
        preprocess_fn=inputs.make_train_preprocess(config.data, data.info),
    )

    def export(name):
        return lambda s, *_: save_variables(
            os.path.join(directory, name), {"params": s.params, "batch_stats": s.batch_stats}
        )

    return train_loop.Stage(
        name="teacher",
        directory=directory,
        state=state,
        step_fn=parallel.jit_step(step, mesh),
        eval_fn=lambda s: eval_fn({"params": s.params, "batch_stats": s.batch_stats}),
        train_data=data.train,
        epochs=optim.epochs,
        batch_size=optim.batch_size,
        seed=config.seed,
        lr_fn=optimizers.lr_schedule(optim, steps_per_epoch),
        # Both exported before result.json marks the stage done, so a done teacher has them.
        best_fn=export(BEST_VARIABLES_DIR),
        finalize_fn=export(VARIABLES_DIR),
    )


def run(config, workdir: str, mesh, data: inputs.RunData) -> tuple[dict, dict]:
    """Trains (or loads) the teacher. Returns `(result, variables)`."""
    directory = os.path.join(workdir, "teacher")
    model = build_model(config.teacher.model, data.info.num_classes, config.dtype)
    eval_fn = evaluation.make_model_eval_fn(model, config, data, mesh)

    best = config.teacher.distill_from == "best"
    if config.teacher.checkpoint is not None:
        source = _handed_on(
            config.teacher.checkpoint, best, f"teacher.checkpoint = {config.teacher.checkpoint!r}"
        )
        variables = load_variables(source, model, mesh)
        evaluation_result = eval_fn(variables)
        result = {
            "stage": "teacher",
            "loaded_from": source,
            "best_accuracy": evaluation_result["accuracy"],
            "last_accuracy": evaluation_result["accuracy"],
        }
        return result, variables

    used = os.path.join(directory, BEST_VARIABLES_DIR if best else VARIABLES_DIR)
    if train_loop.is_done(directory):
        # As for the same teacher given as teacher.checkpoint (a stage of an older version,
        # copied in, may have no best epoch's variables: its last epoch's, recorded as such).
        used = _handed_on(directory, best, f"the finished teacher stage in {directory}")
        handed_on = "best" if os.path.basename(used) == BEST_VARIABLES_DIR else "last"
        result = train_loop.read_result(directory) | {"distill_from": handed_on}
        return result, load_variables(used, model, mesh)

    stage = build_stage(config, mesh, data, directory, model, eval_fn)
    result = train_loop.run(stage, config, mesh)
    final = result.pop("state")
    result["distill_from"] = config.teacher.distill_from
    if best:  # Read back, so a fresh and a resumed run hand on the very same arrays.
        return result, load_variables(used, model, mesh)
    return result, {"params": final.params, "batch_stats": final.batch_stats}
