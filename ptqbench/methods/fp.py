"""`fp`: the full-precision reference row (no quantizer is ever turned on)."""

from __future__ import annotations

from ptqbench.methods.base import METHODS
from ptqbench.methods.options import NO_OPTIONS_PRESETS


@METHODS.register("fp")
class FullPrecision:
    """Leaves every site off. The harness evaluates this row through `fp_twin(model)`, the
    quantizable twin with every site off (bit-exact with segment_anything), so FP and quantized
    cells run the same forward."""

    name = "fp"
    presets = NO_OPTIONS_PRESETS

    def __init__(self, config: object | None = None, *, progress: bool = True) -> None:
        self.config = config

    def calibrate(self, qmodel, fp_model, calib, spec, seed) -> None:
        return None
