"""Stage 1: the group-wise differentiable aggregation search with the bridge loss (§3.2).

For each teacher layer group i (Algorithm 1), `search.epochs_per_group` epochs of the bilevel step:
beta_i on a validation batch, then w (student + ST/TS connectors) on a training batch, both with the
bridge loss of group i (Eq. 12):
- ST path: student groups 1..i -> S_i -> ST connector -> L_ST against A_i = sum_j alpha_j T_i^j;
- TS path: A_i -> TS connector -> injected at the student's group-i boundary -> groups i+1..G ->
  head -> L_TS (cross-entropy).
The teacher runs only up to group i, in eval mode, under stop_gradient. Only beta_i moves while
group i is searched, and of w only the student and group i's connectors (weight decay and momentum
leave the other groups' connectors exactly as they are); w carries over from group to group. Each
group is a sub-stage of the shared loop (`WORKDIR/search/g{i}`), so the search resumes mid-group
like any stage. A group of one map (ShuffleNetV2's stem and conv5) has alpha = 1 whatever beta
is: it runs its w steps only, with no beta half and no validation batches. Each group's end logs
one line (`group_movement`): alpha and its entropy from start to end, the last map's lead
(what sets alpha), the mean pushes of the bridge loss and of the L2 on it, and whether alpha
settled (`group_dynamics`, also in `search/result.json`). Each epoch evaluates the group's
teacher-to-student path on the test split (`BridgeLogits`).
Outputs: `WORKDIR/alpha.json`, `WORKDIR/search/alpha_history.json` and the PNG plots.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from dfa_jax import alpha_file
from dfa_jax import bilevel
from dfa_jax import evaluation
from dfa_jax import features
from dfa_jax import files
from dfa_jax import inputs
from dfa_jax import losses
from dfa_jax import methods
from dfa_jax import models
from dfa_jax import optimizers
from dfa_jax import parallel
from dfa_jax import reporting
from dfa_jax import teacher as teacher_lib
from dfa_jax import train_loop
from dfa_jax.data import loader

ALPHA_FILE = alpha_file.NAME


def alpha_of(beta) -> dict:
    """`{group: softmax(beta_group)}`: the aggregation weights (Eq. 6)."""
    return {k: jax.nn.softmax(v) for k, v in beta.items()}


init_beta = methods.init_beta  # The search's start (the 'start' aggregation's beta).


def teacher_group_maps(teacher_model, teacher_vars, images, group: int, clamp_min):
    """The clamped, gradient-free candidate maps of teacher group `group` (the teacher on its
    running BN statistics): N x [B, H, W, C]."""
    _, mutated = teacher_model.apply(
        teacher_vars, images, train=False, stop_group=group, mutable=[models.FEATURES]
    )
    maps = features.read(mutated, teacher_model.feature_groups()[group - 1])
    return [jax.lax.stop_gradient(features.clamp(m.astype(jnp.float32), clamp_min)) for m in maps]


def group_aggregation(teacher_model, teacher_vars, images, group, clamp_min, size, beta):
    """A_i [B, h, w, C] of the bridge loss: teacher group `group`'s maps (`teacher_group_maps`),
    average-pooled to the student's `size` (h, w) where they end larger, weighted by
    softmax(`beta` [N]). Also its maps, N x [B, h, w, C]. (Pooling and aggregating commute, so
    both connectors work at the student's size.)"""
    maps = teacher_group_maps(teacher_model, teacher_vars, images, group, clamp_min)
    maps = [losses.adaptive_avg_pool(m, size) for m in maps]
    return losses.aggregate(maps, jax.nn.softmax(beta)), maps


@dataclasses.dataclass(frozen=True)
class BridgeLogits:
    """Group `group`'s teacher-to-student path in eval mode, `(variables, images) -> logits`:
    the teacher's maps of the group aggregated with softmax(beta), the TS connector, then the
    student from the group's boundary to its head. `variables`: {'teacher', 'ts' (the group's
    connector's params and batch_stats), 'student', 'beta' (the group's)}.

    The search's test accuracy: what the bridge loss's TS term trains. (The student's own
    forward is no measure of the search: its groups up to i learn only the ST term's mimicry,
    its later ones to read the connector's output, so it scores about chance.)"""

    teacher_model: Any
    student_model: Any
    group: int
    clamp_min: float | None

    def __call__(self, variables, images):
        s_shape = features.group_shapes(self.student_model)[self.group - 1]
        aggregated, _ = group_aggregation(
            self.teacher_model,
            variables["teacher"],
            images,
            self.group,
            self.clamp_min,
            s_shape[1:3],
            variables["beta"],
        )
        connector = models.Connector(s_shape[-1], dtype=self.student_model.dtype)
        ts_in = connector.apply(variables["ts"], aggregated, train=False)
        return self.student_model.apply(
            variables["student"], ts_in, train=False, start_group=self.group
        )


def make_bridge_loss_fn(teacher_model, student_model, group: int, config):
    """The bridge loss of `group` (Eq. 12) as a w loss `(params, batch_stats, beta, batch, rng,
    aux=teacher variables) -> (loss, (batch_stats, metrics))`; also the beta loss (on val)."""
    key = methods.group_key(group)
    s_shape = features.group_shapes(student_model)[group - 1]
    s_channels, s_hw = s_shape[-1], s_shape[1:3]
    t_channels = features.group_shapes(teacher_model)[group - 1][-1]
    st_connector = models.Connector(t_channels, dtype=student_model.dtype)
    ts_connector = models.Connector(s_channels, dtype=student_model.dtype)

    def loss_fn(params, batch_stats, beta, batch, rng, aux, beta_diagnostics=False):
        del rng
        images, labels = batch["image"], batch["label"]
        aggregated, maps = group_aggregation(
            teacher_model, aux, images, group, config.features.clamp_min, s_hw, beta[key]
        )

        # ST path: student groups 1..i, then the student transform to the teacher's channels.
        student_vars = {"params": params["student"], "batch_stats": batch_stats["student"]}
        s_i, s_mut = student_model.apply(
            student_vars, images, train=True, stop_group=group, mutable=["batch_stats"]
        )
        st_out, st_mut = st_connector.apply(
            {"params": params["st"][key], "batch_stats": batch_stats["st"][key]},
            s_i,
            train=True,
            mutable=["batch_stats"],
        )
        # TS path: the aggregation, transformed to the student's channels, resumes the student.
        ts_in, ts_mut = ts_connector.apply(
            {"params": params["ts"][key], "batch_stats": batch_stats["ts"][key]},
            aggregated,
            train=True,
            mutable=["batch_stats"],
        )
        logits, s_mut = student_model.apply(
            {"params": params["student"], "batch_stats": s_mut["batch_stats"]},
            ts_in,
            train=True,
            start_group=group,
            mutable=["batch_stats"],
        )
        logits, st_out = logits.astype(jnp.float32), st_out.astype(jnp.float32)
        loss = losses.bridge_loss(
            st_out, aggregated, logits, labels, config.search.gamma_st, config.search.gamma_ts
        )
        # Its terms for the records (the compiler computes each once).
        st, ts = losses.st_loss(st_out, aggregated), losses.ts_loss(logits, labels)
        new_batch_stats = {
            "student": s_mut["batch_stats"],
            "st": {**batch_stats["st"], key: st_mut["batch_stats"]},
            "ts": {**batch_stats["ts"], key: ts_mut["batch_stats"]},
        }
        metrics = {
            "st_loss": st,
            "ts_loss": ts,
            "ts_accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        }
        if beta_diagnostics:
            # What moves beta: the ST part's gradient (cheap: the student's output does not
            # depend on beta; the step derives the TS part's from the total) and the pull of the
            # coupled L2 toward beta = 0, i.e. uniform alpha ('Average'), per map.
            # Every input under stop_gradient: the beta step's own differentiation then sees
            # constants here and does not trace this gradient's derivative.
            st_out_fixed = jax.lax.stop_gradient(st_out)
            beta_fixed = jax.lax.stop_gradient(beta[key])
            metrics[bilevel.BETA_GRAD_ST] = jax.grad(
                lambda b: (
                    config.search.gamma_st
                    * losses.st_loss(st_out_fixed, losses.aggregate(maps, jax.nn.softmax(b)))
                )
            )(beta_fixed)
            for j, b in enumerate(beta_fixed):
                metrics[f"beta_l2_pull/{j}"] = config.search.beta_weight_decay * jnp.abs(b)
                # With its sign, as `beta_grad_signed`: positive lowers beta_j.
                metrics[f"beta_l2_grad/{j}"] = config.search.beta_weight_decay * b
        return loss, (new_batch_stats, metrics)

    def beta_loss_fn(beta, params, batch_stats, batch, rng, aux):
        # The same bridge loss on the validation batch; its BN statistics are not kept.
        loss, (_, metrics) = loss_fn(
            params, batch_stats, beta, batch, rng, aux, beta_diagnostics=True
        )
        return loss, metrics

    return loss_fn, beta_loss_fn


def beta_optimizer(search) -> optax.GradientTransformation:
    """Adam(lr, b1 0.5, b2 0.999) with *coupled* L2 = the paper's lambda R(beta) (DARTS' architect)."""
    return optax.chain(
        optax.add_decayed_weights(search.beta_weight_decay),
        optax.scale_by_adam(b1=search.beta_b1, b2=search.beta_b2),
        optax.scale(-search.beta_lr),
    )


def w_optim(search, num_groups: int) -> ml_collections.ConfigDict:
    """w's recipe during the search: SGD + momentum, a cosine over all groups' epochs
    (`search.w_schedule='global'`) or over each group's (`'per_group'`, see `w_lr_schedule`)."""
    optim = ml_collections.ConfigDict()
    per_group = search.w_schedule == "per_group"
    optim.epochs = search.epochs_per_group * (1 if per_group else num_groups)
    optim.batch_size = search.batch_size
    optim.lr = search.w_lr
    optim.momentum = search.w_momentum
    optim.nesterov = False
    optim.weight_decay = search.w_weight_decay
    optim.schedule = "cosine"
    optim.milestones = ()
    optim.decay = 1.0
    return optim


def w_lr_schedule(search, num_groups: int, steps_per_epoch: int) -> optax.Schedule:
    """w's learning rate at a step counted from the start of the whole search: one cosine over
    every group's steps ('global'), or the same cosine restarted for each group ('per_group')."""
    cosine = optimizers.lr_schedule(w_optim(search, num_groups), steps_per_epoch)
    if search.w_schedule == "global":
        return cosine
    steps_per_group = search.epochs_per_group * steps_per_epoch
    return lambda step: cosine(step % steps_per_group)


def w_trainable(params: dict, group: int) -> dict:
    """True for what group `group`'s search trains: the student and that group's connectors."""
    key = methods.group_key(group)
    # Paths are ('student', ...) or ('st' | 'ts', 'g<i>', ...).
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path[0].key == "student" or path[1].key == key, params
    )


def alpha_record(teacher_model, beta) -> list[dict]:
    """alpha.json's content: per group, the teacher feature names, beta and alpha."""
    alpha = alpha_of(beta)
    return [
        {
            "group": i + 1,
            "layers": list(names),
            "beta": [float(b) for b in jax.device_get(beta[methods.group_key(i + 1)])],
            "alpha": [float(a) for a in jax.device_get(alpha[methods.group_key(i + 1)])],
        }
        for i, names in enumerate(teacher_model.feature_groups())
    ]


def group_dynamics(start: dict, end: dict, rows: list[dict]) -> dict:
    """How a group's search moved alpha and what moved it; {} for a group of one map.

    `start` and `end` are the group's `alpha_record` entries, `rows` its metrics.jsonl (train
    rows and epoch rows). Softmax ignores a shift shared by all betas, so what sets alpha is the
    *last map's lead*, beta_last - mean(other betas) (for two maps, the logit gap). Returns:
    - `alpha_start`, `alpha_end`; `last_map_lead`: [start, end];
    - `lead_push_loss` / `lead_push_l2`: the mean over the group's steps of the descent direction
      on the lead of the bridge loss's gradient (`train/beta_grad_signed/j`) and of the L2's
      (`train/val/beta_l2_grad/j`): positive raises the lead (toward 'Last'); the L2's always
      points toward 0, uniform alpha ('Average'). Adam rescales their sum per beta, so they
      say which force is the larger and where each points, not the step's size;
    - `alpha_change`: the largest |alpha_j change| from start to end; `last_epoch_alpha_change`:
      the same over the last epoch; `settled`: the last epoch moved alpha no more than an
      epoch's share of the whole change (a search still moving, or zig-zagging, is not)."""
    if len(start["alpha"]) < 2:
        return {}
    beta0, beta1 = np.asarray(start["beta"]), np.asarray(end["beta"])
    alpha0, alpha1 = np.asarray(start["alpha"]), np.asarray(end["alpha"])

    def lead(x: np.ndarray) -> float:
        return float(x[-1] - x[:-1].mean())

    out = {
        "alpha_start": alpha0.tolist(),
        "alpha_end": alpha1.tolist(),
        "last_map_lead": [lead(beta0), lead(beta1)],
        "alpha_change": float(np.abs(alpha1 - alpha0).max()),
    }
    n, prefix = len(alpha0), f"alpha/g{end['group']}/"
    train = [r for r in rows if "epoch" not in r and "train/beta_grad_signed/0" in r]
    if train and f"train/val/beta_l2_grad/{n - 1}" in train[0]:
        # A row holds the mean of the steps since the previous one (the first: since step 0).
        weights = np.diff([r["step"] for r in train], prepend=0)

        def mean(name: str) -> np.ndarray:
            return np.array(
                [np.average([r[f"{name}/{j}"] for r in train], weights=weights) for j in range(n)]
            )

        out["lead_push_loss"] = -lead(mean("train/beta_grad_signed"))
        out["lead_push_l2"] = -lead(mean("train/val/beta_l2_grad"))
    epochs = [r for r in rows if "epoch" in r and f"{prefix}0" in r]
    if epochs:
        before = [epochs[-2][f"{prefix}{j}"] for j in range(n)] if len(epochs) > 1 else alpha0
        last = float(np.abs(alpha1 - np.asarray(before)).max())
        out["last_epoch_alpha_change"] = last
        out["settled"] = last <= out["alpha_change"] / len(epochs)
    return out


def group_movement(start: dict, end: dict, dynamics: dict) -> str:
    """One line on a group's search: alpha and its normalised entropy (1 = 'Average', 0 = one
    map) from start to end, the last map's lead, the forces on it and whether alpha settled
    (`group_dynamics`)."""

    def entropy(alpha) -> str:
        return f"{float(bilevel.normalised_entropy(jnp.asarray(alpha))):.3f}"

    def joined(values, fmt) -> str:
        return "/".join(format(v, fmt) for v in values)

    if len(start["alpha"]) < 2:
        return f"g{end['group']}: one map, alpha = 1 (nothing to search)"
    d = dynamics
    line = (
        f"g{end['group']}: alpha {joined(start['alpha'], '.3f')} -> {joined(end['alpha'], '.3f')}"
        f" (entropy {entropy(start['alpha'])} -> {entropy(end['alpha'])}); the last map's lead"
        f" beta_last - mean(others) {d['last_map_lead'][0]:.3f} -> {d['last_map_lead'][1]:.3f}"
    )
    if "lead_push_loss" in d:
        loss, l2 = d["lead_push_loss"], d["lead_push_l2"]
        larger = "the bridge loss" if abs(loss) > abs(l2) else "the L2"
        line += (
            f"; mean push on the lead: bridge loss {loss:+.2e} (toward"
            f" {'the last map' if loss > 0 else 'the others'}), L2 {l2:+.2e} (toward"
            f" 'Average'): {larger} the larger"
        )
    if "settled" in d:
        line += (
            f"; the last epoch moved alpha by {d['last_epoch_alpha_change']:.4f}, the whole"
            f" group by {d['alpha_change']:.4f}: {'settled' if d['settled'] else 'still moving'}"
        )
    return line


def alpha_record_from_file(path: str) -> list[dict]:
    return files.read_json(path)["groups"]


def _metrics_rows(directory: str) -> list[dict]:
    """A sub-stage's metrics.jsonl rows; none where this process has no such file (only process
    0 writes it)."""
    path = os.path.join(directory, "metrics.jsonl")
    if not files.exists(path):
        return []
    return [json.loads(line) for line in files.read_text(path).splitlines() if line.strip()]


def _alpha_history(directory: str, start: list[dict]) -> list[dict]:
    """Per group, its alpha and beta at the start (epoch 0, `start` = `alpha_record` of the
    initial beta) and after every searched epoch, from the sub-stages' metrics.jsonl: every row
    `{'group', 'epoch', 'alpha/g<i>/<j>'..., 'beta/g<i>/<j>'...}`."""
    history = []
    for i, first in enumerate(start, start=1):
        keys = [
            f"{kind}/g{i}/{j}" for kind in ("alpha", "beta") for j in range(len(first["alpha"]))
        ]
        history.append(
            {"group": i, "epoch": 0, **dict(zip(keys, [*first["alpha"], *first["beta"]]))}
        )
        for row in _metrics_rows(os.path.join(directory, methods.group_key(i))):
            if "epoch" in row:
                history.append(
                    {"group": i, "epoch": row["epoch"], **{k: row[k] for k in keys if k in row}}
                )
    return history


def init_search_variables(teacher_model, student_model, config, mesh) -> tuple[dict, dict]:
    """The search's w: a fresh student and the ST/TS connectors of every group, replicated.

    Returns `(params, batch_stats)`, each `{'student': ..., 'st': ..., 'ts': ...}`.
    """
    t_shapes = features.group_shapes(teacher_model)
    s_shapes = features.group_shapes(student_model)
    dtype = jnp.dtype(config.dtype)
    student_vars = teacher_lib.init_variables(student_model, config.seed, mesh)
    st_params, st_stats = methods.connector_helpers(
        s_shapes, [s[-1] for s in t_shapes], config.seed + 100, mesh, dtype
    )
    ts_params, ts_stats = methods.connector_helpers(
        t_shapes, [s[-1] for s in s_shapes], config.seed + 200, mesh, dtype
    )
    params = {"student": student_vars["params"], "st": st_params, "ts": ts_params}
    batch_stats = {"student": student_vars["batch_stats"], "st": st_stats, "ts": ts_stats}
    return params, batch_stats


@dataclasses.dataclass
class Search:
    """What every group's search shares: the models, the w and beta optimizers and w's schedule,
    and the step-0 state (student, every group's connectors, beta)."""

    teacher_model: Any
    student_model: Any
    num_groups: int
    w_tx: optax.GradientTransformation
    beta_tx: optax.GradientTransformation
    schedule: Callable[[int], Any]  # w's learning rate at the optimizer's step count.
    steps_per_epoch: int
    batch_size: int
    state: bilevel.TrainState  # Step 0, replicated on the mesh.


def build(config, mesh, data: inputs.RunData) -> Search:
    """The search's shared parts, built without reading or writing a file."""
    num_classes = data.info.num_classes
    teacher_model = teacher_lib.build_model(config.teacher.model, num_classes, config.dtype)
    student_model = teacher_lib.build_model(config.student.model, num_classes, config.dtype)
    num_groups = len(teacher_model.feature_groups())
    params, batch_stats = init_search_variables(teacher_model, student_model, config, mesh)
    optim = w_optim(config.search, num_groups)
    steps_per_epoch = loader.steps_per_epoch(len(data.search_train.labels), optim.batch_size)
    # The optimizer's step count runs on over all groups, which the schedule restarts or not.
    schedule = w_lr_schedule(config.search, num_groups, steps_per_epoch)
    w_tx = optimizers.sgd(optim, steps_per_epoch, schedule)
    beta_tx = beta_optimizer(config.search)
    beta0 = init_beta(teacher_model, config.search.init_last_logit)
    state = jax.jit(
        lambda p, b: bilevel.create_state(p, b, w_tx, beta0, beta_tx),
        out_shardings=parallel.replicated(mesh),
    )(params, batch_stats)
    return Search(
        teacher_model=teacher_model,
        student_model=student_model,
        num_groups=num_groups,
        w_tx=w_tx,
        beta_tx=beta_tx,
        schedule=schedule,
        steps_per_epoch=steps_per_epoch,
        batch_size=optim.batch_size,
        state=state,
    )


def build_group_stage(
    search: Search,
    config,
    mesh,
    data: inputs.RunData,
    directory: str,
    group: int,
    state,
    teacher_vars=None,
) -> train_loop.Stage:
    """Group `group`'s search as the loop runs it, from `state` (the previous group's end, or
    `search.state`): its bilevel step (beta_group on val batches, the student and this group's
    connectors on train batches) and, given `teacher_vars`, the test accuracy of its
    teacher-to-student path (`BridgeLogits`), built without reading or writing a file."""
    loss_fn, beta_loss_fn = make_bridge_loss_fn(
        search.teacher_model, search.student_model, group, config
    )
    # A group of one map (ShuffleNetV2's stem and conv5) has alpha = 1 whatever beta is: its
    # beta half would cost a forward and backward per step for a zero gradient (and let the L2
    # move a beta that means nothing). Its w steps, Algorithm 1's, still run.
    searched = len(search.teacher_model.feature_groups()[group - 1]) > 1
    step = bilevel.make_bilevel_step(
        loss_fn,
        search.w_tx,
        seed=config.seed,
        beta_loss_fn=beta_loss_fn if searched else None,
        beta_tx=search.beta_tx if searched else None,
        beta_key=methods.group_key(group) if searched else None,
        order=config.search.order,
        preprocess_fn=inputs.make_train_preprocess(config.data, data.info),
        w_trainable=w_trainable(search.state.params, group),
    )

    key = methods.group_key(group)

    def alpha_scalars(state, epoch):
        # This group's alone: the others' stay as they are while it is searched.
        del epoch
        beta, alpha = jax.device_get((state.beta[key], alpha_of(state.beta)[key]))
        return {
            **{f"alpha/{key}/{j}": float(a) for j, a in enumerate(alpha)},
            **{f"beta/{key}/{j}": float(b) for j, b in enumerate(beta)},
        }

    eval_fn = None
    if teacher_vars is not None:
        bridge = BridgeLogits(
            search.teacher_model, search.student_model, group, config.features.clamp_min
        )
        evaluate = evaluation.make_eval_fn(bridge, config, data, mesh)

        def eval_fn(s):
            return evaluate(
                {
                    "teacher": teacher_vars,
                    "ts": {"params": s.params["ts"][key], "batch_stats": s.batch_stats["ts"][key]},
                    "student": {
                        "params": s.params["student"],
                        "batch_stats": s.batch_stats["student"],
                    },
                    "beta": s.beta[key],
                }
            )

    group_steps = config.search.epochs_per_group * search.steps_per_epoch
    offset = (group - 1) * group_steps
    return train_loop.Stage(
        name=f"search/{methods.group_key(group)}",
        directory=os.path.join(directory, methods.group_key(group)),
        state=state,
        step_fn=parallel.jit_step(step, mesh),
        eval_fn=eval_fn,
        train_data=data.search_train,
        val_data=data.search_val if searched else None,
        epochs=config.search.epochs_per_group,
        batch_size=search.batch_size,
        seed=config.seed,
        aux=teacher_vars,
        lr_fn=lambda s: search.schedule(s + offset),
        epoch_end_fn=alpha_scalars,
        # The ETA: the whole search's, the later groups at this one's speed (they run more of
        # the teacher: it reads low until the last group).
        steps_after=(search.num_groups - group) * group_steps,
        data_steps_before=offset,
        eval_label="teacher-to-student path test accuracy",
    )


def run(config, workdir: str, mesh, data: inputs.RunData, teacher_vars) -> dict:
    """Searches the aggregation weights of every group; returns the result with `alpha`.

    The result's `ts_path_best_accuracy` / `ts_path_last_accuracy` are the last group's
    teacher-to-student path's (`BridgeLogits`); `by_group` has every group's, with its steps,
    time and `group_dynamics`, keyed 'g1', 'g2', ...; `steps` and `wall_time_s` are the whole
    search's."""
    directory = os.path.join(workdir, "search")
    if train_loop.is_done(directory):
        return train_loop.read_result(directory)
    search = build(config, mesh, data)
    teacher_model, num_groups, state = search.teacher_model, search.num_groups, search.state
    logging.info(
        "[search] alpha at the start (softmax of beta = 0, last map's logit %g):\n%s",
        config.search.init_last_logit,
        reporting.alpha_table(alpha_record(teacher_model, state.beta)),
    )

    start = alpha_record(teacher_model, state.beta)
    result, by_group = {}, {}
    for group in range(1, num_groups + 1):
        stage = build_group_stage(search, config, mesh, data, directory, group, state, teacher_vars)
        result = train_loop.run(stage, config, mesh)
        state = result.pop("state")
        end = alpha_record(teacher_model, state.beta)[group - 1]
        dynamics = group_dynamics(start[group - 1], end, _metrics_rows(stage.directory))
        by_group[methods.group_key(group)] = {
            **{k: result[k] for k in ("steps", "wall_time_s", "best_epoch")},
            "ts_path_best_accuracy": result["best_accuracy"],
            "ts_path_last_accuracy": result["last_accuracy"],
            **dynamics,
        }
        logging.info("[search] %s", group_movement(start[group - 1], end, dynamics))

    record = alpha_record(teacher_model, state.beta)
    logging.info("[search] alpha at the end:\n%s", reporting.alpha_table(record))
    files.write_json_atomic(
        os.path.join(workdir, ALPHA_FILE), {"teacher": config.teacher.model, "groups": record}
    )
    if jax.process_index() == 0:  # Only process 0 writes metrics.jsonl, the history's source.
        history = _alpha_history(directory, start)
        files.write_json_atomic(os.path.join(directory, "alpha_history.json"), history)
        reporting.plot_alpha_heatmap(record, os.path.join(workdir, "alpha_heatmap.png"), start)
        reporting.plot_alpha_trajectories(
            history, record, os.path.join(directory, "alpha_trajectories.png")
        )
    summary = {
        "stage": "search",
        "seed": config.seed,
        "groups": num_groups,
        "epochs_per_group": config.search.epochs_per_group,
        "steps": sum(g["steps"] for g in by_group.values()),
        "wall_time_s": sum(g["wall_time_s"] for g in by_group.values()),
        "alpha": {methods.group_key(r["group"]): r["alpha"] for r in record},
        # The test accuracy of the last group's teacher-to-student path (`BridgeLogits`): its
        # best epoch within that group, and its last. Every group's, with how alpha moved and
        # what moved it (`group_dynamics`), are in `by_group`.
        "ts_path_best_accuracy": result["best_accuracy"],
        "ts_path_last_accuracy": result["last_accuracy"],
        "by_group": by_group,
    }
    files.write_json_atomic(os.path.join(directory, train_loop.RESULT_FILE), summary)
    parallel.sync("search: alpha.json written")  # Every process's distillation reads it next.
    return summary
