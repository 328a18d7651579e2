"""DFA's distillation (Eqs. 3-4) and its aggregations (Table 5, DFA-T).

L = CE + gamma_fd * sum_i w_i D(F_s(S_i), A_i): A_i = sum_j alpha_i^j T_i^j is the teacher's
group-i aggregation with alpha frozen (beta = log(alpha) in the step's state); F_s is a per-group
ST connector (1x1 conv + BN, student -> teacher channels); D is overhaul's partial L2 with the
constant margin -1 by default; w_i = 1/2^(G-i). Where the teacher's group ends at a larger size
than the student's, A_i is average-pooled to the student's, as mdistiller's OFD pools its targets.
The run label names the aggregation (`distill.aggregation`): 'dfa' (this run's alpha.json),
'last', 'average', 'random' (seeded), 'file' (another run's alpha.json: DFA-T), and 'start', the
search's starting alpha unsearched (softmax of its initial beta): the control that separates
what the search found from the softened 'Last' it starts at.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from dfa_jax import alpha_file
from dfa_jax import config_lib
from dfa_jax import errors
from dfa_jax import features
from dfa_jax import files
from dfa_jax import losses
from dfa_jax import models
from dfa_jax.methods import common


def init_beta(teacher_model, init_last_logit: float) -> dict:
    """beta_i = zeros with the last map's logit raised: the 'Last' aggregation, softened (§3.4);
    where the search starts, and the 'start' aggregation's alpha (softmax of it)."""
    return {
        common.group_key(i + 1): jnp.zeros(len(names)).at[-1].set(init_last_logit)
        for i, names in enumerate(teacher_model.feature_groups())
    }


def aggregation_alpha(name: str, teacher_model, config, workdir: str) -> list[np.ndarray]:
    """Per group, the frozen alpha [N_i] of aggregation `name` (Table 5's rows)."""
    groups = teacher_model.feature_groups()
    if name == "last":
        return [np.eye(len(g), dtype=np.float32)[-1] for g in groups]
    if name == "average":
        return [np.full(len(g), 1.0 / len(g), np.float32) for g in groups]
    if name == "start":
        # Where the search begins: alpha_last 0.982 / 0.948 / 0.886 for 2 / 4 / 8 maps at 4.
        beta = init_beta(teacher_model, config.search.init_last_logit)
        return [np.asarray(jax.nn.softmax(b), np.float32) for b in beta.values()]
    if name == "random":
        rng = np.random.default_rng(config.seed)
        weights = [rng.uniform(size=len(g)).astype(np.float32) for g in groups]
        return [w / w.sum() for w in weights]
    if name == "dfa":
        return alpha_file.load(os.path.join(workdir, alpha_file.NAME), teacher_model)
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


def aggregation_source(name: str, config, workdir: str) -> dict:
    """Where aggregation `name`'s alpha comes from, as its students' results record it
    (`aggregation`): the alpha.json read ('dfa', 'file') with its sha256, the seed of 'random'
    (`config.seed`: the student's), the initial logit of 'start'."""
    if name in ("dfa", "file"):
        path = (
            os.path.join(workdir, alpha_file.NAME) if name == "dfa" else config.distill.alpha_file
        )
        # The file's bytes, as `sha256sum` gives them (text reads may translate newlines).
        digest = hashlib.sha256(epath.Path(path).read_bytes()).hexdigest()
        return {"kind": name, "file": files.absolute(path), "sha256": digest}
    if name == "random":
        return {"kind": name, "seed": int(config.seed)}
    if name == "start":
        return {"kind": name, "init_last_logit": float(config.search.init_last_logit)}
    return {"kind": name}


def group_alpha(beta: dict, key: str) -> jax.Array:
    """Group `key`'s alpha = softmax(beta): what the step aggregates with, and what a student's
    result records (`distill`), one computation for both."""
    return jax.nn.softmax(beta[key])


def frozen_beta(alpha: list[np.ndarray]) -> dict:
    """beta = log(alpha), so that softmax(beta) == alpha exactly (zeros -> -inf logits)."""
    return {common.group_key(i + 1): jnp.log(jnp.asarray(a)) for i, a in enumerate(alpha)}


def _stem(pair: common.Pair, config) -> bool:
    return common.with_stem(pair, config.distill.positions == "stem_and_groups")


def _helpers(pair, config, seed, mesh):
    return common.position_connectors(pair, config, seed, mesh, _stem(pair, config))


def _start(setup: common.Setup, start: common.Start) -> common.Start:
    alpha = aggregation_alpha(setup.label, setup.pair.teacher, setup.config, setup.workdir)
    # After the alpha: a missing or malformed alpha.json is reported by its checks.
    source = aggregation_source(setup.label, setup.config, setup.workdir)
    return dataclasses.replace(start, beta=frozen_beta(alpha), record={"aggregation": source})


def _loss(pair, config, constants):
    """CE + gamma_fd * D(connected student maps, the aggregations of softmax(beta))."""
    del constants
    distill = config.distill
    stem, clamp_min = _stem(pair, config), config.features.clamp_min
    connected = common.connected_maps(pair, stem)

    def term(step):
        mapped, t_pre = connected(step)
        _, t_mut = step.teacher()
        # The stem is one map: its target is that map itself.
        targets = [features.clamp(t_pre[0], clamp_min)] if stem else []
        for i, names in enumerate(pair.t_groups):
            candidates = [
                jax.lax.stop_gradient(features.clamp(m, clamp_min))
                for m in common.group_end_maps(t_mut, names)
            ]
            alpha = group_alpha(step.beta, common.group_key(i + 1))
            aggregated = losses.aggregate(candidates, alpha)
            # At the student's size where the teacher's group ends larger (`connected_maps`).
            targets.append(losses.adaptive_avg_pool(aggregated, mapped[len(targets)].shape[1:3]))
        fd = losses.feature_distillation_loss(
            mapped, targets, distance=distill.distance, margin=distill.margin
        )
        step.metrics["fd_loss"] = fd
        return step.ce + distill.gamma_fd * fd

    return common.student_loss(pair, config, term)


def _unweighable_groups(name: str) -> list[str]:
    """Why teacher `name`'s maps cannot be weighed into one sum per group (the search's and DFA's
    aggregation, Eq. 2), or nothing: the first group whose maps differ in shape
    (RepDistiller's MobileNetV2 widens its channels inside a group)."""
    if not models.is_valid_model_name(name):
        return []  # The model check names it.
    model = models.get_model(name, 10)  # The class count does not change the maps.
    for group, names in enumerate(model.feature_groups(), start=1):
        shapes = sorted({tuple(s[1:]) for s in features.shapes_of(model, names)})
        if len(shapes) > 1:
            listed = " and ".join("x".join(map(str, s)) for s in shapes)
            return [
                f"teacher.model = {name!r} cannot be aggregated: its group {group}'s maps are"
                f" {listed} (H x W x C), and alpha weighs a group's maps into one sum (the"
                " search's and every DFA aggregation's). Use it as a student, or with a method"
                f" other than {config_lib.AGGREGATIONS} and without 'search' in stages."
            ]
    return []


def _check(config) -> list[str]:
    """The `distill` fields of DFA and its aggregations; the 'file' and 'dfa' aggregations'
    inputs where a student uses them."""
    distill, problems = config.distill, []
    if distill.aggregation not in config_lib.AGGREGATIONS:
        problems.append(
            f"distill.aggregation = {distill.aggregation!r} is unknown; use one of"
            f" {config_lib.AGGREGATIONS}."
        )
    uses = tuple(config_lib.distill_labels(config))
    aggregates = "distill" in config.stages and any(u in config_lib.AGGREGATIONS for u in uses)
    if aggregates or "search" in config.stages:
        problems.extend(_unweighable_groups(config.teacher.model))
    # Read by a distillation only: a teacher-only run of a DFA-T config need not have it yet.
    if "distill" in config.stages and "file" in uses:
        if distill.alpha_file is None:
            problems.append(
                "distill.alpha_file is unset but the 'file' aggregation (distill.aggregation or"
                " distill.compare_with) reads it; pass"
                " --config.distill.alpha_file=OTHER_WORKDIR/alpha.json."
            )
        elif not files.is_remote(distill.alpha_file) and not os.path.isfile(distill.alpha_file):
            problems.append(
                f"distill.alpha_file = {distill.alpha_file!r} is not a file; give the alpha.json"
                " written by another run's search (OTHER_WORKDIR/alpha.json)."
            )
    if "distill" in config.stages and "dfa" in uses and "search" not in config.stages:
        problems.append(
            "distill.aggregation = 'dfa' needs this run's search: add 'search' to stages, or use"
            " 'file' with --config.distill.alpha_file=OTHER_WORKDIR/alpha.json."
        )
    if distill.distance not in ("partial_l2", "l2"):
        problems.append(f"distill.distance = {distill.distance!r}: use 'partial_l2' or 'l2'.")
    if distill.gamma_fd < 0:
        problems.append(
            f"distill.gamma_fd = {distill.gamma_fd}: must be >= 0 (default 1e-3: the paper"
            " gives none; overhaul's and the authors' MarginReLU weight)."
        )
    if distill.positions not in ("groups", "stem_and_groups"):
        problems.append(
            f"distill.positions = {distill.positions!r}: use 'groups' or 'stem_and_groups'."
        )
    elif distill.positions == "stem_and_groups":
        roles = ("teacher", "student")
        families = [models.family_of(config[role].model) for role in roles]
        for role, family in zip(roles, families):
            if None not in families and not family.has_stem:
                problems.append(
                    f"distill.positions = 'stem_and_groups' with {role}.model ="
                    f" {config[role].model!r}: a {family.name} has no stem outside its groups"
                    f" (only {', '.join(f.name for f in models.FAMILIES if f.has_stem)} have"
                    " one); use 'groups'."
                )
    return problems


DFA = common.Implementation(loss=_loss, helpers=_helpers, start=_start, check=_check)
