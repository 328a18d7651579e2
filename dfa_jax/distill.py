"""Stage 2: train a fresh student with CE + gamma_fd * sum_i w_i D(F_s(S_i), A_i) (Eqs. 3-4).

A_i = sum_j alpha_i^j T_i^j is the teacher's group-i aggregation with alpha frozen; F_s is a
per-group ST connector (1x1 conv + BN, student -> teacher channels); D is overhaul's partial L2
with the constant margin -1 by default (DESIGN §4); w_i = 1/2^(G-i). Training uses the same
bilevel step as the search, with beta frozen: the state carries beta = log(alpha) (exact zeros
of 'last' become -inf logits, which softmax maps back to exact zeros) and no beta optimizer.

Aggregations (`distill.aggregation`, Table 5): 'dfa' (this run's alpha.json), 'last', 'average',
'random' (seeded), 'file' (another run's alpha.json: DFA-T). 'none' trains the student alone.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dfa_jax import bilevel
from dfa_jax import config_lib
from dfa_jax import evaluation
from dfa_jax import features
from dfa_jax import inputs
from dfa_jax import losses
from dfa_jax import models
from dfa_jax import optimizers
from dfa_jax import parallel
from dfa_jax import search as search_lib
from dfa_jax import teacher as teacher_lib
from dfa_jax import train_loop
from dfa_jax.data import loader


class AlphaFileError(ValueError):
    """An alpha.json that does not fit the teacher's group layout."""


def load_alpha_file(path: str, teacher_model) -> list[np.ndarray]:
    """Per group, alpha [N_i] from an alpha.json, checked against the teacher's feature groups."""
    with open(path) as f:
        record = json.load(f)
    groups = teacher_model.feature_groups()
    found = [tuple(g["layers"]) for g in record["groups"]]
    if len(found) != len(groups):
        raise AlphaFileError(
            f"{path} has {len(found)} groups but the teacher ({record.get('teacher')!r} there)"
            f" has {len(groups)}; use an alpha.json searched with this teacher architecture."
        )
    for i, (want, got) in enumerate(zip(groups, found)):
        if tuple(want) != got:
            raise AlphaFileError(
                f"{path}: group {i + 1} aggregates layers {list(got)} but this teacher's group"
                f" {i + 1} has {list(want)}; use an alpha.json searched with this teacher."
            )
    return [np.asarray(g["alpha"], np.float32) for g in record["groups"]]


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
        return load_alpha_file(os.path.join(workdir, search_lib.ALPHA_FILE), teacher_model)
    if name == "file":
        return load_alpha_file(config.distill.alpha_file, teacher_model)
    raise ValueError(f"unknown aggregation {name!r}; use one of {config_lib.AGGREGATIONS}")


def frozen_beta(alpha: list[np.ndarray]) -> dict:
    """beta = log(alpha), so that softmax(beta) == alpha exactly (zeros -> -inf logits)."""
    return {search_lib.group_key(i + 1): jnp.log(jnp.asarray(a)) for i, a in enumerate(alpha)}


def make_distill_loss_fn(teacher_model, student_model, config):
    """`(params, batch_stats, beta, batch, rng, aux=teacher variables) -> (loss, (bs, metrics))`."""
    distill = config.distill
    t_groups = teacher_model.feature_groups()
    s_ends = [names[-1] for names in student_model.feature_groups()]
    t_channels = [s[-1] for s in features.group_shapes(teacher_model)]
    connectors = [models.Connector(c, dtype=student_model.dtype) for c in t_channels]
    teacher_train = distill.teacher_bn == "batch"

    def loss_fn(params, batch_stats, beta, batch, rng, aux):
        del rng
        images, labels = batch["image"], batch["label"]
        _, t_mut = teacher_model.apply(
            aux,
            images,
            train=teacher_train,
            mutable=[models.FEATURES] + (["batch_stats"] if teacher_train else []),
        )
        logits, s_mut = student_model.apply(
            {"params": params["student"], "batch_stats": batch_stats["student"]},
            images,
            train=True,
            mutable=["batch_stats", models.FEATURES],
        )
        logits = logits.astype(jnp.float32)
        student_maps = features.read(s_mut, s_ends)
        mapped, targets, st_stats = [], [], {}
        for i, (names, connector) in enumerate(zip(t_groups, connectors)):
            key = search_lib.group_key(i + 1)
            maps = [
                jax.lax.stop_gradient(
                    features.clamp(m.astype(jnp.float32), config.features.clamp_min)
                )
                for m in features.read(t_mut, names)
            ]
            targets.append(losses.aggregate(maps, jax.nn.softmax(beta[key])))
            out, mut = connector.apply(
                {"params": params["st"][key], "batch_stats": batch_stats["st"][key]},
                student_maps[i],
                train=True,
                mutable=["batch_stats"],
            )
            mapped.append(out.astype(jnp.float32))
            st_stats[key] = mut["batch_stats"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        fd = losses.feature_distillation_loss(
            mapped, targets, distance=distill.distance, margin=distill.margin
        )
        loss = ce + distill.gamma_fd * fd
        new_batch_stats = {"student": s_mut["batch_stats"], "st": st_stats}
        metrics = {
            "ce_loss": ce,
            "fd_loss": fd,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        }
        return loss, (new_batch_stats, metrics)

    return loss_fn


def run(config, workdir: str, mesh, data: inputs.RunData, teacher_vars, name: str) -> dict:
    """Trains one student with aggregation `name` (or 'none': alone) in WORKDIR/distill/<name>."""
    directory = os.path.join(workdir, "distill", name)
    if train_loop.is_done(directory):
        return train_loop.read_result(directory)
    num_classes = data.info.num_classes
    teacher_model = teacher_lib.build_model(config.teacher.model, num_classes, config.dtype)
    student_model = teacher_lib.build_model(config.student.model, num_classes, config.dtype)
    optim = config.distill.optim
    steps_per_epoch = loader.steps_per_epoch(
        len(data.train[1]), parallel.local_batch_size(optim.batch_size)
    )
    tx = optimizers.sgd(optim, steps_per_epoch)
    student_vars = teacher_lib.init_variables(student_model, config.seed, mesh)

    if name == config_lib.NO_DISTILLATION:
        params, batch_stats, beta = student_vars["params"], student_vars["batch_stats"], None
        loss_fn, aux = teacher_lib.cross_entropy_loss_fn(student_model), None
        student_part = lambda tree: tree  # noqa: E731
    else:
        alpha = aggregation_alpha(name, teacher_model, config, workdir)
        s_shapes = features.group_shapes(student_model)
        t_channels = [s[-1] for s in features.group_shapes(teacher_model)]
        st_params, st_stats = search_lib.init_connectors(
            s_shapes, t_channels, config.seed + 100, mesh, jnp.dtype(config.dtype)
        )
        params = {"student": student_vars["params"], "st": st_params}
        batch_stats = {"student": student_vars["batch_stats"], "st": st_stats}
        beta = frozen_beta(alpha)
        loss_fn, aux = make_distill_loss_fn(teacher_model, student_model, config), teacher_vars
        student_part = lambda tree: tree["student"]  # noqa: E731

    state = jax.jit(
        lambda p, b: bilevel.create_state(p, b, tx, beta), out_shardings=parallel.replicated(mesh)
    )(params, batch_stats)
    # beta frozen: no beta loss, so the step is the w update alone (DESIGN §1).
    step = bilevel.make_bilevel_step(
        loss_fn,
        tx,
        seed=config.seed,
        preprocess_fn=inputs.make_preprocess(config.data, data.info, train=True),
    )
    eval_fn = evaluation.make_model_eval_fn(student_model, config, data, mesh)
    stage = train_loop.Stage(
        name=f"distill/{name}",
        directory=directory,
        state=state,
        step_fn=parallel.jit_step(step, mesh),
        eval_fn=lambda s: eval_fn(
            {"params": student_part(s.params), "batch_stats": student_part(s.batch_stats)}
        ),
        train_data=data.train,
        epochs=optim.epochs,
        batch_size=optim.batch_size,
        seed=config.seed,
        aux=aux,
        lr_fn=optimizers.lr_schedule(optim, steps_per_epoch),
    )
    result = train_loop.run(stage, config, mesh)
    result.pop("state")
    return result
