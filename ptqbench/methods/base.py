"""The Method interface and the method registry; this module imports no torch and no method.

A method receives a quantizable twin of SAM (`ptqbench.sam.quantized.quantize_sam`, every site
off), the FP model, the calibration set, the bit widths and the preset, and sets every site.
The harness then seals the model for evaluation (`ptqbench.quant.sites.seal_for_evaluation`),
so no method can leave a random bypass, an observer or a trainable scale behind. The shared
range-setting steps are in `ptqbench.methods.ranges`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ptqbench.registry import Registry

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

    from ptqbench.config import BitSpec
    from ptqbench.sam.calibration import CalibrationSet


class Method(Protocol):
    """A PTQ method; `calibrate` sets every site of `qmodel` to quantize.

    fp_sites: glob patterns (as in `ptqbench.quant.sites.select_sites`) of the sites the method
    deliberately keeps in FP. Optional: a method without the attribute declares none, and the
    seal then refuses any site left off (`ptqbench.quant.sites.seal_for_evaluation`). No
    built-in method declares any.
    """

    name: str
    fp_sites: tuple[str, ...] = ()

    def calibrate(self, qmodel: Sam, fp_model: Sam, calib: CalibrationSet, spec: BitSpec,
                  preset: str, seed: int) -> None: ...


METHODS: Registry[Method] = Registry("method", entry_point_group="ptqbench.methods")
