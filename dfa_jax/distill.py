"""Stage 2: train fresh students, each by its method's loss (`methods`), on the shared step.

Training uses the bilevel step of the search with beta frozen: the state carries beta (DFA's
frozen log(alpha), `methods.dfa`) and no beta optimizer. A student starts from its method's
`start` (a first stage of its own for FT and AB, run here by `_run_helper_stage`); the students
of the methods that need none share one step and the teacher's forward (`cohort.py`), each
method's stacked. A student that trains with a frozen alpha (DFA's aggregations) records it in its
result: `alpha` (softmax of its final state's beta) and `aggregation` (where it came from).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re

import jax
import ml_collections
import numpy as np
from absl import logging

from dfa_jax import bilevel
from dfa_jax import cohort
from dfa_jax import config_lib
from dfa_jax import errors
from dfa_jax import evaluation
from dfa_jax import files
from dfa_jax import inputs
from dfa_jax import methods
from dfa_jax import optimizers
from dfa_jax import parallel
from dfa_jax import teacher as teacher_lib
from dfa_jax import train_loop
from dfa_jax.data import loader
from dfa_jax.methods import dfa

# WORKDIR/distill/<COHORTS_DIR>/<id>/: a cohort's checkpoints and its students (MEMBERS_FILE).
COHORTS_DIR = "cohorts"
MEMBERS_FILE = "members.json"
# In each student's directory from its start: its label and seed (the one-seed layout's
# directory, distill/<label>, does not name the seed).
STUDENT_FILE = "student.json"


def _step(config, loss_fn, tx, data, w_trainable=None):
    """The shared bilevel step on `loss_fn`, beta frozen: no beta loss, so the w update alone
    (bilevel.py); batches and augmentation from the run's seed, whoever trains."""
    return bilevel.make_bilevel_step(
        loss_fn,
        tx,
        seed=config.seed,
        preprocess_fn=inputs.make_train_preprocess(config.data, data.info),
        w_trainable=w_trainable,
    )


def _stage(
    config, name, directory, state, step, optim, data, mesh, aux, eval_fn, steps_per_epoch, **extra
):
    """A distillation (or helper-initialisation) stage that trains `state` by `step` (`_step`,
    or a cohort's step of it)."""
    return train_loop.Stage(
        name=name,
        directory=directory,
        state=state,
        step_fn=parallel.jit_step(step, mesh),
        eval_fn=eval_fn,
        train_data=data.train,
        epochs=optim.epochs,
        batch_size=optim.batch_size,
        seed=config.seed,
        aux=aux,
        lr_fn=optimizers.lr_schedule(optim, steps_per_epoch),
        **extra,
    )


def helper_stage_optim(config, epochs: int, lr: float) -> ml_collections.ConfigDict:
    """The recipe of a method's own first stage, as RepDistiller's `helper/pretrain.py` `init`
    runs it: the student's batch size and weight decay, plain SGD with momentum (no Nesterov)
    at a constant `lr` for `epochs`."""
    optim = ml_collections.ConfigDict(config.distill.optim.to_dict())
    optim.epochs = epochs
    optim.lr = lr
    optim.schedule = "constant"
    optim.nesterov = False
    return optim


def _run_helper_stage(
    config,
    name,
    directory,
    optim,
    params,
    batch_stats,
    loss_fn,
    data,
    mesh,
    teacher_vars,
    eval_fn,
    w_trainable=None,
):
    """Trains a method's own first stage (FT's paraphraser, AB's initialisation) with `optim`
    (`helper_stage_optim`); returns its final state."""
    steps_per_epoch = loader.steps_per_epoch(len(data.train.labels), optim.batch_size)
    tx = optimizers.sgd(optim, steps_per_epoch)
    stage = _stage(
        config,
        name,
        directory,
        _replicate_state(mesh, params, batch_stats, tx),
        _step(config, loss_fn, tx, data, w_trainable),
        optim,
        data,
        mesh,
        teacher_vars,
        eval_fn,
        steps_per_epoch,
    )
    return train_loop.run(stage, config, mesh)["state"]


def _replicate_state(mesh, params, batch_stats, tx, beta=None):
    return jax.jit(
        lambda p, b: bilevel.create_state(p, b, tx, beta), out_shardings=parallel.replicated(mesh)
    )(params, batch_stats)


def student_seeds(config) -> tuple[int, ...]:
    """The seeds each label's students are initialised with (`distill.seeds`; empty: the run's)."""
    return tuple(config.distill.seeds) or (config.seed,)


def student_name(config, label: str, seed: int) -> str:
    """The stage name of (label, seed): 'distill/<label>' with one seed, else '.../seed<k>'."""
    return f"distill/{label}" if len(student_seeds(config)) == 1 else f"distill/{label}/seed{seed}"


def student_directory(workdir: str, config, label: str, seed: int) -> str:
    return os.path.join(workdir, student_name(config, label, seed))


def record_student(workdir: str, config, label: str, seed: int) -> None:
    """Writes (label, seed)'s `STUDENT_FILE` into its directory as its training starts."""
    directory = student_directory(workdir, config, label, seed)
    files.makedirs(directory)
    files.write_json_atomic(os.path.join(directory, STUDENT_FILE), {"label": label, "seed": seed})


def recorded_seed(directory: str) -> int | None:
    """The seed a student's directory recorded as its training started (`record_student`), or
    None where it has no record (a student from before students recorded their seed)."""
    path = os.path.join(directory, STUDENT_FILE)
    return int(files.read_json(path)["seed"]) if files.exists(path) else None


def _seed_dirs(directory: str) -> list[str]:
    return [n for n in files.listdir(directory) if re.fullmatch(r"seed\d+", n)]


def prepare_seed_layout(config, workdir: str) -> None:
    """Fits the students already in `workdir` to this run's `distill.seeds`, before anything is
    built: a student keeps its seed, whatever the layout.

    - One seed asked for, `distill/<label>/` holding a student of another seed: refused (it would
      be reported, or resumed, as this seed's).
    - One seed asked for, `distill/<label>/seed<k>/` there: refused (they are students of a run
      of several seeds; ask for several).
    - Several seeds asked for, `distill/<label>/` holding one student of seed s (a run of one
      seed): moved to `distill/<label>/seed<s>/`, so that it counts as done (or resumes) and only
      the missing seeds train. Moved with two renames through `distill/.<label>.seed<s>.moving`,
      which a run stopped between them finishes.
    """
    seeds = student_seeds(config)
    root = os.path.join(workdir, "distill")
    for name in files.listdir(root):  # A move a stopped run left half done.
        moving = re.fullmatch(r"\.(.+)\.(seed\d+)\.moving", name)
        if moving and jax.process_index() == 0:
            files.makedirs(os.path.join(root, moving.group(1)))
            os.rename(os.path.join(root, name), os.path.join(root, *moving.groups()))
    parallel.sync("distill seed layout: finished moves")
    moves = []  # (label, directory, seed): every process reads the layout before any moves.
    for label in config_lib.distill_labels(config):
        directory = os.path.join(root, label)
        if not files.exists(directory):
            continue
        recorded = recorded_seed(directory)
        holds_one = (
            recorded is not None
            or files.exists(os.path.join(directory, train_loop.RESULT_FILE))
            or files.exists(os.path.join(directory, "checkpoints"))
        )
        if len(seeds) == 1:
            if recorded is not None and recorded != seeds[0]:
                raise errors.ConfigError(
                    f"distill.seeds: {directory} holds the {label!r} student of seed {recorded},"
                    f" not {seeds[0]}; ask for both with distill.seeds=({recorded}, {seeds[0]})"
                    " (each then gets distill/<label>/seed<k>/), or use another --workdir."
                )
            if not holds_one and _seed_dirs(directory):
                raise errors.ConfigError(
                    f"distill.seeds: {directory} holds {label!r} students of a run of several"
                    f" seeds ({', '.join(_seed_dirs(directory))}); ask for several seeds"
                    " (distill.seeds) to use them, or use another --workdir."
                )
            continue
        if not holds_one:
            continue
        if recorded is None:
            raise errors.ConfigError(
                f"distill.seeds: {directory} holds a {label!r} student of a run of one seed that"
                " did not record which; move it to"
                f" {os.path.join(directory, 'seed<k>')} (k: that run's distill.seeds, or its"
                " seed when those were empty) and run again, or use another --workdir."
            )
        if files.is_remote(workdir):
            raise errors.ConfigError(
                f"distill.seeds: {directory} holds the {label!r} student of seed {recorded} of a"
                " run of one seed; an object store cannot rename it into the layout of several"
                f" seeds: copy it to {os.path.join(directory, f'seed{recorded}')}, delete the"
                " original, and run again."
            )
        moves.append((label, directory, recorded))
    # Every process has read the directories process 0 is about to rename.
    parallel.sync("distill seed layout: read")
    for label, directory, recorded in moves:
        if jax.process_index() == 0:
            moving = os.path.join(root, f".{label}.seed{recorded}.moving")
            os.rename(directory, moving)
            files.makedirs(directory)
            os.rename(moving, os.path.join(directory, f"seed{recorded}"))
            moved = os.path.join(directory, f"seed{recorded}")
            result = os.path.join(moved, train_loop.RESULT_FILE)
            if files.exists(result):  # Its stage's name in the layout of several seeds.
                files.write_json_atomic(
                    result, files.read_json(result) | {"stage": f"distill/{label}/seed{recorded}"}
                )
            logging.info(
                "[distill] several seeds: moved the student of seed %d from %s to %s",
                recorded,
                directory,
                moved,
            )
    parallel.sync("distill seed layout")


def pair_of(config, data) -> methods.Pair:
    """The run's teacher and student models."""
    num_classes = data.info.num_classes
    return methods.Pair(
        teacher=teacher_lib.build_model(config.teacher.model, num_classes, config.dtype),
        student=teacher_lib.build_model(config.student.model, num_classes, config.dtype),
    )


def _seeded(config, seed: int):
    """The config a student of `seed` is built with: its initialisation (and a 'random'
    aggregation's alpha) from `seed`; batches and augmentation stay the run's (`config.seed`), in
    a method's own first stage (FT's paraphraser, AB's initialisation) as in the distillation."""
    if seed == config.seed:
        return config
    seeded = ml_collections.ConfigDict(config.to_dict())
    seeded.seed = seed
    return seeded


def student_start(config, workdir, mesh, data, teacher_vars, pair, label, seed, eval_student):
    """(params, batch_stats, beta, aux, constants, record) at the start of (label, seed)'s
    training, after its method's `start` (a first stage of its own, frozen alpha, the teacher's
    margins); `record`: the fields its result gets from the start (`methods.Start.record`)."""
    implementation = methods.implementation(label)
    seeded = _seeded(config, seed)
    directory = student_directory(workdir, config, label, seed)
    start = methods.Start(
        student=teacher_lib.init_variables(pair.student, seed, mesh),
        helpers=implementation.helpers(pair, seeded, seed + 100, mesh),
        aux=teacher_vars,
    )
    if implementation.start is not None:

        def run_stage(
            name, where, epochs, lr, params, batch_stats, loss_fn, eval_fn=None, w_trainable=None
        ):
            optim = helper_stage_optim(seeded, epochs, lr)
            # The run's config: its batches and augmentation, as every student's (`_seeded`).
            return _run_helper_stage(
                config,
                name,
                where,
                optim,
                params,
                batch_stats,
                loss_fn,
                data,
                mesh,
                teacher_vars,
                eval_fn,
                w_trainable=w_trainable,
            )

        setup = methods.Setup(
            label=label,
            seed=seed,
            config=seeded,
            workdir=workdir,
            directory=directory,
            pair=pair,
            data=data,
            mesh=mesh,
            teacher_vars=teacher_vars,
            eval_student=eval_student,
            run_stage=run_stage,
        )
        start = implementation.start(setup, start)
    helper_params, helper_stats = start.helpers
    params = {"student": start.student["params"], **helper_params}
    batch_stats = {"student": start.student["batch_stats"], **helper_stats}
    return params, batch_stats, start.beta, start.aux, start.constants, start.record


def trained_alpha(beta: dict) -> dict[str, list[float]]:
    """Per group key, alpha = softmax(beta) of a student's frozen `beta` (one student's, no
    cohort axis), computed as its step computes it."""
    alpha = jax.device_get({key: dfa.group_alpha(beta, key) for key in beta})
    return {key: [float(a) for a in np.asarray(alpha[key])] for key in alpha}


def _alpha_fields(beta: dict, start_beta: dict | None, record: dict) -> dict:
    """What the result of a student whose final state has `beta` gets: `alpha` (nothing where it
    has no beta) and its start's `record`. A record made for another alpha than the one trained
    (a resume from a checkpoint after the alpha.json read changed) is left out, with a warning."""
    if not beta:
        return {}
    alpha = trained_alpha(beta)
    started = trained_alpha(start_beta) if start_beta else {}
    if record and not (
        alpha.keys() == started.keys()
        and all(np.allclose(alpha[k], started[k], rtol=0, atol=1e-6) for k in alpha)
    ):
        logging.warning(
            "[distill] a student trained with alpha %s (its checkpoint's), but this run's start"
            " read %s (%s): its result records the alpha alone",
            alpha,
            started,
            record,
        )
        record = {}
    return {"alpha": alpha, **record}


def build_stage(
    config,
    mesh,
    data: inputs.RunData,
    workdir: str,
    teacher_vars,
    students: list[tuple[str, int]],
    starts: list[tuple] | None = None,
) -> train_loop.Stage:
    """The distillation of `students` ((label, seed), of methods that do not train alone) as the
    loop runs it: one student alone, or several in one step that computes the teacher's forward
    once per batch (`cohort.py`; each method's students stacked, several methods' a
    `cohort.Mixed`), on the bilevel step with beta frozen. Built without reading or writing a
    file from `starts` (each `student_start`'s tuple; None: made here, for methods without a
    first stage of their own and aggregations that read no alpha.json)."""
    pair = pair_of(config, data)
    optim = config.distill.optim
    steps_per_epoch = loader.steps_per_epoch(len(data.train.labels), optim.batch_size)
    tx = optimizers.sgd(optim, steps_per_epoch)
    eval_student = evaluation.make_model_eval_fn(pair.student, config, data, mesh)
    if starts is None:
        starts = _starts(config, workdir, mesh, data, teacher_vars, students)
    # Students that share a step share its aux, the teacher's variables (a method whose start
    # adds to them trains alone): one argument of the step for all, so its forward is one.
    aux = starts[0][3]
    # Per method (`methods_of`'s order), its students' places in `students`.
    kinds = methods_of(students)
    groups = [
        [k for k, (label, _) in enumerate(students) if methods.method_of(label) == kind]
        for kind in kinds
    ]
    # A method's loss constants come from the teacher, the same for all its students.
    loss_fns = [
        methods.make_loss_fn(students[ks[0]][0], pair, config, starts[ks[0]][4]) for ks in groups
    ]
    if len(students) == 1:
        (label, seed), (params, batch_stats, beta, *_, record) = students[0], starts[0]
        directory = student_directory(workdir, config, label, seed)

        def variables(state) -> dict:
            return {"params": state.params["student"], "batch_stats": state.batch_stats["student"]}

        def finalize(state):
            """Its final variables, as a cohort's student has them (`dfa_jax.interop export`),
            and the alpha its state trained with."""
            teacher_lib.save_variables(
                os.path.join(directory, teacher_lib.VARIABLES_DIR), variables(state)
            )
            return _alpha_fields(state.beta, beta, record)

        return _stage(
            config,
            student_name(config, label, seed),
            directory,
            _replicate_state(mesh, params, batch_stats, tx, beta),
            _step(config, loss_fns[0], tx, data),
            optim,
            data,
            mesh,
            aux,
            lambda s: eval_student(variables(s)),
            steps_per_epoch,
            finalize_fn=finalize,
        )

    mode = cohort_mode(config)
    steps = [
        cohort.make_cohort_step(_step(config, loss_fn, tx, data), len(ks), mode)
        for loss_fn, ks in zip(loss_fns, groups)
    ]
    mixed = len(groups) > 1

    def create(inits):
        stacks = tuple(
            cohort.stack([bilevel.create_state(p, b, tx, beta) for p, b, beta in group])
            for group in inits
        )
        # One method's cohort is its stacked state alone, as its earlier runs checkpointed it.
        return cohort.Mixed(stacks) if mixed else stacks[0]

    state = jax.jit(create, out_shardings=parallel.replicated(mesh))(
        [[starts[k][:3] for k in ks] for ks in groups]
    )

    def member(k: int, g: int, i: int, label: str, seed: int) -> train_loop.Member:
        """Student i of method g, `students[k]`."""

        def variables(state) -> dict:
            """The student's variables out of the cohort's state."""
            return cohort.student_variables(state.groups[g] if mixed else state, i)

        directory = student_directory(workdir, config, label, seed)
        start_beta, record = starts[k][2], starts[k][5]  # Not the whole start: it need not live.

        def export(state):
            """The student's final variables, as a teacher stage exports its own: the cohort's
            checkpoint is elsewhere, and `dfa_jax.interop export` reads them here; and the alpha
            its slice of the state trained with."""
            teacher_lib.save_variables(
                os.path.join(directory, teacher_lib.VARIABLES_DIR), variables(state)
            )
            beta = (state.groups[g] if mixed else state).beta
            return _alpha_fields(jax.tree.map(lambda b: b[i], beta), start_beta, record)

        return train_loop.Member(
            name=student_name(config, label, seed),
            directory=directory,
            eval_fn=lambda state: eval_student(variables(state)),
            finalize_fn=export,
            metrics_fn=functools.partial(cohort.scalars, group=g, k=i) if mixed else None,
        )

    where = {k: (g, i) for g, ks in enumerate(groups) for i, k in enumerate(ks)}
    return _stage(
        config,
        f"distill/{'+'.join(kinds)} cohort of {len(students)}",
        cohort_directory(workdir, config, students),
        state,
        cohort.make_mixed_step(steps) if mixed else steps[0],
        optim,
        data,
        mesh,
        aux,
        None,
        steps_per_epoch,
        members=tuple(member(k, *where[k], *student) for k, student in enumerate(students)),
    )


def _starts(config, workdir, mesh, data, teacher_vars, students) -> list[tuple]:
    """Each student's `student_start`, its method's first stage (FT, AB) run where it has one."""
    pair = pair_of(config, data)
    eval_student = evaluation.make_model_eval_fn(pair.student, config, data, mesh)
    return [
        student_start(config, workdir, mesh, data, teacher_vars, pair, label, seed, eval_student)
        for label, seed in students
    ]


def run(
    config, workdir: str, mesh, data: inputs.RunData, teacher_vars, label: str, seed=None
) -> dict:
    """Trains the student (label, seed) alone (seed None: the run's) in its directory."""
    seed = config.seed if seed is None else seed
    directory = student_directory(workdir, config, label, seed)
    if train_loop.is_done(directory):
        return train_loop.read_result(directory)
    students = [(label, seed)]
    record_student(workdir, config, label, seed)
    starts = _starts(config, workdir, mesh, data, teacher_vars, students)
    stage = build_stage(config, mesh, data, workdir, teacher_vars, students, starts)
    del starts  # The stage holds its own copy: the starting variables need not live on.
    result = train_loop.run(stage, config, mesh)
    result.pop("state")
    return result


def methods_of(students: list[tuple[str, int]]) -> list[str]:
    """The methods of (label, seed) `students`, each once, in the order of its first student."""
    return list(dict.fromkeys(methods.method_of(label) for label, _ in students))


def cohort_mode(config) -> str:
    """'vmap' or 'loop' (`distill.cohort`; 'auto': 'loop' on a CPU, where it measured faster,
    'vmap' elsewhere, unmeasured there).

    On a CPU a vmapped convolution with per-student weights becomes a grouped convolution, which
    XLA:CPU runs several times slower than K ordinary ones (BENCHMARKS.md, "Students that share
    the teacher"): 'loop' there, 'vmap' on GPUs and TPUs.
    """
    if config.distill.cohort != "auto":
        return config.distill.cohort
    return "loop" if jax.default_backend() == "cpu" else "vmap"


def cohorts(config, todo: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
    """`todo`'s (label, seed) students grouped into the steps that train them: all that can share
    one step do (at most `distill.max_students_per_step` each), a method's students side by side;
    those of a method that `trains_alone` (FT, AB: a first stage of their own) train alone; in the
    order of `todo`'s first student of each."""
    order = methods_of(todo)
    groups: dict[tuple | None, list] = {}
    for label, seed in todo:
        alone = methods.implementation(label).trains_alone
        groups.setdefault((label, seed) if alone else None, []).append((label, seed))
    limit = config.distill.max_students_per_step or None
    chunks = []
    for students in groups.values():
        # A method's students side by side (stable: in `todo`'s order): one stacked state each.
        students.sort(key=lambda student: order.index(methods.method_of(student[0])))
        size = limit or len(students)
        chunks.extend(students[i : i + size] for i in range(0, len(students), size))
    return chunks


def cohort_directory(workdir: str, config, students: list[tuple[str, int]]) -> str:
    """Where the one checkpoint of a cohort lives: named by its students, so another set of
    students (a seed or label added to an unfinished run) never resumes it."""
    names = ",".join(student_name(config, label, seed) for label, seed in students)
    digest = hashlib.sha256(names.encode()).hexdigest()[:12]
    return os.path.join(workdir, "distill", COHORTS_DIR, digest)


def started_cohorts(
    config, workdir: str, order: list[tuple[str, int]], todo: list[tuple[str, int]]
) -> list[list[tuple]]:
    """The cohorts an earlier invocation started that still train some of `todo` (of this run's
    students, `order`), each with its students in its own order (its `MEMBERS_FILE`).

    They resume as they started: regrouping their students (`cohorts` of what is left when a
    split cohort stopped, or of the students still without a result when a finished cohort was
    stopped while writing them) would make another program, named otherwise, from step 0. A
    cohort is left to be regrouped when it holds a student this run no longer trains, was named
    under another seed layout, or is larger than `distill.max_students_per_step` allows now.
    """
    wanted = set(order)
    limit = config.distill.max_students_per_step
    found, claimed = [], set()
    root = os.path.join(workdir, "distill", COHORTS_DIR)
    for name in files.listdir(root):
        path = os.path.join(root, name, MEMBERS_FILE)
        if not files.exists(path):
            continue  # Started before cohorts recorded their students.
        students = [(str(label), int(seed)) for label, seed in files.read_json(path)["students"]]
        if (
            cohort_directory(workdir, config, students) != os.path.join(root, name)
            or not set(students) <= wanted
            or not set(students) & set(todo)
            or set(students) & claimed
        ):
            continue
        if limit and len(students) > limit:
            logging.warning(
                "[distill] the unfinished cohort in %s has %d students, more than"
                " distill.max_students_per_step = %d: its students start over in smaller steps",
                os.path.join(root, name),
                len(students),
                limit,
            )
            continue
        found.append(students)
        claimed |= set(students)
    return found


def run_all(config, workdir: str, mesh, data: inputs.RunData, teacher_vars) -> dict[str, dict]:
    """Trains every (label, seed) student not done yet and returns all their results, by stage
    name, labels in `distill_labels` order and seeds in `distill.seeds` order."""
    order = [(lab, s) for lab in config_lib.distill_labels(config) for s in student_seeds(config)]
    todo = []
    for label, seed in order:
        directory = student_directory(workdir, config, label, seed)
        started_alone = files.exists(os.path.join(directory, "checkpoints"))
        if train_loop.is_done(directory):
            continue
        if started_alone:  # Checkpointed by a run that trained it alone: resume it so.
            run(config, workdir, mesh, data, teacher_vars, label, seed)
        else:
            todo.append((label, seed))
    # Cohorts an earlier invocation started resume as they were, before the rest is grouped.
    started = started_cohorts(config, workdir, order, todo)
    for students in started:
        run_cohort(config, workdir, mesh, data, teacher_vars, students)
    resumed = {student for students in started for student in students}
    for students in cohorts(config, [s for s in todo if s not in resumed]):
        if len(students) == 1:
            run(config, workdir, mesh, data, teacher_vars, *students[0])
        else:
            run_cohort(config, workdir, mesh, data, teacher_vars, students)
    return {
        # With its seed: the one-seed layout's name does not say it.
        student_name(config, label, seed): train_loop.read_result(
            student_directory(workdir, config, label, seed)
        )
        | {"seed": seed}
        for label, seed in order
    }


def run_cohort(
    config, workdir: str, mesh, data: inputs.RunData, teacher_vars, students: list
) -> dict[str, dict]:
    """Trains `students` ((label, seed), of one method or several) in one step that computes the
    teacher's forward once per batch (`cohort.py`); returns their results by stage name."""
    starts = _starts(config, workdir, mesh, data, teacher_vars, students)
    names = ", ".join(student_name(config, label, seed) for label, seed in students)
    kinds = "+".join(methods_of(students))
    logging.info(
        "[distill] %d %s students share the teacher in one step: %s", len(students), kinds, names
    )
    # Its students, in their order: a later invocation resumes this cohort as it is.
    directory = cohort_directory(workdir, config, students)
    files.makedirs(directory)
    files.write_json_atomic(
        os.path.join(directory, MEMBERS_FILE), {"students": [list(s) for s in students]}
    )
    for label, seed in students:
        record_student(workdir, config, label, seed)
    stage = build_stage(config, mesh, data, workdir, teacher_vars, students, starts)
    del starts  # The stage holds its own copy: the starting variables need not live on.
    return train_loop.run(stage, config, mesh)["members"]
