"""`mse` (Lp clipping search, p = 2.4) and `omse` (FQ-ViT's L2 grid); card: methods/mse.md."""

from __future__ import annotations

from dataclasses import dataclass

from ptqbench.methods.base import METHODS
from ptqbench.methods.options import check_at_least
from ptqbench.methods.ranges import RangeSettingMethod
from ptqbench.quant.mse_search import MSE_NUM_RANGES

MSE_P = 2.4
FAST_SEARCH_ITERATIONS = 6
FAST_WEIGHT_RANGES = 20
FAST_SEARCH_ELEMENTS = 2**16


def mse_observer_options(config: object, *, weights: bool) -> dict:
    """Options of the MSE observer from a method configuration with the fields `weight_ranges`
    (weights) or `search_iterations` and `search_elements` (activations)."""
    if weights:
        return {"num_ranges": config.weight_ranges}
    return {"max_iter": config.search_iterations, "max_elements": config.search_elements}


@dataclass(frozen=True)
class MseConfig:
    """`mse`'s settings. p: the loss exponent; search_iterations: cap on each bounded search's
    iterations (None: scipy's default, 500, which the tolerance ends first); search_elements: score
    each activation candidate on a strided sample of at most this many elements plus the tensor's
    min and max (None: every element); weight_ranges: candidate ranges of the weight grid."""

    p: float = MSE_P
    search_iterations: int | None = None
    search_elements: int | None = None
    weight_ranges: int = MSE_NUM_RANGES

    def __post_init__(self) -> None:
        check_at_least(self, 1, "p", "search_iterations", "search_elements", "weight_ranges")


@METHODS.register("mse")
class Mse(RangeSettingMethod):
    """Weights: per-channel 2-D grid search. Activations: per-tensor bounded search, averaged over images.

    The `fast` preset cuts the iteration counts: each of the two nested bounded searches stops
    after FAST_SEARCH_ITERATIONS iterations (scipy's default cap is 500; they usually stop after
    ~25 on the tolerance), each activation search scores candidates on a strided sample of at most
    FAST_SEARCH_ELEMENTS elements (plus the tensor's min and max), and the weight grid has
    FAST_WEIGHT_RANGES ranges instead of 100. The `paper` preset is the exact search.
    """

    name = "mse"
    weight_observer = "mse"
    activation_observer = "mse"
    presets = {"paper": MseConfig(),
               "fast": MseConfig(search_iterations=FAST_SEARCH_ITERATIONS, search_elements=FAST_SEARCH_ELEMENTS,
                                 weight_ranges=FAST_WEIGHT_RANGES)}

    def weight_observer_options(self) -> dict:
        return {"p": self.config.p, **mse_observer_options(self.config, weights=True)}

    def activation_observer_options(self) -> dict:
        return {"p": self.config.p, **mse_observer_options(self.config, weights=False)}


@METHODS.register("omse")
class Omse(RangeSettingMethod):
    """Activations: OMSE grid of 90 shrunken ranges (p = 2). Weights: per-channel min/max."""

    name = "omse"
    weight_observer = "minmax"
    activation_observer = "omse"
