"""`fp`: the full-precision reference row (no quantizer is ever turned on)."""

from __future__ import annotations

from ptqbench.methods.base import METHODS


@METHODS.register("fp")
class FullPrecision:
    """Leaves every site off; the harness evaluates the FP model itself for this row."""

    name = "fp"

    def calibrate(self, qmodel, fp_model, calib, spec, preset, seed) -> None:
        return None
