"""`percentile` (FQ-ViT's observer; card: methods/percentile.md)."""

from __future__ import annotations

from ptqbench.methods.base import METHODS
from ptqbench.methods.ranges import RangeSettingMethod


@METHODS.register("percentile")
class Percentile(RangeSettingMethod):
    """Activations: 0.001th / 99.999th percentiles, EMA (momentum 0.01) over images. Weights: per-channel min/max."""

    name = "percentile"
    weight_observer = "minmax"
    activation_observer = "percentile"
