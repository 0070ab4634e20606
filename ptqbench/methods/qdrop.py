"""`qdrop` (Wei et al., ICLR 2022) as the PTQ4SAM codebase runs it on SAM (card: methods/qdrop.md).

Weights: per-channel MSE ranges, then AdaRound. Activations: AvgMinMax ranges, then LSQ scales
learned jointly with the rounding, with QDrop's random drop (each element quantized with
probability 0.5, unit inputs mixed the same way) during reconstruction only. Units: SAM's
quantized modules on their bare outputs, as the reference reconstructs them
(`ptqbench.sam.units.sam_units`). After reconstruction every quantizer quantizes every element
(the benchmark's leak-free rule; see methods/qdrop.md).
"""

from __future__ import annotations

from segment_anything.modeling import Sam

from ptqbench.config import BitSpec
from ptqbench.methods.base import METHODS
from ptqbench.methods.mse import mse_observer_options
from ptqbench.methods.ranges import observe_activations, set_weight_ranges
from ptqbench.methods.reconstruction import ReconstructionSettings, preset_value, reconstruct
from ptqbench.quant.observers import make_observer
from ptqbench.quant.unit import UnitConfig
from ptqbench.sam.calibration import CalibrationSet
from ptqbench.sam.units import sam_units

PAPER_ITERATIONS = 20_000
FAST_ITERATIONS = 50


def qdrop_config(preset: str) -> UnitConfig:
    """QDrop's unit settings: AdaRound (Adam 1e-3, lambda 0.01, beta 20 -> 2 after a 20 % warm-up)
    and LSQ (Adam 4e-5, cosine to 0) jointly, p = 0.5; 20,000 steps ("paper") or 50 ("fast")."""
    return UnitConfig(
        iterations=preset_value(preset, PAPER_ITERATIONS, FAST_ITERATIONS),
        adaround=True, learn_scales=True, weight_lr=1e-3, scale_lr=4e-5,
        reg_lambda=0.01, beta_start=20.0, beta_end=2.0, warmup=0.2, quantize_prob=0.5,
    )


def qdrop_reconstruct(qmodel: Sam, fp_model: Sam, calib: CalibrationSet, preset: str, seed: int, *,
                      progress: bool = True) -> None:
    """QDrop reconstruction of every SAM unit, starting from the quantizers' current ranges.

    Every weight and activation site of `qmodel` must already be in quantize mode (weights on a
    uniform per-channel grid; softmax sites may be on a log2 grid, whose scale is learned too).
    Leaves every quantizer with quantize_prob = 1, frozen scales and hard-rounded, frozen weights.
    """
    reconstruct(sam_units(qmodel, qdrop_config(preset)), qmodel, fp_model, calib, ReconstructionSettings(),
                seed, progress)


def initial_ranges(qmodel: Sam, calib: CalibrationSet, preset: str, *, progress: bool = True) -> None:
    """The ranges reconstruction starts from (PTQ4SAM codebase): per-channel MSE weight ranges
    (with the `fast` preset's search cuts) and AvgMinMax activation ranges."""
    set_weight_ranges(qmodel, "mse", **mse_observer_options(preset, weights=True))
    observe_activations(qmodel, calib, lambda site, bits: make_observer("avgminmax", bits=bits), progress=progress)


@METHODS.register("qdrop")
class QDrop:
    """QDrop: MSE weight ranges + AvgMinMax activation ranges, then `qdrop_reconstruct`."""

    name = "qdrop"

    def __init__(self, *, progress: bool = True) -> None:
        self.progress = progress

    def calibrate(self, qmodel: Sam, fp_model: Sam, calib: CalibrationSet, spec: BitSpec,
                  preset: str, seed: int) -> None:
        initial_ranges(qmodel, calib, preset, progress=self.progress)
        qdrop_reconstruct(qmodel, fp_model, calib, preset, seed, progress=self.progress)
