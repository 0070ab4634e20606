"""`qdrop` (Wei et al., ICLR 2022) as the PTQ4SAM codebase runs it on SAM (card: methods/qdrop.md).

Weights: per-channel MSE ranges, then AdaRound. Activations: AvgMinMax ranges, then LSQ scales
learned jointly with the rounding, with QDrop's random drop (each element quantized with
probability 0.5, unit inputs mixed the same way) during reconstruction only. Units: SAM's
quantized modules on their bare outputs, as the reference reconstructs them (the model
adapter's `reconstruction_units`; SAM-1's in `ptqbench/models/sam1/units.py`). After
reconstruction every quantizer quantizes every element (the benchmark's leak-free rule; see
methods/qdrop.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ptqbench.config import BitSpec
from ptqbench.methods.base import METHODS
from ptqbench.methods.mse import FAST_WEIGHT_RANGES
from ptqbench.methods.options import check_at_least
from ptqbench.methods.ranges import observe_activations, set_weight_ranges
from ptqbench.models.adapter import adapter_for
from ptqbench.models.calibration import CalibrationSet
from ptqbench.quant.mse_search import MSE_NUM_RANGES
from ptqbench.quant.observers import make_observer
from ptqbench.recon.engine import ReconstructionSettings, reconstruct
from ptqbench.recon.unit import UnitConfig

PAPER_ITERATIONS = 20_000
FAST_ITERATIONS = 50


@dataclass(frozen=True)
class QDropConfig:
    """`qdrop`'s settings: iterations per unit, and the candidate ranges of the MSE weight grid
    the reconstruction starts from."""

    iterations: int = PAPER_ITERATIONS
    weight_ranges: int = MSE_NUM_RANGES

    def __post_init__(self) -> None:
        check_at_least(self, 1, "iterations", "weight_ranges")


def qdrop_config(iterations: int) -> UnitConfig:
    """QDrop's unit settings: AdaRound (Adam 1e-3, lambda 0.01, beta 20 -> 2 after a 20 % warm-up)
    and LSQ (Adam 4e-5, cosine to 0) jointly, p = 0.5, for `iterations` steps."""
    return UnitConfig(
        iterations=iterations,
        adaround=True, learn_scales=True, weight_lr=1e-3, scale_lr=4e-5,
        reg_lambda=0.01, beta_start=20.0, beta_end=2.0, warmup=0.2, quantize_prob=0.5,
    )


def qdrop_reconstruct(qmodel: nn.Module, fp_model: nn.Module, calib: CalibrationSet, iterations: int, seed: int, *,
                      progress: bool = True) -> None:
    """QDrop reconstruction of every SAM unit for `iterations` steps each, starting from the
    quantizers' current ranges.

    Every weight and activation site of `qmodel` must already be in quantize mode (weights on a
    uniform per-channel grid; softmax sites may be on a log2 grid, whose scale is learned too).
    Leaves every quantizer with quantize_prob = 1, frozen scales and hard-rounded, frozen weights.
    """
    adapter = adapter_for(qmodel)
    reconstruct(adapter.reconstruction_units(qmodel, qdrop_config(iterations)), qmodel, fp_model, calib,
                ReconstructionSettings(forward=adapter.forward), seed, progress)


def initial_ranges(qmodel: nn.Module, calib: CalibrationSet, weight_ranges: int, *, progress: bool = True) -> None:
    """The ranges reconstruction starts from (PTQ4SAM codebase): per-channel MSE weight ranges
    (a grid of `weight_ranges` ranges) and AvgMinMax activation ranges."""
    set_weight_ranges(qmodel, "mse", num_ranges=weight_ranges)
    observe_activations(qmodel, calib, lambda site, bits: make_observer("avgminmax", bits=bits), progress=progress)


@METHODS.register("qdrop")
class QDrop:
    """QDrop: MSE weight ranges + AvgMinMax activation ranges, then `qdrop_reconstruct`."""

    name = "qdrop"
    presets = {"paper": QDropConfig(),
               "fast": QDropConfig(iterations=FAST_ITERATIONS, weight_ranges=FAST_WEIGHT_RANGES)}

    def __init__(self, config: QDropConfig | None = None, *, progress: bool = True) -> None:
        self.config = config if config is not None else self.presets["paper"]
        self.progress = progress

    def calibrate(self, qmodel: nn.Module, fp_model: nn.Module, calib: CalibrationSet, spec: BitSpec,
                  seed: int) -> None:
        initial_ranges(qmodel, calib, self.config.weight_ranges, progress=self.progress)
        qdrop_reconstruct(qmodel, fp_model, calib, self.config.iterations, seed, progress=self.progress)
