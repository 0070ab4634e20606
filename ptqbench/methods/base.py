"""The Method interface and the method registry; this module imports no torch and no method.

A method is a configuration plus an algorithm: its class holds `presets`, the `paper` and `fast`
instances of its frozen configuration dataclass (`ptqbench.methods.options`), and is built from
one of them with the user's options applied. It receives a quantizable twin of the model (the
model adapter's `quantized_twin`, every site off), the FP model, the calibration set, the bit
widths and the seed, and sets every site; what it needs of the model's structure (its forward, its
reconstruction units, its attention groups) it asks the adapter (`ptqbench.models.adapter.adapter_for`).
The harness then seals the model for evaluation (`ptqbench.quant.sites.seal_for_evaluation`),
so no method can leave a random bypass, an observer or a trainable scale behind. The shared
range-setting steps are in `ptqbench.methods.ranges`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ptqbench.registry import Registry

if TYPE_CHECKING:
    from torch import nn

    from ptqbench.config import BitSpec
    from ptqbench.models.calibration import CalibrationSet


class Method(Protocol):
    """A PTQ method; `calibrate` sets every site of `qmodel` to quantize.

    presets: {"paper": config, "fast": config}, instances of the method's frozen configuration
    dataclass (`paper`: the reference code's behaviour). The constructor takes one such config
    (None: the paper preset) and `progress` (show progress bars).
    fp_sites: glob patterns (as in `ptqbench.quant.sites.select_sites`) of the sites the method
    deliberately keeps in FP. Optional: a method without the attribute declares none, and the
    seal then refuses any site left off (`ptqbench.quant.sites.seal_for_evaluation`). No
    built-in method declares any.
    report_maps(qmodel, fp_model, calib) -> {name: numpy array}: optional; arrays `ptqbench report`
    shows for the cell, computed after sealing and kept in `<cell folder>/report_maps.npz`
    (SAQ-SAM: the PCC focus masks of one decoder attention, FP and quantized).
    """

    name: str
    presets: ClassVar[Mapping[str, Any]]
    fp_sites: tuple[str, ...] = ()

    def __init__(self, config: Any = None, *, progress: bool = True) -> None: ...

    def calibrate(self, qmodel: nn.Module, fp_model: nn.Module, calib: CalibrationSet, spec: BitSpec,
                  seed: int) -> None: ...


METHODS: Registry[Method] = Registry("method", entry_point_group="ptqbench.methods")
