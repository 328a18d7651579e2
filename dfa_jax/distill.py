"""Stage 2: train a fresh student with CE + gamma_fd * sum_i w_i D(F_s(S_i), A_i) (Eqs. 3-4).

A_i = sum_j alpha_i^j T_i^j is the teacher's group-i aggregation with alpha frozen; F_s is a
per-group ST connector (1x1 conv + BN, student -> teacher channels); D is overhaul's partial L2
with the constant margin -1 by default; w_i = 1/2^(G-i). Training uses the same
bilevel step as the search, with beta frozen: the state carries beta = log(alpha) (exact zeros
of 'last' become -inf logits, which softmax maps back to exact zeros) and no beta optimizer.

Aggregations (`distill.aggregation`, Table 5): 'dfa' (this run's alpha.json), 'last', 'average',
'random' (seeded), 'file' (another run's alpha.json: DFA-T). 'none' trains the student alone.
"""

from __future__ import annotations

import hashlib
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from dfa_jax import alpha_file
from dfa_jax import bilevel
from dfa_jax import cohort
from dfa_jax import config_lib
from dfa_jax import evaluation
from dfa_jax import errors
from dfa_jax import features
from dfa_jax import files
from dfa_jax import inputs
from dfa_jax import losses
from dfa_jax import methods
from dfa_jax import models
from dfa_jax import optimizers
from dfa_jax import parallel
from dfa_jax import search as search_lib
from dfa_jax import teacher as teacher_lib
from dfa_jax import train_loop
from dfa_jax.data import loader


def aggregation_alpha(name: str, teacher_model, config, workdir: str) -> list[np.ndarray]:
    """Per group, the frozen alpha [N_i] of aggregation `name` (Table 5's rows)."""
    groups = teacher_model.feature_groups()
    if name == "last":
        return [np.eye(len(g), dtype=np.float32)[-1] for g in groups]
    if name == "average":
        return [np.full(len(g), 1.0 / len(g), np.float32) for g in groups]
    if name == "random":
        rng = np.random.default_rng(config.seed)
        weights = [rng.uniform(size=len(g)).astype(np.float32) for g in groups]
        return [w / w.sum() for w in weights]
    if name == "dfa":
        return alpha_file.load(os.path.join(workdir, search_lib.ALPHA_FILE), teacher_model)
    if name == "file":
        if config.distill.alpha_file is None:
            raise errors.ConfigError(
                "distill.alpha_file is unset but the 'file' aggregation reads it; pass"
                " --config.distill.alpha_file=OTHER_WORKDIR/alpha.json."
            )
        return alpha_file.load(config.distill.alpha_file, teacher_model)
    raise errors.ConfigError(
        f"distill.aggregation = {name!r} is unknown; use one of {config_lib.AGGREGATIONS}."
    )


def frozen_beta(alpha: list[np.ndarray]) -> dict:
    """beta = log(alpha), so that softmax(beta) == alpha exactly (zeros -> -inf logits)."""
    return {methods.group_key(i + 1): jnp.log(jnp.asarray(a)) for i, a in enumerate(alpha)}


def _stage(
    config,
    name,
    directory,
    state,
    loss_fn,
    tx,
    optim,
    data,
    mesh,
    aux,
    eval_fn,
    steps_per_epoch,
    w_trainable=None,
    students=0,
    **extra,
):
    """A distillation (or helper-initialisation) stage on the shared step, beta frozen; with
    `students` > 0, the step of a cohort of that many stacked students (`cohort.py`)."""
    # beta frozen: no beta loss, so the step is the w update alone (bilevel.py).
    step = bilevel.make_bilevel_step(
        loss_fn,
        tx,
        seed=config.seed,
        preprocess_fn=inputs.make_train_preprocess(config.data, data.info),
        w_trainable=w_trainable,
    )
    if students:
        step = cohort.make_cohort_step(step, students, cohort_mode(config))
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
        loss_fn,
        tx,
        optim,
        data,
        mesh,
        teacher_vars,
        eval_fn,
        steps_per_epoch,
        w_trainable=w_trainable,
    )
    return train_loop.run(stage, config, mesh)["state"]


def _replicate_state(mesh, params, batch_stats, tx, beta=None):
    return jax.jit(
        lambda p, b: bilevel.create_state(p, b, tx, beta), out_shardings=parallel.replicated(mesh)
    )(params, batch_stats)


def make_paraphraser_loss(pair: methods.Pair, base):
    """FT's first-stage loss: MSE between the teacher's raw last map and the paraphraser's
    reconstruction of it (RepDistiller `helper/pretrain.py`, `nn.MSELoss()` on `feat_t[-2]`)."""
    module = methods.Paraphraser(pair.t_shapes()[-1][-1], base.ft_rate, dtype=pair.teacher.dtype)

    def loss_fn(params, batch_stats, beta, batch, rng, aux):
        del beta, rng
        _, mut = pair.teacher.apply(aux, batch["image"], train=False, mutable=[models.FEATURES])
        target = jax.lax.stop_gradient(
            features.read(mut, methods.positions(pair.teacher, "raw")[-1:])[0].astype(jnp.float32)
        )
        recon, _ = module.apply({"params": params, "batch_stats": batch_stats}, target)
        loss = jnp.mean((recon.astype(jnp.float32) - target) ** 2)
        return loss, (batch_stats, {"reconstruction_loss": loss})

    return module, loss_fn


def pretrain_paraphraser(config, directory, pair, data, mesh, teacher_vars):
    """FT's first stage: train the paraphraser to reconstruct the teacher's raw last map."""
    base = config.baselines
    module, loss_fn = make_paraphraser_loss(pair, base)
    params, batch_stats = methods._init(module, config.seed + 300, mesh, pair.t_shapes()[-1])  # noqa: SLF001
    final = _run_helper_stage(
        config,
        "distill/ft/paraphraser",
        directory,
        helper_stage_optim(config, base.ft_pretrain_epochs, base.ft_pretrain_lr),
        params,
        batch_stats,
        loss_fn,
        data,
        mesh,
        teacher_vars,
        None,
    )
    return {"params": final.params, "batch_stats": final.batch_stats}


def ab_init_trainable(pair: methods.Pair, params: dict) -> dict:
    """What AB's initialisation trains: the connectors and the student's feature body.

    RepDistiller's `init` trains `model_s.get_feat_modules()` (a WRN's conv1 and block1-3) and the
    connectors only: the classifier (and a WRN's final BN) get neither gradient nor weight decay.
    """
    frozen = ("fc", "bn1") if isinstance(pair.student, models.WideResNet) else ("fc",)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path[0].key != "student" or path[1].key not in frozen, params
    )


def make_ab_init_loss(pair: methods.Pair, base, connectors):
    """AB's first-stage loss (RepDistiller `helper/pretrain.py` with `ABLoss`): per group end,
    the activation-boundary loss between the connected pre-ReLU student map and the teacher's.

    As in RepDistiller, the student runs with `model_s.eval()` and its feature modules switched
    back to train mode: a WRN's last pre-ReLU map is its final BN with running statistics (which
    therefore do not move), the others use batch statistics.
    """
    weights = losses.group_weights(len(pair.t_groups))
    wrn = isinstance(pair.student, models.WideResNet)

    def loss_fn(params, batch_stats, beta, batch, rng, aux):
        del beta, rng
        images = batch["image"]
        _, t_mut = pair.teacher.apply(aux, images, train=False, mutable=[models.FEATURES])
        _, s_mut = pair.student.apply(
            {"params": params["student"], "batch_stats": batch_stats["student"]},
            images,
            train=True,
            mutable=["batch_stats", models.FEATURES],
        )
        t_pre = features.read(t_mut, pair.t_ends)
        s_pre = features.read(s_mut, pair.s_ends)
        student_stats = s_mut["batch_stats"]
        if wrn:
            final_bn = {
                "params": params["student"]["bn1"],
                "batch_stats": batch_stats["student"]["bn1"],
            }
            raw_last = features.read(s_mut, methods.positions(pair.student, "raw")[-1:])[0]
            s_pre[-1] = models.layers.BatchNorm(
                use_running_average=True, dtype=pair.student.dtype
            ).apply(final_bn, raw_last)
            student_stats = {**student_stats, "bn1": batch_stats["student"]["bn1"]}
        total, st_stats = 0.0, {}
        for i, connector in enumerate(connectors):
            key = methods.group_key(i + 1)
            out = s_pre[i]
            if connector is not None:
                out, new = connector.apply(
                    {"params": params["st"][key], "batch_stats": batch_stats["st"][key]},
                    out,
                    train=True,
                    mutable=["batch_stats"],
                )
                st_stats[key] = new["batch_stats"]
            ab = losses.ab_loss(
                out.astype(jnp.float32),
                jax.lax.stop_gradient(t_pre[i].astype(jnp.float32)),
                base.ab_margin,
            )
            total = total + weights[i] * ab / images.shape[0] * losses.AB_GAMMA
        new_stats = {**batch_stats, "student": student_stats, "st": st_stats}
        return total, (new_stats, {"ab_loss": total})

    return loss_fn


def initialise_by_ab(config, directory, pair, data, mesh, teacher_vars, student_vars, eval_fn):
    """AB's first stage: fit the student's group ends to the teacher's activation boundaries."""
    base = config.baselines
    helper_params, helper_stats = methods.init_helpers("ab", pair, config, config.seed + 100, mesh)
    params = {"student": student_vars["params"], **helper_params}
    batch_stats = {"student": student_vars["batch_stats"], **helper_stats}
    loss_fn = make_ab_init_loss(pair, base, methods.ab_connectors(pair, helper_params))
    final = _run_helper_stage(
        config,
        "distill/ab/init",
        directory,
        helper_stage_optim(config, base.ab_init_epochs, base.ab_init_lr),
        params,
        batch_stats,
        loss_fn,
        data,
        mesh,
        teacher_vars,
        eval_fn,
        w_trainable=ab_init_trainable(pair, params),
    )
    return {"params": final.params["student"], "batch_stats": final.batch_stats["student"]}


def student_seeds(config) -> tuple[int, ...]:
    """The seeds each label's students are initialised with (`distill.seeds`; empty: the run's)."""
    return tuple(config.distill.seeds) or (config.seed,)


def student_name(config, label: str, seed: int) -> str:
    """The stage name of (label, seed): 'distill/<label>' with one seed, else '.../seed<k>'."""
    return f"distill/{label}" if len(student_seeds(config)) == 1 else f"distill/{label}/seed{seed}"


def student_directory(workdir: str, config, label: str, seed: int) -> str:
    return os.path.join(workdir, student_name(config, label, seed))


def pair_of(config, data) -> methods.Pair:
    """The run's teacher and student models."""
    num_classes = data.info.num_classes
    return methods.Pair(
        teacher=teacher_lib.build_model(config.teacher.model, num_classes, config.dtype),
        student=teacher_lib.build_model(config.student.model, num_classes, config.dtype),
    )


def _seeded(config, seed: int):
    """The config a student of `seed` is built with: its initialisation (and a 'random'
    aggregation's alpha) from `seed`; batches and augmentation stay the run's (`config.seed`)."""
    if seed == config.seed:
        return config
    seeded = ml_collections.ConfigDict(config.to_dict())
    seeded.seed = seed
    return seeded


def student_start(config, workdir, mesh, data, teacher_vars, pair, label, seed, eval_student):
    """(params, batch_stats, beta, aux, margins) at the start of (label, seed)'s training, after
    its method's own first stage (FT's paraphraser, AB's initialisation) where it has one."""
    method = methods.method_of(label)
    seeded = _seeded(config, seed)
    directory = student_directory(workdir, config, label, seed)
    student_vars = teacher_lib.init_variables(pair.student, seed, mesh)
    aux, margins, beta = teacher_vars, None, None
    if method == "dfa":
        beta = frozen_beta(aggregation_alpha(label, pair.teacher, seeded, workdir))
    elif method == "margin":
        margins = methods.teacher_margins(pair, teacher_vars, methods.reads_stem(method, config))
    elif method == "ft":
        paraphraser = pretrain_paraphraser(
            seeded, os.path.join(directory, "paraphraser"), pair, data, mesh, teacher_vars
        )
        aux = {**teacher_vars, "paraphraser": paraphraser}
    elif method == "ab":
        student_vars = initialise_by_ab(
            seeded,
            os.path.join(directory, "init"),
            pair,
            data,
            mesh,
            teacher_vars,
            student_vars,
            lambda s: eval_student(
                {"params": s.params["student"], "batch_stats": s.batch_stats["student"]}
            ),
        )
    helper_params, helper_stats = (
        ({}, {})
        if method == "ab"  # AB's connectors served its initialisation only.
        else methods.init_helpers(label, pair, config, seed + 100, mesh)
    )
    params = {"student": student_vars["params"], **helper_params}
    batch_stats = {"student": student_vars["batch_stats"], **helper_stats}
    return params, batch_stats, beta, aux, margins


def build_stage(
    config,
    mesh,
    data: inputs.RunData,
    workdir: str,
    teacher_vars,
    students: list[tuple[str, int]],
    starts: list[tuple] | None = None,
) -> train_loop.Stage:
    """The distillation of `students` ((label, seed) of one method) as the loop runs it: one
    student alone, or several in one step that computes the teacher's forward once per batch
    (`cohort.py`), on the bilevel step with beta frozen. Built without reading or writing a file
    from `starts` (each `student_start`'s tuple; None: made here, for methods without a first
    stage of their own and aggregations that read no alpha.json)."""
    pair = pair_of(config, data)
    optim = config.distill.optim
    steps_per_epoch = loader.steps_per_epoch(len(data.train.labels), optim.batch_size)
    tx = optimizers.sgd(optim, steps_per_epoch)
    eval_student = evaluation.make_model_eval_fn(pair.student, config, data, mesh)
    if starts is None:
        starts = _starts(config, workdir, mesh, data, teacher_vars, students)
    margins, aux = starts[0][4], starts[0][3]
    loss_fn = methods.make_loss_fn(students[0][0], pair, config, margins)
    if len(students) == 1:
        (label, seed), (params, batch_stats, beta, *_) = students[0], starts[0]
        return _stage(
            config,
            student_name(config, label, seed),
            student_directory(workdir, config, label, seed),
            _replicate_state(mesh, params, batch_stats, tx, beta),
            loss_fn,
            tx,
            optim,
            data,
            mesh,
            aux,
            lambda s: eval_student(
                {"params": s.params["student"], "batch_stats": s.batch_stats["student"]}
            ),
            steps_per_epoch,
        )

    state = jax.jit(
        lambda p, b, beta: cohort.stack(
            [bilevel.create_state(*args, tx, be) for *args, be in zip(p, b, beta)]
        ),
        out_shardings=parallel.replicated(mesh),
    )([s[0] for s in starts], [s[1] for s in starts], [s[2] for s in starts])

    def member(k: int, label: str, seed: int) -> train_loop.Member:
        def evaluate(state):
            mine = cohort.student(state, k)
            return eval_student(
                {"params": mine.params["student"], "batch_stats": mine.batch_stats["student"]}
            )

        directory = student_directory(workdir, config, label, seed)

        def export(state):
            """The student's final variables, as a teacher stage exports its own: the cohort's
            checkpoint is elsewhere, and `dfa_jax.interop export` reads them here."""
            mine = cohort.student(state, k)
            teacher_lib.save_variables(
                os.path.join(directory, teacher_lib.VARIABLES_DIR),
                {"params": mine.params["student"], "batch_stats": mine.batch_stats["student"]},
            )

        return train_loop.Member(
            name=student_name(config, label, seed),
            directory=directory,
            eval_fn=evaluate,
            finalize_fn=export,
        )

    return _stage(
        config,
        f"distill/{methods.method_of(students[0][0])} cohort of {len(students)}",
        cohort_directory(workdir, config, students),
        state,
        loss_fn,
        tx,
        optim,
        data,
        mesh,
        aux,
        None,
        steps_per_epoch,
        students=len(students),
        members=tuple(member(k, *student) for k, student in enumerate(students)),
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
    starts = _starts(config, workdir, mesh, data, teacher_vars, students)
    stage = build_stage(config, mesh, data, workdir, teacher_vars, students, starts)
    result = train_loop.run(stage, config, mesh)
    result.pop("state")
    return result


# Methods whose students cannot share a step: each trains after a first stage of its own, whose
# variables (FT's paraphraser, in the teacher's inputs) or schedule differ per student.
ALONE = ("ft", "ab")


def cohort_mode(config) -> str:
    """'vmap' or 'loop' (`distill.cohort`; 'auto': the faster one measured on this backend).

    On a CPU a vmapped convolution with per-student weights becomes a grouped convolution, which
    XLA:CPU runs several times slower than K ordinary ones (BENCHMARKS.md, "Students that share
    the teacher"): 'loop' there, 'vmap' on GPUs and TPUs.
    """
    if config.distill.cohort != "auto":
        return config.distill.cohort
    return "loop" if jax.default_backend() == "cpu" else "vmap"


def cohorts(config, todo: list[tuple[str, int]]) -> list[list[tuple[str, int]]]:
    """`todo`'s (label, seed) students grouped into the steps that train them: students of one
    method share a step (at most `distill.max_students_per_step` each), FT's and AB's train
    alone; in the order of `todo`'s first student of each."""
    groups: dict[str, list] = {}
    for label, seed in todo:
        method = methods.method_of(label)
        key = f"{method}:{label}:{seed}" if method in ALONE else method
        groups.setdefault(key, []).append((label, seed))
    limit = config.distill.max_students_per_step or None
    chunks = []
    for students in groups.values():
        size = limit or len(students)
        chunks.extend(students[i : i + size] for i in range(0, len(students), size))
    return chunks


def cohort_directory(workdir: str, config, students: list[tuple[str, int]]) -> str:
    """Where the one checkpoint of a cohort lives: named by its students, so another set of
    students (a seed or label added to an unfinished run) never resumes it."""
    names = ",".join(student_name(config, label, seed) for label, seed in students)
    digest = hashlib.sha256(names.encode()).hexdigest()[:12]
    return os.path.join(workdir, "distill", "cohorts", digest)


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
    for students in cohorts(config, todo):
        if len(students) == 1:
            run(config, workdir, mesh, data, teacher_vars, *students[0])
        else:
            run_cohort(config, workdir, mesh, data, teacher_vars, students)
    return {
        student_name(config, label, seed): train_loop.read_result(
            student_directory(workdir, config, label, seed)
        )
        for label, seed in order
    }


def run_cohort(
    config, workdir: str, mesh, data: inputs.RunData, teacher_vars, students: list
) -> dict[str, dict]:
    """Trains `students` ((label, seed) of one method) in one step that computes the teacher's
    forward once per batch (`cohort.py`); returns their results by stage name."""
    starts = _starts(config, workdir, mesh, data, teacher_vars, students)
    names = ", ".join(student_name(config, label, seed) for label, seed in students)
    method = methods.method_of(students[0][0])
    logging.info(
        "[distill] %d %s students share the teacher in one step: %s", len(students), method, names
    )
    stage = build_stage(config, mesh, data, workdir, teacher_vars, students, starts)
    return train_loop.run(stage, config, mesh)["members"]
