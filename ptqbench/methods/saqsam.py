"""`saqsam-s` and `saqsam`: SAQ-SAM (Zhang et al., AAAI 2026); card: methods/saqsam.md.

`saqsam-s` (the paper's "SAQ-SAM*", no reconstruction), as the reference's `calibrate`
(`solver/test_quant_SAQ_m.py:779-823`, config `exp/config_SA_44.yaml`):
0. the calibration images in the reference's order: images 0 and 8 swapped (`solver/utils.py:153`),
   so BIG and PCC run on the ninth image in loader order (sets of fewer than 9 images keep their
   order: the reference would fail there);
1. BIG: the bimodal sign fold of PTQ4SAM (`ptqbench.methods.ptq4sam.apply_big`) on the first image;
2. one statistics pass with every quantizer off and the weights FP, in which the activation
   observers (AvgMSEFast, `make_observer("mse")`, on every site that is not a PCC site or a
   softmax) and the AGQ searches of every softmax are fed by: the two PCC forwards on the first
   image (`ptqbench.methods.pcc.pcc_search`, each decoder attention searching its 4 QK sites when the
   forward reaches it and then running with them quantizing), then one forward per image;
3. MSE per-channel weight ranges.
The encoder's relative-position term reads the FP q (`quant_model.py:775-782`).

`saqsam` = `saqsam-s`, then PAR (`ptqbench.methods.par.par_reconstruct`): the PCC ranges and
the statistics become the initial LSQ scales and AdaRound grids that PAR trains.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from segment_anything.modeling import Sam

from ptqbench.config import BitSpec
from ptqbench.errors import ConfigError
from ptqbench.methods.base import METHODS
from ptqbench.methods.par import ParSettings, par_reconstruct, par_settings
from ptqbench.methods.pcc import PccChoice, PccConfig, decoder_attentions, pcc_search, reference_maps
from ptqbench.methods.ptq4sam import Ptq4SamS, apply_big
from ptqbench.methods.reconstruction import preset_value
from ptqbench.quant.agq import AGQ_P, AgqCapture
from ptqbench.quant.quantizer import FakeQuantizer
from ptqbench.sam.calibration import CalibrationSample, CalibrationSet
from ptqbench.sam.quantized import use_fp_query_for_rel_pos

log = logging.getLogger(__name__)

FAST_PCC_PROMPTS = 4

Step = tuple[str, Callable[[], object]]


REFERENCE_SWAP = (0, 8)


def reference_order(calib: CalibrationSet) -> CalibrationSet:
    """`calib` with images 0 and 8 swapped, as the reference's calibration loader
    (`solver/utils.py:153`); a set of fewer than 9 images is returned as it is."""
    first, second = REFERENCE_SWAP
    if len(calib) <= second:
        return calib
    samples = list(calib.samples)
    samples[first], samples[second] = samples[second], samples[first]
    return replace(calib, samples=tuple(samples))


@contextmanager
def observers_paused(sites: dict[str, FakeQuantizer]) -> Iterator[None]:
    """The observing `sites` are off (no update) inside the block, observing again after it."""
    paused = [quantizer for quantizer in sites.values() if quantizer.mode == "observe"]
    for quantizer in paused:
        quantizer.mode = "off"
    try:
        yield
    finally:
        for quantizer in paused:
            quantizer.mode = "observe"


@torch.no_grad()
def pcc_forwards(qmodel: Sam, fp_model: Sam, sample: CalibrationSample, config: PccConfig, capture: AgqCapture,
                 observed: dict[str, FakeQuantizer], *, progress: bool = True) -> list[PccChoice]:
    """The reference's PCC forwards inside the statistics pass (`test_quant_SAQ_m.py:786-803`).

    First the FP-map forward on the search image (`enable_get_ori_ATM`), on qmodel itself, which
    is FP at this point (nothing quantizes yet; BIG's sign folds leave the maps exact): it gives
    PCC its reference maps, and since the reference's `get_ATM` re-enables each decoder softmax
    observer, the decoder AGQ searches (only they) see it as one more update. Then the two PCC
    passes (`pcc_search`), which every observer and AGQ search sees.
    """
    boxes = sample.boxes if config.max_prompts is None else sample.boxes[:config.max_prompts]
    with observers_paused(observed), capture.restricted_to(decoder_attentions(qmodel)):
        maps = reference_maps(qmodel, sample.image, boxes)
    return pcc_search(qmodel, fp_model, sample, config, maps=maps, progress=progress)


def pcc_config(preset: str) -> PccConfig:
    """PCC as the reference (`paper`: every prompt of the search image) or with at most 4 prompts
    on the search image (`fast`); the candidates, theta and the two passes are the same."""
    return PccConfig(max_prompts=preset_value(preset, None, FAST_PCC_PROMPTS))


@METHODS.register("saqsam-s", aliases=("saq-sam-s",))
class SaqSamS:
    """SAQ-SAM with PCC only (BIG, PCC, AvgMSEFast activations, AGQ softmax, MSE weights), no reconstruction.

    pcc: override the preset's PCC settings; search_image: index of the calibration image PCC
    searches on (the reference: the first); big / agq / p: as `ptq4sam-s`.
    """

    name = "saqsam-s"

    def __init__(self, *, pcc: PccConfig | None = None, search_image: int = 0, big: bool = True, agq: bool = True,
                 p: float = AGQ_P, progress: bool = True) -> None:
        self.pcc = pcc
        self.search_image = search_image
        self.statistics = Ptq4SamS(big=big, agq=agq, p=p, activation_observer="mse", progress=progress)
        self.progress = progress

    def steps(self, qmodel: Sam, fp_model: Sam, calib: CalibrationSet, spec: BitSpec, preset: str,
              seed: int) -> list[Step]:
        """The calibration as named steps, run in order by `calibrate` (and timed by benchmarks).

        `calib` is taken in the reference's order (`reference_order`); PAR gets the same order.
        """
        calib = reference_order(calib)
        if not 0 <= self.search_image < len(calib):
            raise ConfigError(f"{self.name}: search image {self.search_image} is not in a calibration set "
                              f"of {len(calib)} images")
        stats = self.statistics
        pcc = self.pcc or pcc_config(preset)
        search_sample = calib.samples[self.search_image]
        pcc_sites = {f"{path}.{site}" for path in decoder_attentions(qmodel) for site in pcc.sites}
        steps: list[Step] = [("rel-pos from FP q", lambda: use_fp_query_for_rel_pos(qmodel))]
        if stats.big:
            steps.append(("BIG", lambda: apply_big(qmodel, fp_model, calib)))
        steps += stats.statistics_steps(
            qmodel, calib, preset, skip=pcc_sites,
            before=lambda capture, observed: pcc_forwards(qmodel, fp_model, search_sample, pcc, capture, observed,
                                                          progress=self.progress))
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
            ("PAR", lambda: par_reconstruct(qmodel, fp_model, reference_order(calib), settings, seed,
                                            progress=self.progress))]
