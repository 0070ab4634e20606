"""`mse` (Lp clipping search, p = 2.4) and `omse` (FQ-ViT's L2 grid), methods.md section 2."""

from __future__ import annotations

from ptqbench.methods.base import METHODS, RangeSettingMethod


@METHODS.register("mse")
class Mse(RangeSettingMethod):
    """Weights: per-channel 2-D grid search. Activations: per-tensor bounded search, averaged over images."""

    name = "mse"
    weight_observer = "mse"
    activation_observer = "mse"


@METHODS.register("omse")
class Omse(RangeSettingMethod):
    """Activations: OMSE grid of 90 shrunken ranges (p = 2). Weights: per-channel min/max."""

    name = "omse"
    weight_observer = "minmax"
    activation_observer = "omse"
