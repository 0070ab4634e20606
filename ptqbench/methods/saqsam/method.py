"""`saqsam-s` and `saqsam`: SAQ-SAM (Zhang et al., AAAI 2026); card: methods/saqsam.md.

`saqsam-s` (the paper's "SAQ-SAM*", no reconstruction), as the reference's `calibrate`
(`solver/test_quant_SAQ_m.py:779-823`, config `exp/config_SA_44.yaml`):
0. the calibration images in the reference's order: images 0 and 8 swapped (`solver/utils.py:153`),
   so BIG and PCC run on the ninth image in loader order (sets of fewer than 9 images keep their
   order: the reference would fail there);
1. BIG: the bimodal sign fold of PTQ4SAM (`ptqbench.methods.ptq4sam.method.apply_big`) on the first image;
2. one statistics pass with every quantizer off and the weights FP, in which the activation
   observers (AvgMSEFast, `make_observer("mse")`, on every site that is not a PCC site or a
   softmax) and the AGQ searches of every softmax are fed by: the two PCC forwards on the first
   image (`ptqbench.methods.saqsam.pcc.pcc_search`, each decoder attention searching its 4 QK sites when the
   forward reaches it and then running with them quantizing), then one forward per image;
3. MSE per-channel weight ranges.
The encoder's relative-position term reads the FP q (`quant_model.py:775-782`).

`saqsam` = `saqsam-s`, then PAR (`ptqbench.methods.saqsam.par.par_reconstruct`): the PCC ranges and
the statistics become the initial LSQ scales and AdaRound grids that PAR trains.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from ptqbench.config import BitSpec
from ptqbench.errors import ConfigError
from ptqbench.methods.base import METHODS
from ptqbench.methods.ptq4sam.agq import AgqCapture
from ptqbench.methods.ptq4sam.method import FAST_SEARCHES, ActivationObserver, Ptq4SamS, Ptq4SamSConfig, apply_big
from ptqbench.methods.saqsam.par import FAST_SETTINGS, PAPER_SETTINGS, ParSettings, par_reconstruct
from ptqbench.methods.saqsam.pcc import PccChoice, PccConfig, focus_masks, pcc_search, reference_maps
from ptqbench.models.adapter import adapter_for
from ptqbench.models.calibration import CalibrationSample, CalibrationSet
from ptqbench.quant.quantizer import FakeQuantizer

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
def pcc_forwards(qmodel: nn.Module, fp_model: nn.Module, sample: CalibrationSample, config: PccConfig,
                 capture: AgqCapture, observed: dict[str, FakeQuantizer], *,
                 progress: bool = True) -> list[PccChoice]:
    """The reference's PCC forwards inside the statistics pass (`test_quant_SAQ_m.py:786-803`).

    First the FP-map forward on the search image (`enable_get_ori_ATM`), on qmodel itself, which
    is FP at this point (nothing quantizes yet; BIG's sign folds leave the maps exact): it gives
    PCC its reference maps, and since the reference's `get_ATM` re-enables each decoder softmax
    observer, the decoder AGQ searches (only they) see it as one more update. Then the two PCC
    passes (`pcc_search`), which every observer and AGQ search sees.
    """
    with observers_paused(observed), capture.restricted_to(adapter_for(qmodel).decoder_attentions(qmodel)):
        maps = reference_maps(qmodel, config.search_sample(sample))
    return pcc_search(qmodel, fp_model, sample, config, maps=maps, progress=progress)


@dataclass(frozen=True)
class SaqSamSConfig(Ptq4SamSConfig):
    """SAQ-SAM*'s settings: PTQ4SAM-S's (`Ptq4SamSConfig`; the other activation sites on SAQ-SAM's
    AvgMSEFast), pcc: PCC's settings (`PccConfig`; `paper`: every prompt of the search image;
    `fast`: at most FAST_PCC_PROMPTS), search_image: the index of the calibration image PCC
    searches on (the reference: the first, after `reference_order`)."""

    activation_observer: ActivationObserver = "mse"
    pcc: PccConfig = PccConfig()
    search_image: int = 0


@dataclass(frozen=True)
class SaqSamConfig(SaqSamSConfig):
    """SAQ-SAM's settings: SAQ-SAM*'s, and PAR's (`ParSettings`)."""

    par: ParSettings = PAPER_SETTINGS


FAST_PCC = PccConfig(max_prompts=FAST_PCC_PROMPTS)


@METHODS.register("saqsam-s", aliases=("saq-sam-s",))
class SaqSamS:
    """SAQ-SAM with PCC only (BIG, PCC, AvgMSEFast activations, AGQ softmax, MSE weights), no
    reconstruction; settings in `SaqSamSConfig`."""

    name = "saqsam-s"
    presets = {"paper": SaqSamSConfig(), "fast": SaqSamSConfig(pcc=FAST_PCC, **FAST_SEARCHES)}

    def __init__(self, config: SaqSamSConfig | None = None, *, progress: bool = True) -> None:
        self.config = config if config is not None else self.presets["paper"]
        self.statistics = Ptq4SamS(self.config, progress=progress)
        self.progress = progress

    def steps(self, qmodel: nn.Module, fp_model: nn.Module, calib: CalibrationSet, spec: BitSpec,
              seed: int) -> list[Step]:
        """The calibration as named steps, run in order by `calibrate` (and timed by benchmarks).

        `calib` is taken in the reference's order (`reference_order`); PAR gets the same order.
        """
        calib = reference_order(calib)
        search_image, pcc = self.config.search_image, self.config.pcc
        if not 0 <= search_image < len(calib):
            raise ConfigError(f"{self.name}: search image {search_image} is not in a calibration set "
                              f"of {len(calib)} images")
        search_sample = calib.samples[search_image]
        adapter = adapter_for(qmodel)
        pcc_sites = {f"{path}.{site}" for path in adapter.decoder_attentions(qmodel) for site in pcc.sites}
        steps: list[Step] = [("rel-pos from FP q", lambda: adapter.rel_pos_from_fp_query(qmodel))]
        if self.config.big:
            steps.append(("BIG", lambda: apply_big(qmodel, fp_model, calib)))
        steps += self.statistics.statistics_steps(
            qmodel, calib, skip=pcc_sites,
            before=lambda capture, observed: pcc_forwards(qmodel, fp_model, search_sample, pcc, capture, observed,
                                                          progress=self.progress))
        return steps

    def calibrate(self, qmodel: nn.Module, fp_model: nn.Module, calib: CalibrationSet, spec: BitSpec,
                  seed: int) -> None:
        for name, step in self.steps(qmodel, fp_model, calib, spec, seed):
            log.info("%s: %s", self.name, name)
            start = time.perf_counter()
            step()
            log.info("%s: %s took %.2f s", self.name, name, time.perf_counter() - start)

    def report_maps(self, qmodel: nn.Module, fp_model: nn.Module, calib: CalibrationSet) -> dict[str, np.ndarray]:
        """PCC's focus masks (`pcc.focus_masks`, theta of the config) of the last decoder attention
        (SAM: the final token-to-image attention) on PCC's search image, first prompt, first head:
        {"fp": bool [Nq, Nk], "quantized": bool [Nq, Nk]}, the FP twin's and the calibrated model's."""
        sample = reference_order(calib).samples[self.config.search_image]
        adapter = adapter_for(qmodel)
        path = list(adapter.decoder_attentions(qmodel))[-1]
        theta = self.config.pcc.theta
        masks = {}
        for name, model in (("fp", adapter.fp_twin(fp_model)), ("quantized", qmodel)):
            attention = reference_maps(model, sample)[path][0, 0]
            masks[name] = focus_masks(attention, theta).bool().cpu().numpy()
        return masks


@METHODS.register("saqsam", aliases=("saq-sam",))
class SaqSam(SaqSamS):
    """SAQ-SAM: `saqsam-s`, then Prompt-Aware Reconstruction with `SaqSamConfig.par`."""

    name = "saqsam"
    presets = {"paper": SaqSamConfig(), "fast": SaqSamConfig(pcc=FAST_PCC, par=FAST_SETTINGS, **FAST_SEARCHES)}

    def steps(self, qmodel: nn.Module, fp_model: nn.Module, calib: CalibrationSet, spec: BitSpec,
              seed: int) -> list[Step]:
        return super().steps(qmodel, fp_model, calib, spec, seed) + [
            ("PAR", lambda: par_reconstruct(qmodel, fp_model, reference_order(calib), self.config.par, seed,
                                            progress=self.progress))]
