"""`mse` (Lp clipping search, p = 2.4) and `omse` (FQ-ViT's L2 grid); card: methods/mse.md."""

from __future__ import annotations

from ptqbench.methods.base import METHODS
from ptqbench.methods.ranges import RangeSettingMethod

FAST_SEARCH_ITERATIONS = 6
FAST_WEIGHT_RANGES = 20
FAST_SEARCH_ELEMENTS = 2**16


def mse_observer_options(preset: str, *, weights: bool) -> dict:
    """Options of the MSE observer under `preset`: none for `paper`, the iteration cuts for `fast`."""
    if preset != "fast":
        return {}
    if weights:
        return {"num_ranges": FAST_WEIGHT_RANGES}
    return {"max_iter": FAST_SEARCH_ITERATIONS, "max_elements": FAST_SEARCH_ELEMENTS}


@METHODS.register("mse")
class Mse(RangeSettingMethod):
    """Weights: per-channel 2-D grid search. Activations: per-tensor bounded search, averaged over images.

    The `fast` preset cuts the iteration counts: each of the two nested bounded searches stops
    after FAST_SEARCH_ITERATIONS iterations (scipy's default cap is 500; they usually stop after
    ~25 on the tolerance), each activation search scores candidates on a strided sample of at
    most FAST_SEARCH_ELEMENTS elements (plus the tensor's min and max), and the weight grid has
    FAST_WEIGHT_RANGES ranges instead of 100. The `paper` preset is the exact search.
    """

    name = "mse"
    weight_observer = "mse"
    activation_observer = "mse"

    def weight_observer_options(self, preset: str) -> dict:
        return mse_observer_options(preset, weights=True)

    def activation_observer_options(self, preset: str) -> dict:
        return mse_observer_options(preset, weights=False)


@METHODS.register("omse")
class Omse(RangeSettingMethod):
    """Activations: OMSE grid of 90 shrunken ranges (p = 2). Weights: per-channel min/max."""

    name = "omse"
    weight_observer = "minmax"
    activation_observer = "omse"
