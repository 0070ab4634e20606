"""Perceptual-Consistency Clipping (PCC, SAQ-SAM, methods.md section 5): clip ranges of the
mask decoder's query/key activations chosen by how well the quantized attention keeps its focus.

The attention map of a decoder attention is `A = softmax(Q K^T / sqrt(d))`, shape
[prompts, heads, Nq, Nk]. Its focus mask keeps, in every query row, the keys that receive more
than `theta` times the row's largest weight: `M = 1[A > theta * max_over_keys(A)]`. Per
(prompt, head) the focus IoU of the FP map A and the quantized map A_hat is
`sum(min(M, M_hat)) / (sum(max(M, M_hat)) + 1e-6)` (sums over Nq and Nk), and the focus distance is
`mean(1 - IoU)` over prompts and heads. PCC scores candidate clipping ranges by that distance
instead of the activation's own reconstruction error, which lets it clip the huge outliers of
SAM's decoder QK activations (about [-167, 177] in SAM-B while most values lie in [-1, 1]) that an
MSE search keeps.

The search (`pcc_search`) covers the 7 attentions of `mask_decoder.transformer` (self-attention,
token-to-image and image-to-token of both two-way layers, and the final token-to-image) in
forward order; in each, greedily, the 4 QK quantizers `q_proj.input`, `k_proj.input`, `q`, `k`,
each frozen at its best candidate before the next is searched. Candidates are the 29 symmetric
percentile clips `(quantile(X, 1 - p), quantile(X, p))` of the site's activation X on one
calibration image; the lowest distance wins (first on ties). Weights, softmax and every other site
stay FP; the reference maps come from the FP model. The whole search runs twice: in the first
pass every other attention's QK sites are FP (each attention is searched on its own), in the
second pass the other attentions quantize at their latest ranges, so each attention is searched
again seeing its upstream attentions already clipped. The ranges of the last pass stay set (the
sites are left in quantize mode; an LSQ scale made learnable later starts from them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from segment_anything.modeling import Sam
from torch import Tensor, nn
from tqdm.auto import tqdm

from ptqbench.errors import ConfigError, PtqbenchError
from ptqbench.quant.layers import QuantWeightLayer
from ptqbench.quant.quantizer import FakeQuantizer
from ptqbench.quant.sites import quantizer_sites
from ptqbench.sam.calibration import CalibrationSample
from ptqbench.sam.inference import sam_decode
from ptqbench.sam.quantized import QuantDecoderAttention, quantize_sam

log = logging.getLogger(__name__)

PCC_PERCENTILES: tuple[float, ...] = (
    0.85, 0.87, 0.88, 0.89, 0.90, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.965, 0.97, 0.975, 0.98,
    0.983, 0.985, 0.987, 0.989, 0.99, 0.993, 0.995, 0.997, 0.999, 0.9993, 0.9995, 0.9997, 0.9999,
    0.99999,
)
QK_SITES: tuple[str, ...] = ("q_proj.input", "k_proj.input", "q", "k")
"""The searched sites of each attention, in search order (relative to the attention module)."""
DEFAULT_THETA = 0.5
IOU_EPS = 1e-6
DECODER = "mask_decoder.transformer"


def focus_masks(attn: Tensor, theta: float = DEFAULT_THETA) -> Tensor:
    """M = 1[A > theta * max over keys of A], as float 0/1. attn: [..., Nq, Nk] -> same shape."""
    return (attn > theta * attn.amax(dim=-1, keepdim=True)).to(attn.dtype)


def focus_iou(reference: Tensor, quantized: Tensor, theta: float = DEFAULT_THETA) -> Tensor:
    """The focus IoU per (prompt, head): sum(min(M, M_hat)) / (sum(max(M, M_hat)) + 1e-6).

    reference, quantized: attention maps [..., Nq, Nk] (decoder: [prompts, heads, Nq, Nk]) ->
    IoU [...] (sums over Nq and Nk).
    """
    if reference.shape != quantized.shape:
        raise ValueError(f"attention maps of shapes {tuple(reference.shape)} and {tuple(quantized.shape)} differ")
    m, m_hat = focus_masks(reference, theta), focus_masks(quantized, theta)
    inter = torch.minimum(m, m_hat).sum(dim=(-2, -1))
    union = torch.maximum(m, m_hat).sum(dim=(-2, -1))
    return inter / (union + IOU_EPS)


def focus_distance(reference: Tensor, quantized: Tensor, theta: float = DEFAULT_THETA) -> float:
    """mean(1 - focus IoU) over prompts and heads (0 for maps with the same focus)."""
    return float((1.0 - focus_iou(reference, quantized, theta)).mean())


def percentile_candidates(x: Tensor, percentiles: Sequence[float] = PCC_PERCENTILES) -> list[tuple[Tensor, Tensor]]:
    """The symmetric percentile clips `(quantile(x, 1 - p), quantile(x, p))` for each p.

    x: any shape (flattened; any size: one sort, then linear interpolation between order
    statistics as `torch.quantile` does). Returns 0-d float32 tensors on x's device, in the order
    of `percentiles`.
    """
    values = x.detach().float().flatten().sort().values
    n = values.numel()
    if n == 0:
        raise PtqbenchError("PCC got an empty activation")

    def quantile(q: float) -> Tensor:
        pos = q * (n - 1)
        below = min(int(pos), n - 1)
        above = min(below + 1, n - 1)
        return torch.lerp(values[below], values[above], pos - below)

    candidates = []
    for p in percentiles:
        if not 0.5 <= p <= 1.0:
            raise ConfigError(f"PCC percentile {p} must lie in [0.5, 1]")
        candidates.append((quantile(1.0 - p), quantile(p)))
    return candidates


@dataclass(frozen=True)
class ClipChoice:
    """The outcome of one site's search: the winning percentile, its range, its focus distance,
    and the distance of every candidate (in the order of the percentiles)."""

    percentile: float
    x_min: float
    x_max: float
    distance: float
    distances: tuple[float, ...]


def search_clip(quantizer: FakeQuantizer, activation: Tensor, distance: Callable[[], float],
                percentiles: Sequence[float] = PCC_PERCENTILES) -> ClipChoice:
    """Greedy step of PCC: try each percentile clip of `activation` on `quantizer`, keep the best.

    quantizer: the site searched (uniform grid; left in quantize mode at the winning range).
    activation: the site's input on the search image (any shape). distance: () -> the focus
    distance of the model as it is now (called once per candidate, with the candidate set).
    """
    candidates = percentile_candidates(activation, percentiles)
    distances = []
    for x_min, x_max in candidates:
        quantizer.set_range(x_min, x_max)
        distances.append(distance())
    best = min(range(len(candidates)), key=distances.__getitem__)
    x_min, x_max = candidates[best]
    quantizer.set_range(x_min, x_max)
    return ClipChoice(float(percentiles[best]), float(x_min), float(x_max), distances[best], tuple(distances))


@dataclass(frozen=True)
class PccConfig:
    """theta: the focus threshold; percentiles: the candidate clips; passes: how many times the
    whole search runs (the reference: 2); sites: the QK sites of each attention in search order;
    max_prompts: search with at most the first this many box prompts of the search image (None:
    all of them, as the reference)."""

    theta: float = DEFAULT_THETA
    percentiles: tuple[float, ...] = PCC_PERCENTILES
    passes: int = 2
    sites: tuple[str, ...] = QK_SITES
    max_prompts: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.theta < 1.0:
            raise ConfigError(f"PCC theta must lie in (0, 1), got {self.theta}")
        if self.passes < 1 or not self.percentiles or not self.sites:
            raise ConfigError("PCC needs at least one pass, one percentile and one site")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"PCC max_prompts must be at least 1, got {self.max_prompts}")


@dataclass(frozen=True)
class PccChoice:
    """One site's search result in one pass (`pass_index` 0 or 1); `site` is the full site name."""

    site: str
    pass_index: int
    choice: ClipChoice


def decoder_attentions(model: nn.Module) -> dict[str, QuantDecoderAttention]:
    """The quantizable attentions of the mask decoder's transformer (7 in SAM), in forward order."""
    return {f"{DECODER}.{name}": module for name, module in model.get_submodule(DECODER).named_modules()
            if isinstance(module, QuantDecoderAttention)}


class _Reached(Exception):
    """Raised by a probe hook to end a forward once the tensor it reads exists."""


def read_input(model: nn.Module, path: str, forward: Callable[[nn.Module], object]) -> Tensor:
    """The first argument of module `path` in `forward(model)`; the forward stops right there.

    Raises RuntimeError when the forward never calls that module.
    """
    found: list[Tensor] = []

    def hook(module: nn.Module, args: tuple) -> None:
        found.append(args[0].detach())
        raise _Reached

    handle = model.get_submodule(path).register_forward_pre_hook(hook)
    try:
        forward(model)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not found:
        raise RuntimeError(f"the forward never reached {path}")
    return found[0]


def _check_only_qk_sites(qmodel: nn.Module, searched: set[str]) -> None:
    """PCC runs with weights, softmax and every other site FP: refuse a model where one is set."""
    busy = [name for name, q in quantizer_sites(qmodel).items() if name not in searched and q.mode != "off"]
    frozen = [path for path, m in qmodel.named_modules() if isinstance(m, QuantWeightLayer) and m.frozen_weight is not None]
    if busy or frozen:
        raise PtqbenchError(f"PCC needs every site other than the decoder QK sites off (weights and softmax FP "
                            f"during the search); set already: {(busy + frozen)[:5]}")


class _Arguments:
    """The call arguments of the decoder attentions of one model on the search image.

    The encoder runs once; each `capture` runs the decoder up to the attention asked for. An
    attention's map depends only on its inputs (fixed while it is searched) and its own
    quantizers, so each candidate re-runs just that attention (`attention_read`).
    """

    def __init__(self, model: Sam, sample: CalibrationSample, max_prompts: int | None) -> None:
        self.model = model
        self.boxes = sample.boxes if max_prompts is None else sample.boxes[:max_prompts]
        self.embedding = model.image_encoder(sample.image)

    def capture(self, path: str) -> tuple[tuple, dict]:
        """(args, kwargs) of the call of attention `path` in a decoder run (detached).

        The values `v` are cut to their first token: every read stops at or before the softmax,
        which does not depend on them, so projecting all of them would be wasted work.
        """
        found: list[tuple[tuple, dict]] = []

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kwargs = {k: v.detach() for k, v in kwargs.items()}
            if "v" in kwargs:
                kwargs["v"] = kwargs["v"][:, :1]
            found.append((tuple(a.detach() for a in args), kwargs))
            raise _Reached

        handle = self.model.get_submodule(path).register_forward_pre_hook(hook, with_kwargs=True)
        try:
            sam_decode(self.model, self.embedding, self.boxes)
        except _Reached:
            pass
        finally:
            handle.remove()
        if not found:
            raise RuntimeError(f"the decoder never called {path}")
        return found[0]


def attention_read(attention: nn.Module, arguments: tuple[tuple, dict], path: str) -> Tensor:
    """The input of `attention`'s submodule `path` (e.g. "softmax_quantizer": the map A) when the
    attention runs on `arguments`; the attention stops there."""
    args, kwargs = arguments
    return read_input(attention, path, lambda module: module(*args, **kwargs))


@torch.no_grad()
def pcc_search(qmodel: Sam, fp_model: Sam, sample: CalibrationSample, config: PccConfig = PccConfig(),
               *, progress: bool = True) -> list[PccChoice]:
    """Run PCC on `qmodel` with the search image `sample`; returns every site choice of every pass.

    qmodel: the quantizable twin (`quantize_sam`), every site off except possibly the searched QK
    sites (their previous state is discarded). fp_model: the FP model the reference maps come
    from (a folded BIG sign leaves the maps unchanged). On return the 4 x 7 QK sites quantize at
    the ranges of the last pass; every other site is untouched.
    """
    attentions = decoder_attentions(qmodel)
    site_names = {path: [f"{path}.{site}" for site in config.sites] for path in attentions}
    sites = quantizer_sites(qmodel)
    missing = [name for names in site_names.values() for name in names if name not in sites]
    if missing:
        raise ConfigError(f"PCC sites {missing[:3]} do not exist in the model")
    _check_only_qk_sites(qmodel, {name for names in site_names.values() for name in names})
    reference = quantize_sam(fp_model, 8, 8)  # every site off: bit-exact FP, with a readable softmax input
    ref_arguments = _Arguments(reference, sample, config.max_prompts)
    maps = {path: attention_read(reference.get_submodule(path), ref_arguments.capture(path), "softmax_quantizer")
            for path in attentions}
    del reference, ref_arguments
    arguments = _Arguments(qmodel, sample, config.max_prompts)
    chosen: dict[str, ClipChoice] = {}
    results: list[PccChoice] = []
    total = config.passes * sum(len(names) for names in site_names.values())
    bar = tqdm(total=total, desc="PCC search", disable=not progress, leave=False)
    for pass_index in range(config.passes):
        for names in site_names.values():
            for name in names:
                _apply(sites[name], chosen.get(name) if pass_index > 0 else None)
        for path, names in site_names.items():
            for name in names:
                sites[name].mode = "off"
            attention, inputs = attentions[path], arguments.capture(path)

            def distance(attention: nn.Module = attention, inputs: tuple = inputs, path: str = path) -> float:
                return focus_distance(maps[path], attention_read(attention, inputs, "softmax_quantizer"), config.theta)

            for site, name in zip(config.sites, names):
                activation = attention_read(attention, inputs, f"{site}_quantizer")
                choice = search_clip(sites[name], activation, distance, config.percentiles)
                chosen[name] = choice
                results.append(PccChoice(name, pass_index, choice))
                log.debug("PCC pass %d %s: p=%s range [%.4g, %.4g] distance %.4f", pass_index, name,
                          choice.percentile, choice.x_min, choice.x_max, choice.distance)
                bar.update()
            if pass_index == 0:
                for name in names:
                    sites[name].mode = "off"
    bar.close()
    for names in site_names.values():
        for name in names:
            _apply(sites[name], chosen[name])
    return results


def _apply(quantizer: FakeQuantizer, choice: ClipChoice | None) -> None:
    """Set a site to a chosen range (quantize mode), or switch it off for None."""
    if choice is None:
        quantizer.mode = "off"
    else:
        quantizer.set_range(torch.tensor(choice.x_min), torch.tensor(choice.x_max))
