"""`ptq4sam-s` and `ptq4sam` (= PTQ4SAM-L, alias `ptq4sam-l`), methods.md section 4.

PTQ4SAM (Lv et al., CVPR 2024) adds two things to the common setup of section 1:
- BIG (`ptqbench.quant.big`): in the mask decoder's token-to-image cross-attentions whose
  post-k_proj activation is bimodal, fold the per-channel sign of K into q_proj and k_proj; with
  BIG on, the k sites of every decoder attention use the averaged-MSE observer;
- AGQ (`ptqbench.quant.agq`): every softmax site (encoder and decoder) gets a log2 grid with
  base 2^(1/tau), tau and scale searched against the attention output error.

`ptq4sam-s` is statistics only (MSE per-channel weights, AvgMinMax activations); `ptq4sam` then
runs the QDrop reconstruction (AdaRound + LSQ + drop 0.5) from those ranges, with the log2
scales learnable and tau fixed. The calibration order is: BIG fold, weight ranges, AGQ (the
maps are captured with quantized weights and FP activations), then the remaining activation
sites observed with the softmax already on its log2 grid.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from functools import partial

import torch
from segment_anything.modeling import Sam
from torch import Tensor, nn
from tqdm.auto import tqdm

from ptqbench.config import BitSpec
from ptqbench.methods.base import METHODS, observe_activations, set_weight_ranges
from ptqbench.methods.mse import FAST_SEARCH_ITERATIONS, mse_observer_options
from ptqbench.quant.agq import AGQ_P, AGQ_TAUS, AgqCapture, AgqResult
from ptqbench.quant.big import channel_signs, fold_channel_signs, is_bimodal
from ptqbench.quant.observers import Observer, make_observer
from ptqbench.sam.calibration import CalibrationSample, CalibrationSet, sam_forward
from ptqbench.sam.quantized import QuantDecoderAttention, QuantEncoderAttention

log = logging.getLogger(__name__)

DECODER = "mask_decoder.transformer"
TOKEN_TO_IMAGE = ("cross_attn_token_to_image", "final_attn_token_to_image")
DECODER_KEY_SITES = f"{DECODER}.*.k"


def token_to_image_attentions(model: Sam) -> dict[str, nn.Module]:
    """The decoder's token-to-image cross-attentions (every layer's and the final one), by module path."""
    return {f"{DECODER}.{name}": module for name, module in model.mask_decoder.transformer.named_modules()
            if name.rsplit(".", 1)[-1] in TOKEN_TO_IMAGE}


@torch.no_grad()
def capture_keys(model: Sam, sample: CalibrationSample, attention_paths: list[str]) -> dict[str, Tensor]:
    """The post-k_proj activation K [boxes, tokens, C] of each attention on one sample (forward hooks)."""
    keys: dict[str, Tensor] = {}
    handles = [model.get_submodule(path).k_proj.register_forward_hook(
        lambda _m, _args, out, path=path: keys.__setitem__(path, out.detach()))
        for path in attention_paths]
    try:
        sam_forward(model, sample.image, sample.boxes)
    finally:
        for handle in handles:
            handle.remove()
    return keys


def apply_big(qmodel: Sam, fp_model: Sam, calib: CalibrationSet) -> dict[str, bool]:
    """BIG: detect bimodal K in the FP model on the first calibration image, fold the signs into `qmodel`.

    For each token-to-image attention, K of the first box prompt decides bimodality
    (`is_bimodal`); where bimodal, gamma = sign of K's per-channel mean over all boxes and tokens
    of that image is folded into the q_proj and k_proj of `qmodel` (before weight calibration).
    Returns attention path -> whether it was bimodal (and folded).
    """
    paths = list(token_to_image_attentions(fp_model))
    keys = capture_keys(fp_model, calib.samples[0], paths)
    bimodal = {}
    for path in paths:
        bimodal[path] = is_bimodal(keys[path][0])
        if bimodal[path]:
            fold_channel_signs(qmodel.get_submodule(path), channel_signs(keys[path]))
        log.info("BIG: %s is %s", path, "bimodal, signs folded" if bimodal[path] else "not bimodal")
    return bimodal


def softmax_attentions(qmodel: Sam) -> dict[str, nn.Module]:
    """Every quantizable attention twin (encoder and decoder), by module path."""
    return {path: module for path, module in qmodel.named_modules()
            if isinstance(module, (QuantEncoderAttention, QuantDecoderAttention))}


@torch.no_grad()
def apply_agq(qmodel: Sam, calib: CalibrationSet, *, taus: tuple[int, ...] = AGQ_TAUS, p: float = AGQ_P,
              max_iter: int | None = None, progress: bool = True) -> dict[str, AgqResult]:
    """AGQ: search tau and scale of every softmax site over the calibration set, then set the log2 grids.

    One forward per calibration image with `qmodel` as it is (sites already set quantize, the
    others are FP); each attention map is searched when it is produced and then released.
    Returns attention path -> search result; the site `<path>.softmax` is left quantizing.
    max_iter caps each bounded search (the `fast` preset's cut; None = scipy's default).
    """
    attentions = softmax_attentions(qmodel)
    with AgqCapture(attentions, taus, p, max_iter) as capture:
        for sample in tqdm(calib.samples, desc="AGQ softmax search", disable=not progress, leave=False):
            sam_forward(qmodel, sample.image, sample.boxes)
    results = capture.results()
    for path, result in results.items():
        attentions[path].softmax_quantizer.set_log2(result.tau, torch.tensor(result.scale))
        log.debug("AGQ: %s tau=%d scale=%.4g", path, result.tau, result.scale)
    return results


@METHODS.register("ptq4sam-s")
class Ptq4SamS:
    """PTQ4SAM-S: BIG + AGQ + MSE per-channel weights + AvgMinMax activations (averaged MSE on decoder k).

    big / agq: switch either part off (ablations); p: the AGQ error exponent (2.4 as the
    reference code, 2 as the paper).
    """

    name = "ptq4sam-s"
    weight_observer = "mse"
    activation_observer = "avgminmax"
    key_observer_with_big = "mse"

    def __init__(self, *, big: bool = True, agq: bool = True, p: float = AGQ_P, progress: bool = True) -> None:
        self.big, self.agq, self.p, self.progress = big, agq, p, progress

    def activation_observer_for(self, site: str, bits: int, preset: str = "paper") -> Observer:
        """AvgMinMax; with BIG on, the averaged-MSE observer for the k sites of every decoder attention.

        `bits` lets the MSE observer search each image as it comes (no copy of every update).
        """
        if self.big and fnmatch.fnmatchcase(site, DECODER_KEY_SITES):
            return make_observer(self.key_observer_with_big, bits=bits,
                                 **mse_observer_options(preset, weights=False))
        return make_observer(self.activation_observer, bits=bits)

    def statistics_steps(self, qmodel: Sam, calib: CalibrationSet, preset: str) -> list[tuple[str, Callable[[], object]]]:
        """The weight, AGQ and activation steps (after BIG), with the `fast` preset's search cuts."""
        steps = [("weights", lambda: set_weight_ranges(qmodel, self.weight_observer,
                                                       **mse_observer_options(preset, weights=True)))]
        if self.agq:
            max_iter = FAST_SEARCH_ITERATIONS if preset == "fast" else None
            steps.append(("AGQ", lambda: apply_agq(qmodel, calib, p=self.p, max_iter=max_iter,
                                                   progress=self.progress)))
        steps.append(("activations", lambda: observe_activations(
            qmodel, calib, partial(self.activation_observer_for, preset=preset), progress=self.progress)))
        return steps

    def calibrate(self, qmodel: Sam, fp_model: Sam, calib: CalibrationSet, spec: BitSpec,
                  preset: str, seed: int) -> None:
        if self.big:
            apply_big(qmodel, fp_model, calib)
        for _, step in self.statistics_steps(qmodel, calib, preset):
            step()


@METHODS.register("ptq4sam", aliases=("ptq4sam-l",))
class Ptq4SamL(Ptq4SamS):
    """PTQ4SAM-L: PTQ4SAM-S, then QDrop reconstruction of every unit (iterations set by the preset)."""

    name = "ptq4sam"

    def calibrate(self, qmodel: Sam, fp_model: Sam, calib: CalibrationSet, spec: BitSpec,
                  preset: str, seed: int) -> None:
        from ptqbench.methods.qdrop import qdrop_reconstruct

        super().calibrate(qmodel, fp_model, calib, spec, preset, seed)
        qdrop_reconstruct(qmodel, fp_model, calib, preset, seed, progress=self.progress)
