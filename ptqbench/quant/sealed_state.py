"""The complete evaluation state of a sealed quantized model, and loading it into a fresh twin.

A calibrated model after `seal_for_evaluation` is fully described by
- its `state_dict` (every weight, with BIG sign folds and AdaRound's hard rounding already
  written into the weights, and every quantizer's `scale` / `zero_point` buffer), and
- the plain attributes of each quantization site that are not tensors: `mode` ("off" only at
  the FP sites its method declared, which the seal allowed), `bits`, `log2_tau` (AGQ's log2
  grid), `quantize_prob`, `is_weight` and `channel_axis`.
The frozen fake-quantized weights (`QuantWeightLayer.frozen_weight`, not in the state_dict) are
a deterministic function of the two, so loading re-seals the twin to recompute them.

Used to send rank 0's calibrated model to the other ranks of a data-parallel run; a twin
built with `quantize_sam(model, w_bits, a_bits)` from the same FP model receives it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ptqbench.errors import PtqbenchError
from ptqbench.quant.quantizer import FakeQuantizer
from ptqbench.quant.sites import seal_for_evaluation, site_name

SITE_ATTRIBUTES = ("bits", "mode", "log2_tau", "quantize_prob", "is_weight", "channel_axis")


@dataclass(frozen=True)
class SealedState:
    """state_dict: every parameter and buffer, on the CPU; quantizers: the module path of each
    quantizer (`<site>_quantizer`, its state_dict prefix) -> its SITE_ATTRIBUTES."""

    state_dict: dict[str, Tensor]
    quantizers: dict[str, dict[str, Any]]


def _quantizers(model: nn.Module) -> dict[str, FakeQuantizer]:
    return {path: module for path, module in model.named_modules() if isinstance(module, FakeQuantizer)}


def sealed_state(model: nn.Module) -> SealedState:
    """The evaluation state of a sealed model (tensors copied to the CPU)."""
    quantizers = _quantizers(model)
    for path, quantizer in quantizers.items():
        if quantizer.mode == "observe" or quantizer.learns_scale:
            raise PtqbenchError(f"quantizer {path} is not sealed: call seal_for_evaluation first")
    return SealedState(
        state_dict={key: value.detach().cpu().clone() for key, value in model.state_dict().items()},
        quantizers={path: {attr: getattr(q, attr) for attr in SITE_ATTRIBUTES} for path, q in quantizers.items()})


def load_sealed_state(model: nn.Module, state: SealedState) -> None:
    """Make `model` (a twin with the same sites) compute exactly what the sealed model computes.

    Sets each site's attributes, gives its scale / zero point the calibrated shapes (per-channel
    quantizers hold [C] tensors where a fresh twin holds 0-d ones), loads the state_dict
    strictly, and seals the model (frozen weights recomputed, eval mode, no gradients), allowing
    exactly the sites that are off in `state` to stay off (the seal that made `state` allowed them).
    """
    quantizers = _quantizers(model)
    if set(quantizers) != set(state.quantizers):
        missing = sorted(set(state.quantizers) - set(quantizers))
        extra = sorted(set(quantizers) - set(state.quantizers))
        raise PtqbenchError(f"the model's quantizers differ from the sealed state's: "
                            f"missing {missing[:3]}, unexpected {extra[:3]}")
    for path, quantizer in quantizers.items():
        for attr, value in state.quantizers[path].items():
            setattr(quantizer, attr, value)
        for buffer_name in ("scale", "zero_point"):
            loaded = state.state_dict[f"{path}.{buffer_name}"]
            current = getattr(quantizer, buffer_name)
            if current.shape != loaded.shape:
                setattr(quantizer, buffer_name, torch.empty(loaded.shape, dtype=loaded.dtype, device=current.device))
    model.load_state_dict(state.state_dict, strict=True)
    fp_sites = [site_name(path) for path, attributes in state.quantizers.items() if attributes["mode"] == "off"]
    seal_for_evaluation(model, fp_sites)
