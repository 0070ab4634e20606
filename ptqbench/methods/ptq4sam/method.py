"""`ptq4sam-s` and `ptq4sam` (= PTQ4SAM-L, alias `ptq4sam-l`); cards: methods/ptq4sam*.md.

PTQ4SAM (Lv et al., CVPR 2024) adds two things to the setup that every method shares:
- BIG (`ptqbench.methods.ptq4sam.big`): in the mask decoder's token-to-image cross-attentions whose
  post-k_proj activation is bimodal, fold the per-channel sign of K into q_proj and k_proj; with
  BIG on, the k sites of every decoder attention use the averaged-MSE observer;
- AGQ (`ptqbench.methods.ptq4sam.agq`): every softmax site (encoder and decoder) gets a log2 grid with
  base 2^(1/tau), tau and scale searched against the attention output error.

`ptq4sam-s` is statistics only (MSE per-channel weights, AvgMinMax activations); `ptq4sam` then
runs the QDrop reconstruction (AdaRound + LSQ + drop 0.5) from those ranges, with the log2
scales learnable and tau fixed. The calibration order is the reference's (`test_quant.py:527-553`):
BIG fold on the first image, then one pass over the calibration images with every quantizer off
in which the activation observers and the AGQ searches are fed together, then the weight ranges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import partial
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from ptqbench.config import BitSpec
from ptqbench.methods.base import METHODS
from ptqbench.methods.mse import FAST_SEARCH_ELEMENTS, FAST_SEARCH_ITERATIONS, FAST_WEIGHT_RANGES, mse_observer_options
from ptqbench.methods.options import check_at_least
from ptqbench.methods.ptq4sam.agq import AGQ_P, AGQ_TAUS, AgqCapture, AgqResult
from ptqbench.methods.ptq4sam.big import channel_signs, fold_channel_signs, is_bimodal
from ptqbench.methods.qdrop import FAST_ITERATIONS, PAPER_ITERATIONS, qdrop_reconstruct
from ptqbench.methods.ranges import forward_all, observing, set_weight_ranges
from ptqbench.models.adapter import adapter_for
from ptqbench.models.calibration import CalibrationSample, CalibrationSet
from ptqbench.quant.mse_search import MSE_NUM_RANGES
from ptqbench.quant.observers import Observer, make_observer
from ptqbench.quant.quantizer import FakeQuantizer
from ptqbench.recon.cache import capture
from ptqbench.recon.unit import HookPoint

log = logging.getLogger(__name__)

ActivationObserver = Literal["avgminmax", "mse", "minmax", "percentile", "omse"]
"""The observers a PTQ4SAM-style statistics pass can put on its other activation sites."""


@torch.no_grad()
def capture_keys(model: nn.Module, sample: CalibrationSample, attention_paths: list[str]) -> dict[str, Tensor]:
    """The post-k_proj activation K [boxes, tokens, C] of each attention on one sample, by path
    (`ptqbench.recon.cache.capture`: the forward stops once the last one is computed)."""
    points = [HookPoint(f"{path}.k_proj", "post", lambda args, kwargs, output, path=path: {path: output})
              for path in attention_paths]
    return capture(model, points, adapter_for(model).forward, sample)


class BigDecision(NamedTuple):
    """BIG's outcome for one decoder attention: whether its K was judged bimodal, whether folded."""

    bimodal: bool
    folded: bool


def apply_big(qmodel: nn.Module, fp_model: nn.Module, calib: CalibrationSet) -> dict[str, BigDecision]:
    """BIG: detect bimodal K in the FP model on the first calibration image, fold the signs into `qmodel`.

    As the reference (`LSQSignFakeQuantize.judge_bimodal` on every decoder attention's k,
    `bimodal_adjust` on the token-to-image ones): K of the first box prompt of every decoder
    attention is judged (`is_bimodal`); in the token-to-image attentions whose K is bimodal,
    gamma = sign of K's per-channel mean over all boxes and tokens of that image is folded into
    the q_proj and k_proj of `qmodel` (before weight calibration).
    Returns attention path -> its decision, for all decoder attentions in forward order.
    """
    adapter = adapter_for(fp_model)
    folding = set(adapter.token_to_image_attentions(fp_model))
    paths = list(adapter.decoder_attentions(fp_model))
    keys = capture_keys(fp_model, calib.samples[0], paths)
    decisions = {}
    for path in paths:
        bimodal = is_bimodal(keys[path][0])
        decisions[path] = BigDecision(bimodal, bimodal and path in folding)
        if decisions[path].folded:
            fold_channel_signs(qmodel.get_submodule(path), channel_signs(keys[path]))
        log.info("BIG: %s is %s", path, "bimodal" if bimodal else "not bimodal")
    return decisions


def set_log2_grids(attentions: dict[str, nn.Module], results: dict[str, AgqResult]) -> None:
    """Put each attention's softmax site on the log2 grid its AGQ search chose (quantize mode)."""
    for path, result in results.items():
        attentions[path].softmax_quantizer.set_log2(result.tau, torch.tensor(result.scale))
        log.debug("AGQ: %s tau=%d scale=%.4g", path, result.tau, result.scale)


@dataclass(frozen=True)
class Ptq4SamSConfig:
    """PTQ4SAM-S's settings. big / agq: switch either part off (ablations); p: the AGQ error
    exponent (2.4 as the reference code, 2 as the paper); activation_observer: the observer of
    every other activation site ("avgminmax" as PTQ4SAM's config; SAQ-SAM uses "mse", its
    AvgMSEFast); search_iterations: cap on every bounded search's iterations (AGQ's and the MSE
    observers'; None: scipy's default); search_elements: the MSE activation searches' sample cap
    (None: every element); weight_ranges: the candidate ranges of the MSE weight grid."""

    big: bool = True
    agq: bool = True
    p: float = AGQ_P
    activation_observer: ActivationObserver = "avgminmax"
    search_iterations: int | None = None
    search_elements: int | None = None
    weight_ranges: int = MSE_NUM_RANGES

    def __post_init__(self) -> None:
        check_at_least(self, 1, "p", "search_iterations", "search_elements", "weight_ranges")


FAST_SEARCHES = {"search_iterations": FAST_SEARCH_ITERATIONS, "search_elements": FAST_SEARCH_ELEMENTS,
                 "weight_ranges": FAST_WEIGHT_RANGES}


@dataclass(frozen=True)
class Ptq4SamConfig(Ptq4SamSConfig):
    """PTQ4SAM-L's settings: PTQ4SAM-S's, and the QDrop reconstruction's iterations per unit."""

    iterations: int = PAPER_ITERATIONS

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, 1, "iterations")


@METHODS.register("ptq4sam-s")
class Ptq4SamS:
    """PTQ4SAM-S: BIG + AGQ + MSE per-channel weights + AvgMinMax activations (averaged MSE on
    decoder k); settings in `Ptq4SamSConfig`."""

    name = "ptq4sam-s"
    weight_observer = "mse"
    key_observer_with_big = "mse"
    presets = {"paper": Ptq4SamSConfig(), "fast": Ptq4SamSConfig(**FAST_SEARCHES)}

    def __init__(self, config: Ptq4SamSConfig | None = None, *, progress: bool = True) -> None:
        self.config = config if config is not None else self.presets["paper"]
        self.progress = progress

    def activation_observer_for(self, site: str, bits: int, key_sites: Collection[str]) -> Observer:
        """The activation observer of `site`; with BIG on, the averaged-MSE observer for the k sites
        of every decoder attention, `key_sites` (the reference's SignAvgMSEFast with its sign unset).

        `bits` lets the MSE observer search each image as it comes (no copy of every update).
        """
        name = self.config.activation_observer
        if self.config.big and site in key_sites:
            name = self.key_observer_with_big
        options = mse_observer_options(self.config, weights=False) if name == "mse" else {}
        return make_observer(name, bits=bits, **options)

    @torch.no_grad()
    def observe(self, qmodel: nn.Module, calib: CalibrationSet, *, skip: Collection[str] = (),
                before: Callable[[AgqCapture, dict[str, FakeQuantizer]], object] | None = None) -> object:
        """The reference's statistics pass (`calibrate`): one forward per calibration image with
        the weights FP, every activation observer and (AGQ on) every softmax search fed together.

        skip: activation sites left alone (SAQ-SAM's PCC sites). before(capture, observed sites):
        forwards run first with the observers and AGQ searches attached (SAQ-SAM's PCC forwards,
        which the reference's observers see). Returns what `before` returned (None without it).
        """
        adapter = adapter_for(qmodel)
        attentions = adapter.softmax_attentions(qmodel) if self.config.agq else {}
        key_sites = frozenset(f"{path}.k" for path in adapter.decoder_attentions(qmodel))
        skip = set(skip) | {f"{path}.softmax" for path in attentions}
        with observing(qmodel, partial(self.activation_observer_for, key_sites=key_sites), skip) as observed, \
                AgqCapture(attentions, AGQ_TAUS, self.config.p, self.config.search_iterations) as capture:
            before_result = before(capture, observed) if before is not None else None
            forward_all(qmodel, calib, "observing activations", progress=self.progress)
        if attentions:
            set_log2_grids(attentions, capture.results())
        return before_result

    def statistics_steps(self, qmodel: nn.Module, calib: CalibrationSet, *, skip: Collection[str] = (),
                         before: Callable[[AgqCapture, dict[str, FakeQuantizer]], object] | None = None,
                         ) -> list[tuple[str, Callable[[], object]]]:
        """The activation (with AGQ) and weight steps after BIG, in the reference's order."""
        return [("activations", lambda: self.observe(qmodel, calib, skip=skip, before=before)),
                ("weights", lambda: set_weight_ranges(qmodel, self.weight_observer,
                                                      **mse_observer_options(self.config, weights=True)))]

    def calibrate(self, qmodel: nn.Module, fp_model: nn.Module, calib: CalibrationSet, spec: BitSpec,
                  seed: int) -> None:
        if self.config.big:
            apply_big(qmodel, fp_model, calib)
        for _, step in self.statistics_steps(qmodel, calib):
            step()


@METHODS.register("ptq4sam", aliases=("ptq4sam-l",))
class Ptq4SamL(Ptq4SamS):
    """PTQ4SAM-L: PTQ4SAM-S, then QDrop reconstruction of every unit (`Ptq4SamConfig.iterations`)."""

    name = "ptq4sam"
    presets = {"paper": Ptq4SamConfig(), "fast": Ptq4SamConfig(iterations=FAST_ITERATIONS, **FAST_SEARCHES)}

    def calibrate(self, qmodel: nn.Module, fp_model: nn.Module, calib: CalibrationSet, spec: BitSpec,
                  seed: int) -> None:
        super().calibrate(qmodel, fp_model, calib, spec, seed)
        qdrop_reconstruct(qmodel, fp_model, calib, self.config.iterations, seed, progress=self.progress)
