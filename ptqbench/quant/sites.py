"""Named quantization sites of a model, selection by glob, and the sealing rule for evaluation.

A site is a `FakeQuantizer` reached by its module path with the `_quantizer` suffix removed:
`image_encoder.blocks.3.attn.qkv.input_quantizer` is the site `image_encoder.blocks.3.attn.qkv.input`,
`image_encoder.blocks.3.attn.k_quantizer` is `image_encoder.blocks.3.attn.k`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

from ptqbench.errors import ConfigError, SealError
from ptqbench.quant.layers import QuantWeightLayer
from ptqbench.quant.quantizer import FakeQuantizer

_SUFFIX = "_quantizer"
_SHOWN_SITES = 5  # site names a SealError lists before "..."


def site_name(module_path: str) -> str:
    """Module path of a quantizer -> its stable site name."""
    return module_path[: -len(_SUFFIX)] if module_path.endswith(_SUFFIX) else module_path


def quantizer_sites(model: nn.Module) -> dict[str, FakeQuantizer]:
    """Every quantization site of `model`, in module order, keyed by site name."""
    return {site_name(path): m for path, m in model.named_modules() if isinstance(m, FakeQuantizer)}


def select_sites(model: nn.Module, patterns: str | Iterable[str]) -> dict[str, FakeQuantizer]:
    """Sites whose name matches any of the glob patterns (fnmatch; `*` crosses dots).

    Raises ConfigError when a pattern matches nothing (a typo must not silently select nothing).
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    sites = quantizer_sites(model)
    selected = {}
    for pattern in patterns:
        matched = {name: q for name, q in sites.items() if fnmatch.fnmatchcase(name, pattern)}
        if not matched:
            raise ConfigError(f"quantization site pattern {pattern!r} matches no site")
        selected.update(matched)
    return selected


def weight_layers(model: nn.Module) -> dict[str, QuantWeightLayer]:
    """Every quantizable Linear/Conv2d of `model`, keyed by module path."""
    return {path: m for path, m in model.named_modules() if isinstance(m, QuantWeightLayer)}


def seal_for_evaluation(model: nn.Module, fp_sites: Iterable[str] = ()) -> None:
    """Put a calibrated model in its evaluation state (the benchmark's fairness rule).

    Every site quantizes every element (mode "quantize", quantize_prob = 1, no random bypass),
    no observer is attached, learned scales become frozen buffers, every parameter stops
    requiring gradients, weights are fake-quantized once and frozen, and the model is in eval
    mode. fp_sites: glob patterns (as in `select_sites`) of the sites a method deliberately
    keeps in FP (`Method.fp_sites`); only those may still be off.

    Raises RuntimeError if a site is still observing (a method forgot to finish calibration),
    SealError naming the sites (the first few and their count) if any other site is still off.
    """
    sites = quantizer_sites(model)
    for name, quantizer in sites.items():
        if quantizer.mode == "observe" or quantizer.observer is not None:
            raise RuntimeError(f"quantization site {name} is still observing after calibration")
    patterns = list(fp_sites)
    left_off = [name for name, quantizer in sites.items() if quantizer.mode == "off"
                and not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
    if left_off:
        shown = ", ".join(left_off[:_SHOWN_SITES]) + (", ..." if len(left_off) > _SHOWN_SITES else "")
        raise SealError(f"{len(left_off)} of {len(sites)} quantization sites are still off after calibration "
                        f"({shown}); every site must quantize in evaluation unless the method declares it "
                        f"in fp_sites")
    for quantizer in sites.values():
        quantizer.quantize_prob = 1.0
        quantizer.freeze_scale()
    for param in model.parameters():
        param.requires_grad_(False)
    for layer in weight_layers(model).values():
        layer.freeze_weight()
    model.eval()
