"""Methods on the pre-ReLU group ends, about where activations cross zero: AB (activation
boundaries, in a first stage of its own) and Margin (overhaul's partial L2 above the teacher's
BN margins)."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from dfa_jax import baseline_presets
from dfa_jax import features
from dfa_jax import losses
from dfa_jax import models
from dfa_jax.methods import common
from dfa_jax.methods import logits

# ------------------------------------------------------------------------------------------ AB


def _ab_helpers(pair, config, seed, mesh):
    """RepDistiller's AB `Connector` (`models/util.py`): the identity where the student's map
    already has the teacher's shape, else ConvReg without its ReLU (conv + BN, resizing to the
    teacher's map)."""
    s_shapes, dtype = pair.s_shapes(), jnp.dtype(config.dtype)
    modules = ab_connectors(pair, dtype)
    st_params, st_stats = {}, {}
    # Seeds count the connectors made, not the groups.
    for j, i in enumerate(i for i, m in enumerate(modules) if m is not None):
        key = common.group_key(i + 1)
        st_params[key], st_stats[key] = common.init_module(modules[i], seed + j, mesh, s_shapes[i])
    return {"st": st_params}, {"st": st_stats}


def ab_connectors(pair: common.Pair, dtype=None) -> list:
    """Per group, AB's connector: ConvReg without its ReLU to the teacher's map, or None (the
    identity) where the shapes agree. `dtype`: the student's unless given."""
    dtype = pair.student.dtype if dtype is None else dtype
    return [
        models.Connector(t[-1], out_hw=t[1:3], dtype=dtype, initialiser="torch") if s != t else None
        for s, t in zip(pair.s_shapes(), pair.t_shapes())
    ]


def ab_init_trainable(pair: common.Pair, params: dict) -> dict:
    """What AB's initialisation trains: the connectors and the student's feature body.

    RepDistiller's `init` trains `model_s.get_feat_modules()` (a WRN's conv1 and block1-3) and the
    connectors only: the parameters after the body (the classifier, a WRN's final BN) get neither
    gradient nor weight decay.
    """
    frozen = models.family_of(pair.student).head
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path[0].key != "student" or path[1].key not in frozen, params
    )


def make_ab_init_loss(pair: common.Pair, base, connectors):
    """AB's first-stage loss (RepDistiller `helper/pretrain.py` with `ABLoss`): per group end,
    the activation-boundary loss between the connected pre-ReLU student map and the teacher's.

    As in RepDistiller, the student runs with `model_s.eval()` and its feature modules switched
    back to train mode: a last pre-ReLU map produced by a BN after the body (a WRN's final BN) uses
    running statistics, the others use batch statistics; the running statistics of every BN
    after the body (the family's `head`: a WRN's final BN, MobileNetV2's and ShuffleV2's head
    BNs) do not move.
    """
    weights = losses.group_weights(len(pair.t_groups))
    family = models.family_of(pair.student)
    final_bn = family.final_bn

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
        if final_bn is not None:
            final = {
                "params": params["student"][final_bn],
                "batch_stats": batch_stats["student"][final_bn],
            }
            raw_last = features.read(s_mut, common.positions(pair.student, "raw")[-1:])[0]
            s_pre[-1] = models.layers.BatchNorm(
                use_running_average=True, dtype=pair.student.dtype
            ).apply(final, raw_last)
        # In eval mode there, the head's BNs keep their running statistics.
        kept = {k: batch_stats["student"][k] for k in family.head if k in batch_stats["student"]}
        student_stats = {**student_stats, **kept}
        total, st_stats = 0.0, {}
        for i, connector in enumerate(connectors):
            key = common.group_key(i + 1)
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


def initialise_by_ab(setup: common.Setup, start: common.Start) -> common.Start:
    """AB's first stage: fit the student's group ends (through the connectors, `start.helpers`)
    to the teacher's activation boundaries. The student then trains alone with CE: the
    connectors served this stage only."""
    pair, base = setup.pair, setup.config.baselines
    helper_params, helper_stats = start.helpers
    params = {"student": start.student["params"], **helper_params}
    batch_stats = {"student": start.student["batch_stats"], **helper_stats}
    final = setup.run_stage(
        "distill/ab/init",
        os.path.join(setup.directory, "init"),
        base.ab_init_epochs,
        base.ab_init_lr,
        params,
        batch_stats,
        make_ab_init_loss(pair, base, ab_connectors(pair)),
        lambda s: setup.eval_student(
            {"params": s.params["student"], "batch_stats": s.batch_stats["student"]}
        ),
        ab_init_trainable(pair, params),
    )
    student = {"params": final.params["student"], "batch_stats": final.batch_stats["student"]}
    return dataclasses.replace(start, student=student, helpers=({}, {}))


def _ab_check(config) -> list[str]:
    problems = common.positive_lr(config, "ab_init_lr")
    problems += common.positive_epochs(config, "ab_init_epochs")
    problems += common.resize_problems(config, "ab")
    return problems + common.non_negative(config, "ab_margin")


AB = common.Implementation(
    # AB distills in its initialisation stage only; then the label cross-entropy.
    loss=logits.cross_entropy_loss,
    helpers=_ab_helpers,
    start=initialise_by_ab,
    check=_ab_check,
    trains_alone=True,
)

# -------------------------------------------------------------------------------------- Margin


def teacher_margins(pair: common.Pair, teacher_vars, with_stem: bool = False) -> list[jax.Array]:
    """Per group end (after the stem when `with_stem`), overhaul's margin E[t | t < 0] from the
    BN that produces it ([C] each).

    A teacher whose family has no BatchNorm producing each group end (ShuffleNetV2: a unit ends
    in a concatenation and a channel shuffle) gets the constant margin -1 on every channel of
    every position (its stem's too, where it has one outside its groups), as
    the DFA authors' Margin runs had it (their ShuffleNetV2's `get_margin()` returns None, which
    their `MarginReLU` turns into -1; github.com/PkuDavidGuan/Distillation,
    `framework/modeling/kd/margin_ReLU.py`).
    """
    group_end_bns = models.family_of(pair.teacher).group_end_bns
    if group_end_bns is None:
        # Every position the loss reads (RepDistiller's ShuffleV1 / V2 have a stem outside
        # their groups), each on its channels.
        shapes = list(pair.t_shapes())
        if with_stem:
            shapes[:0] = features.shapes_of(pair.teacher, pair.teacher.stem_features()[:1])
        return [jnp.full((shape[-1],), -1.0, jnp.float32) for shape in shapes]
    bns = group_end_bns(pair.teacher, teacher_vars["params"], with_stem)
    return [losses.bn_margin(bn["scale"], bn["bias"]) for bn in bns]


def _margin_stem(pair: common.Pair, config) -> bool:
    return common.with_stem(pair, baseline_presets.settings(config).with_stem)


def _margin_helpers(pair, config, seed, mesh):
    return common.position_connectors(pair, config, seed, mesh, _margin_stem(pair, config))


def _margin_start(setup: common.Setup, start: common.Start) -> common.Start:
    stem = _margin_stem(setup.pair, setup.config)
    return dataclasses.replace(
        start, constants=teacher_margins(setup.pair, setup.teacher_vars, stem)
    )


def _margin_loss(pair, config, margins):
    """CE + margin_gamma * overhaul's partial L2 of the connected pre-ReLU maps above the
    teacher's BN margins (`margins`: `teacher_margins`), the teacher's BN as overhaul's
    `train_with_distillation.py` runs it (`baselines.margin_teacher_bn`; eval mode under the
    'authors' preset)."""
    preset = baseline_presets.settings(config)
    connected = common.connected_maps(pair, _margin_stem(pair, config))

    def term(step):
        mapped, t_pre = connected(step)
        fd = losses.feature_distillation_loss(mapped, t_pre, margin=list(margins))
        step.metrics["fd_loss"] = fd
        return step.ce + preset.margin_gamma * fd

    return common.student_loss(pair, config, term, teacher_bn=preset.margin_teacher_bn)


def _margin_check(config) -> list[str]:
    base = config.baselines
    problems = []
    if base.margin_teacher_bn not in ("eval", "batch"):
        problems.append(
            f"baselines.margin_teacher_bn = {base.margin_teacher_bn!r}: use 'batch' (overhaul's)"
            " or 'eval'."
        )
    return problems + common.non_negative(config, "margin_gamma")


MARGIN = common.Implementation(
    loss=_margin_loss, helpers=_margin_helpers, start=_margin_start, check=_margin_check
)
