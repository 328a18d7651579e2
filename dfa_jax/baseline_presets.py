"""Whose settings the baselines run with: RepDistiller's ('peers', the default) or the authors'.

`baselines.preset = 'authors'` runs KD, AT, SP and Margin as the DFA authors' own baseline code
does (github.com/PkuDavidGuan/Distillation, the code of the paper's first author, commit c2c0316):

* positions: a WRN's stem and its three group ends (`framework/modeling/backbone/wrn.py` returns
  `[g0, g1, g2, g3]` to every method), weighted 1/8, 1/4, 1/2, 1 where a method weighs them; a
  ShuffleNetV2's five groups (stem, stages 2-4, conv5: `shufflenetV2.py`'s `prime_idx`). Table
  4's AT, SP and Margin columns (CINIC-10, ShuffleNetV2) are theirs: run them under 'authors'.
  Under 'peers' a ShuffleNetV2's AT reads every group, stem included, and SP the last (conv5):
  RepDistiller's rule applied to a network RepDistiller does not have;
* KD: `alpha * CE + (1 - alpha) * T^2 * soft-CE` with alpha 0.8 (`--alpha` default,
  `framework/losses/kd_loss.py`) and T = 4 on CIFAR-100 (the `scripts/cifar100.*.kd.sh` pass
  `--temperature 4`), 16 elsewhere (the `scripts/cinic10.*.kd.sh` pass `--temperature 16`,
  `train.py`'s default); their soft cross-entropy differs from the KL here by the teacher's
  entropy, a constant;
* AT: p = 1 (the attention map is the plain channel sum, `framework/losses/at_loss.py`), every
  position, weight beta / 2 = 30 (`self.beta = 60`), on the maps their script gave: the pre-ReLU
  maps (the consuming BNs' outputs) for WRN_28_4 -> WRN_16_2, whose
  `scripts/cifar100.wrn_28_4_16_2.at.sh` alone passes `--preReLU`; the raw residual stream for
  the other pairs (`wrn.py`'s `forward` without it; a ShuffleNetV2's two are the same maps).
  Their `normalize` broadcasts one sample's norm over the batch; here each sample's map is
  normalised by its own norm, the method as published;
* SP: every position's raw output (no SP script passes `--preReLU`), gamma = 3000
  (`framework/losses/similarity_loss.py`);
* Margin: every position pre-ReLU with the teacher's BN margins, alpha = 1e-3
  (`framework/losses/margin_ReLU_loss.py`, scripts with `--preReLU`), the teacher in eval mode
  as for every method there (`train.py`: `model.model_t.eval()`).

Their code has no FitNets, FT, AB or Jacobian; those keep RepDistiller's settings under either
preset. The configs' own fields hold the peers' values; `settings(config)` is the one place that
resolves what a run uses, and `conflicts(config)` names a field set against the chosen preset.
"""

from __future__ import annotations

import dataclasses

PRESETS = ("peers", "authors")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The numbers and positions a run's KD, AT, SP and Margin use."""

    kd_temperature: float
    kd_weight: float
    kd_ce_weight: float
    at_weight: float
    at_p: int
    at_maps: str  # 'raw' (the residual stream, RepDistiller's) or 'pre_relu'.
    sp_weight: float
    sp_every_position: bool  # False: the last group end only (RepDistiller's feat[-2]).
    margin_gamma: float
    margin_teacher_bn: str  # 'batch' (overhaul's) or 'eval'.
    with_stem: bool  # AT, SP and Margin also read a WRN's stem.


# The authors' values, by config field (see the module docstring for where each comes from).
AUTHORS = {
    "kd_weight": 0.2,
    "kd_ce_weight": 0.8,
    "at_weight": 30.0,
    "sp_weight": 3000.0,
    "margin_gamma": 1e-3,
    "margin_teacher_bn": "eval",
}
# The one pair (teacher, student) whose AT script passes `--preReLU`.
AUTHORS_AT_PRE_RELU = (("wrn_28_4", "wrn_16_2"),)


def authors_values(config) -> dict:
    """The config fields the 'authors' preset sets for `config`'s dataset."""
    temperature = 4.0 if config.data.dataset == "cifar100" else 16.0
    return {"kd_temperature": temperature, **AUTHORS}


def settings(config) -> Settings:
    """What `config`'s baselines run with under its `baselines.preset`."""
    base = config.baselines
    authors = base.preset == "authors"
    values = {field: base[field] for field in ("kd_temperature", *AUTHORS)}
    at_maps = "raw"
    if authors:
        values.update(authors_values(config))
        pair = (config.teacher.model, config.student.model)
        at_maps = "pre_relu" if pair in AUTHORS_AT_PRE_RELU else "raw"
    return Settings(
        **values,
        at_p=1 if authors else 2,
        at_maps=at_maps,
        sp_every_position=authors,
        with_stem=authors,
    )


def conflicts(config, defaults) -> list[str]:
    """Config problems: a field the 'authors' preset sets, given a value other than its default
    (`defaults` is `base_config()`) and other than the preset's, would be silently overridden.
    The preset's own value (the authors' numbers copied beside it) agrees with it."""
    base = config.baselines
    if base.preset != "authors":
        return []
    return [
        f"baselines.{field} = {base[field]} is set, but baselines.preset = 'authors' sets it to "
        f"{value} (the DFA authors' code); drop one of the two."
        for field, value in authors_values(config).items()
        if base[field] != defaults.baselines[field] and base[field] != value
    ]
