"""`saqsam-s` and `saqsam`: SAQ-SAM (Zhang et al., AAAI 2026), methods.md section 5.

`saqsam-s` (the paper's "SAQ-SAM*", no reconstruction):
1. BIG: the bimodal sign fold of PTQ4SAM (`ptqbench.methods.ptq4sam.apply_big`), before anything
   is calibrated (it changes q_proj / k_proj);
2. PCC (`ptqbench.quant.pcc.pcc_search`): the 28 QK sites of the 7 decoder attentions, on one
   calibration image, with weights, softmax and every other site FP; they stay frozen from here on;
3. PTQ4SAM-S's statistics step for everything else, on all calibration images, with the PCC
   sites quantizing: MSE per-channel weights, AGQ on every softmax, AvgMinMax on the remaining
   activations (the averaged-MSE observer for decoder k sites under BIG, all of which PCC sets).

`saqsam` = `saqsam-s`, then PAR (`ptqbench.methods.par.par_reconstruct`): the PCC ranges and
the statistics become the initial LSQ scales and AdaRound grids that PAR trains.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from segment_anything.modeling import Sam

from ptqbench.config import BitSpec
from ptqbench.errors import ConfigError
from ptqbench.methods.base import METHODS
from ptqbench.methods.par import ParSettings, par_reconstruct, par_settings
from ptqbench.methods.ptq4sam import Ptq4SamS, apply_big
from ptqbench.methods.reconstruction import preset_value
from ptqbench.quant.agq import AGQ_P
from ptqbench.quant.pcc import PccConfig, pcc_search
from ptqbench.sam.calibration import CalibrationSet

log = logging.getLogger(__name__)

FAST_PCC_PROMPTS = 4

Step = tuple[str, Callable[[], object]]


def pcc_config(preset: str) -> PccConfig:
    """PCC as the reference (`paper`: every prompt of the search image) or with at most 4 prompts
    on the search image (`fast`); the candidates, theta and the two passes are the same."""
    return PccConfig(max_prompts=preset_value(preset, None, FAST_PCC_PROMPTS))


@METHODS.register("saqsam-s", aliases=("saq-sam-s",))
class SaqSamS:
    """SAQ-SAM with PCC only (BIG + PCC + PTQ4SAM-S statistics), no reconstruction.

    pcc: override the preset's PCC settings; search_image: index of the calibration image PCC
    searches on (the reference: the first); big / agq / p: as `ptq4sam-s`.
    """

    name = "saqsam-s"

    def __init__(self, *, pcc: PccConfig | None = None, search_image: int = 0, big: bool = True, agq: bool = True,
                 p: float = AGQ_P, progress: bool = True) -> None:
        self.pcc = pcc
        self.search_image = search_image
        self.statistics = Ptq4SamS(big=big, agq=agq, p=p, progress=progress)
        self.progress = progress

    def steps(self, qmodel: Sam, fp_model: Sam, calib: CalibrationSet, spec: BitSpec, preset: str,
              seed: int) -> list[Step]:
        """The calibration as named steps, run in order by `calibrate` (and timed by benchmarks)."""
        if not 0 <= self.search_image < len(calib):
            raise ConfigError(f"{self.name}: search image {self.search_image} is not in a calibration set "
                              f"of {len(calib)} images")
        stats = self.statistics
        pcc = self.pcc or pcc_config(preset)
        steps: list[Step] = []
        if stats.big:
            steps.append(("BIG", lambda: apply_big(qmodel, fp_model, calib)))
        steps.append(("PCC", lambda: pcc_search(qmodel, fp_model, calib.samples[self.search_image], pcc,
                                                progress=self.progress)))
        steps += stats.statistics_steps(qmodel, calib, preset)
        return steps

    def calibrate(self, qmodel: Sam, fp_model: Sam, calib: CalibrationSet, spec: BitSpec,
                  preset: str, seed: int) -> None:
        for name, step in self.steps(qmodel, fp_model, calib, spec, preset, seed):
            log.info("%s: %s", self.name, name)
            step()


@METHODS.register("saqsam", aliases=("saq-sam",))
class SaqSam(SaqSamS):
    """SAQ-SAM: `saqsam-s`, then Prompt-Aware Reconstruction. par: override the preset's PAR settings."""

    name = "saqsam"

    def __init__(self, *, par: ParSettings | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.par = par

    def steps(self, qmodel: Sam, fp_model: Sam, calib: CalibrationSet, spec: BitSpec, preset: str,
              seed: int) -> list[Step]:
        settings = self.par or par_settings(preset)
        return super().steps(qmodel, fp_model, calib, spec, preset, seed) + [
            ("PAR", lambda: par_reconstruct(qmodel, fp_model, calib, settings, seed, progress=self.progress))]
