"""The built-in models' names for their sown maps, and the contract methods that list them.

Every built-in model names its maps the same way: 'g{group}_b{block}' for a block's pre-ReLU
output (its group's candidates, the last one the group boundary), 'g{group}_out' for a group's raw
output where it differs from the boundary (a ReLU or a BN between them), and 'stem' / 'stem_out'
for a stem outside the groups (its pre-ReLU map, then its raw output). A model says how many maps
each group has (`maps_per_group`), whether it has such a stem (`has_stem`) and whether its raw
group ends are its boundaries (`raw_is_pre`); `GroupNames` derives the feature contract's naming
methods (`models.FeatureModel`) from those three.
"""

from __future__ import annotations

import flax.linen as nn


class GroupNames:
    """Mixin for a Linen module: the contract's naming methods from `maps_per_group`.

    The module defines `maps_per_group` (a tuple of ints, one per group: how many candidate maps
    the group has, usually one per block), and may override `has_stem` (False: no stem outside the
    groups) and `raw_is_pre` (True: nothing between a group's boundary and its raw output).
    """

    has_stem = True
    raw_is_pre = False

    @property
    def num_groups(self) -> int:
        return len(self.maps_per_group)

    @nn.nowrap
    def feature_groups(self) -> tuple[tuple[str, ...], ...]:
        """Per group, the names of its candidate maps in forward order (last = boundary)."""
        return tuple(
            tuple(f"g{g}_b{j}" for j in range(1, n + 1))
            for g, n in enumerate(self.maps_per_group, start=1)
        )

    @nn.nowrap
    def stem_features(self) -> tuple[str, str] | None:
        """(pre-ReLU, raw) names of the stem's maps, or None where the stem is a group."""
        return ("stem", "stem_out") if self.has_stem else None

    @nn.nowrap
    def raw_group_ends(self) -> tuple[str, ...]:
        """Per group, the name of its raw output (what a consuming BN or the next group reads)."""
        if self.raw_is_pre:
            return tuple(names[-1] for names in self.feature_groups())
        return tuple(f"g{g}_out" for g in range(1, self.num_groups + 1))

    @nn.nowrap
    def extra_feature_names(self) -> tuple[str, ...]:
        """Sown names outside every group: the stem's, and the raw ends that are not boundaries."""
        raw = () if self.raw_is_pre else self.raw_group_ends()
        return (self.stem_features() or ()) + raw
