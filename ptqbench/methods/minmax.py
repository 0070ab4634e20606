"""`minmax` and its AvgMinMax option `minmax-avg` (card: methods/minmax.md)."""

from __future__ import annotations

from ptqbench.methods.base import METHODS
from ptqbench.methods.ranges import RangeSettingMethod


@METHODS.register("minmax")
class MinMax(RangeSettingMethod):
    """Weights: per-channel min/max. Activations: running global min/max over all calibration forwards."""

    name = "minmax"
    weight_observer = "minmax"
    activation_observer = "minmax"


@METHODS.register("minmax-avg", aliases=("avgminmax",))
class AvgMinMax(RangeSettingMethod):
    """PTQ4SAM's default activation observer: the mean of per-image minima and maxima."""

    name = "minmax-avg"
    weight_observer = "minmax"
    activation_observer = "avgminmax"
