"""Perceptual-Consistency Clipping (PCC, SAQ-SAM, methods/saqsam.md): clip ranges of the
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
token-to-image and image-to-token of both two-way layers, and the final token-to-image); in each,
greedily, the 4 QK quantizers `q_proj.input`, `k_proj.input`, `q`, `k`, each left quantizing at
its best candidate before the next is searched. Candidates are the 29 symmetric percentile clips
`(quantile(X, 1 - p), quantile(X, p))` of the site's activation X on one calibration image; the
lowest distance wins (first on ties). Weights, softmax and every other site stay FP; the reference
maps come from the FP model. As in the reference, the search runs inside two real forwards of the
model on the search image: in the first, each attention is searched when the forward reaches it
and then runs with its QK sites quantizing, so later attentions already see the upstream
clipping; in the second, each site is searched again with its attention's other three sites at
their latest picks. The picks of the second pass stay set (an LSQ scale made learnable later
starts from them).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ptqbench.errors import ConfigError, PtqbenchError
from ptqbench.models.adapter import adapter_for
from ptqbench.models.calibration import CalibrationSample
from ptqbench.progress import phase
from ptqbench.quant import functional as qf
from ptqbench.quant.layers import QuantWeightLayer
from ptqbench.quant.lockstep import deferral_limit
from ptqbench.quant.quantizer import FakeQuantizer
from ptqbench.quant.sites import quantizer_sites
from ptqbench.recon.cache import capture
from ptqbench.recon.unit import HookPoint

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


def focus_masks(attn: Tensor, theta: float = DEFAULT_THETA) -> Tensor:
    """M = 1[A > theta * max over keys of A], as float 0/1. attn: [..., Nq, Nk] -> same shape."""
    return (attn > theta * attn.amax(dim=-1, keepdim=True)).to(attn.dtype)


def focus_iou(reference: Tensor, quantized: Tensor, theta: float = DEFAULT_THETA) -> Tensor:
    """The focus IoU per (prompt, head): sum(min(M, M_hat)) / (sum(max(M, M_hat)) + 1e-6).

    reference: attention maps [..., Nq, Nk] (decoder: [prompts, heads, Nq, Nk]); quantized: maps of
    the same shape, or a stack of them [C, ...] (one per candidate) -> IoU [...] or [C, ...] (sums
    over Nq and Nk). The sums count 0/1 masks, exact in float32 whatever their order, so a stack
    gives each candidate the IoU it gets alone, bit for bit.
    """
    if quantized.shape[quantized.dim() - reference.dim():] != reference.shape:
        raise ValueError(f"attention maps of shapes {tuple(reference.shape)} and {tuple(quantized.shape)} differ")
    m, m_hat = focus_masks(reference, theta), focus_masks(quantized, theta)
    inter = torch.minimum(m, m_hat).sum(dim=(-2, -1))
    union = torch.maximum(m, m_hat).sum(dim=(-2, -1))
    return inter / (union + IOU_EPS)


def focus_distance(reference: Tensor, quantized: Tensor, theta: float = DEFAULT_THETA) -> Tensor:
    """mean(1 - focus IoU) over prompts and heads (0 for maps with the same focus), a 0-d tensor
    on the maps' device (not read back, so a search can score every candidate before one read)."""
    return distance_of_iou(focus_iou(reference, quantized, theta))


def distance_of_iou(iou: Tensor) -> Tensor:
    """mean(1 - IoU) of one map's focus IoUs [prompts, heads], a 0-d tensor."""
    return (1.0 - iou).mean()


def candidate_distances(reference: Tensor, stacked: Tensor, theta: float = DEFAULT_THETA) -> Tensor:
    """`focus_distance(reference, stacked[c])` for every candidate c, bit for bit: [C] on the maps'
    device. reference: [..., Nq, Nk]; stacked: [C, ..., Nq, Nk]. The IoUs come from one pass over the
    stack; each candidate's mean is its own reduction, as it is alone (a batched mean may sum in
    another order)."""
    return torch.stack([distance_of_iou(candidate_iou) for candidate_iou in focus_iou(reference, stacked, theta)])


TORCH_QUANTILE_LIMIT = 2**24
"""Above this many elements torch 1.10's `torch.quantile` refuses a tensor and the reference falls
back to `numpy.percentile` (`quant_model.py:359-372`)."""


def reference_quantile(values: Tensor, q: float) -> Tensor:
    """The q-quantile of sorted float32 `values` [N] with the reference's arithmetic (0-d float32).

    Up to `TORCH_QUANTILE_LIMIT` elements as `torch.quantile`: the rank q (N - 1) and the
    interpolation weight in float32, then `lerp`; above it as `numpy.percentile(x, 100 q)`: rank
    and interpolation in float64 (numpy's two-sided lerp), rounded to float32 at the end.

    Why it is not `ptqbench.quant.observers.row_quantile`: that one takes the rank in float64 at
    every size, so below 2^24 elements it differs from `torch.quantile`'s float32 rank in the last
    bits, and PCC's candidate clips must match the reference's to the bit.
    """
    n = values.numel()
    if n <= TORCH_QUANTILE_LIMIT:
        rank = np.float32(q) * np.float32(n - 1)
        below, above = int(np.floor(rank)), int(np.ceil(rank))
        return torch.lerp(values[below], values[above], float(rank - np.float32(below)))
    rank = (q * 100.0 / 100.0) * (n - 1)
    below, above = int(math.floor(rank)), int(math.ceil(rank))
    low, high, weight = float(values[below]), float(values[above]), rank - below
    value = low + (high - low) * weight if weight < 0.5 else high - (high - low) * (1.0 - weight)
    return torch.tensor(value, dtype=torch.float32, device=values.device)


def percentile_candidates(x: Tensor, percentiles: Sequence[float] = PCC_PERCENTILES) -> list[tuple[Tensor, Tensor]]:
    """The symmetric percentile clips `(quantile(x, 1 - p), quantile(x, p))` for each p.

    x: any shape (flattened; one sort, then `reference_quantile` per clip). Returns 0-d float32
    tensors on x's device, in the order of `percentiles`.
    """
    values = x.detach().float().flatten().sort().values
    if values.numel() == 0:
        raise PtqbenchError("PCC got an empty activation")
    candidates = []
    for p in percentiles:
        if not 0.5 <= p <= 1.0:
            raise ConfigError(f"PCC percentile {p} must lie in [0.5, 1]")
        candidates.append((reference_quantile(values, 1.0 - p), reference_quantile(values, p)))
    return candidates


@dataclass(frozen=True)
class ClipChoice:
    """The outcome of one site's search: the winning percentile, its range, its focus distance,
    and every candidate range with its distance (in the order of the percentiles)."""

    percentile: float
    x_min: float
    x_max: float
    distance: float
    distances: tuple[float, ...]
    candidates: tuple[tuple[float, float], ...]


def search_clip(quantizer: FakeQuantizer, activation: Tensor,
                distances: Callable[[list[tuple[Tensor, Tensor]]], Tensor],
                percentiles: Sequence[float] = PCC_PERCENTILES) -> ClipChoice:
    """Greedy step of PCC: score each percentile clip of `activation` on `quantizer`, keep the best.

    quantizer: the site searched (uniform grid; left in quantize mode at the winning range).
    activation: the site's input on the search image (any shape). distances: (candidate ranges,
    each a pair of 0-d tensors) -> their focus distances [C] (a tensor, read back once per site),
    each the distance of the model with `quantizer` at that range (`score_candidates`).
    """
    candidates = percentile_candidates(activation, percentiles)
    scores = distances(candidates).tolist()
    best = min(range(len(candidates)), key=scores.__getitem__)
    x_min, x_max = candidates[best]
    quantizer.set_range(x_min, x_max)
    return ClipChoice(float(percentiles[best]), float(x_min), float(x_max), scores[best], tuple(scores),
                      tuple((float(lo), float(hi)) for lo, hi in candidates))


QUERY_SIDE_SITES: frozenset[str] = frozenset({"q_proj.input", "q"})
"""The QK sites on the query side of the logits (`query_heads`); the others are on the key side."""
STACK_INTERMEDIATES = 6
"""About how many tensors of a stack's size `score_candidates` holds at once (logits, maps, masks)."""


def score_candidates(attention: nn.Module, site: str, q: Tensor, k: Tensor, reference_map: Tensor,
                     candidates: Sequence[tuple[Tensor, Tensor]], theta: float = DEFAULT_THETA) -> Tensor:
    """The focus distance of `attention.attention_map(q, k)` to `reference_map` with the QK site
    `site` at each candidate range: [C], bit for bit what `focus_distance` gives each alone.

    The other side of the logits is computed once; per candidate, the site's side and its logits
    (the same kernels as `attention_logits`), then the softmax and the masks of a stack of
    candidates in one pass each (row by row, so the same values). Stacks hold as many candidates
    as `deferral_limit` of the device allows. The site is left at the last candidate.
    attention: a decoder attention twin; q [B, Nq, C], k [B, Nk, C]; reference_map [B, heads, Nq, Nk].
    """
    quantizer = attention.get_submodule(f"{site}_quantizer")
    scales, zero_points = qf.affine_qparams(torch.stack([lo for lo, _ in candidates]).float(),
                                            torch.stack([hi for _, hi in candidates]).float(), quantizer.bits)
    query_side = site in QUERY_SIDE_SITES
    fixed = attention.key_heads(k) if query_side else attention.query_heads(q)
    per_stack = max(1, deferral_limit(reference_map.device)
                    // (STACK_INTERMEDIATES * reference_map.numel() * reference_map.element_size()))
    distances = []
    for start in range(0, len(candidates), per_stack):
        logits = []
        for index in range(start, min(start + per_stack, len(candidates))):
            quantizer.set_qparams(scales[index], zero_points[index])
            moving = attention.query_heads(q) if query_side else attention.key_heads(k)
            logits.append(attention.logits(moving, fixed) if query_side else attention.logits(fixed, moving))
        distances.append(candidate_distances(reference_map, torch.softmax(torch.stack(logits), dim=-1), theta))
    return torch.cat(distances)


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

    def search_sample(self, sample: CalibrationSample) -> CalibrationSample:
        """The search image with the box prompts PCC searches with (the first `max_prompts`)."""
        return sample.first_prompts(self.max_prompts)


@dataclass(frozen=True)
class PccChoice:
    """One site's search result in one pass (`pass_index` 0 or 1); `site` is the full site name."""

    site: str
    pass_index: int
    choice: ClipChoice


def read_input(model: nn.Module, path: str, forward: Callable[[nn.Module], object]) -> Tensor:
    """The first argument of module `path` in `forward(model)` (detached); the forward stops right
    there (`ptqbench.recon.cache.capture`). Raises RuntimeError when it never calls that module."""
    point = HookPoint(path, "pre", lambda args, kwargs, output: {"input": args[0]})
    return capture(model, [point], lambda module, _: forward(module), None)["input"]


def _query_and_key(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    """The q and k arguments of a decoder attention call `attention(q, k, v)` (positional or named)."""
    bound = dict(zip(("q", "k", "v"), args))
    bound.update(kwargs)
    return bound["q"].detach(), bound["k"].detach()


def search_attention(attention: nn.Module, q: Tensor, k: Tensor, reference_map: Tensor,
                     config: PccConfig, pass_index: int = 0, prefix: str = "") -> list[PccChoice]:
    """One PCC pass over the QK sites of one attention called with (q, k), in `config.sites` order.

    Each site's activation is read with the attention's other sites as they are now (earlier
    sites of this pass at their picks, later ones as the previous pass left them, or off), its
    candidates are scored by the focus distance of `attention.attention_map(q, k)` to
    `reference_map` [B, heads, Nq, Nk] (`score_candidates`), and the site is left quantizing at
    its pick: SAQ-SAM's `search_range_AOL` (`quant_model.py:349-419`). `prefix` names the
    attention in the results.
    attention: a decoder attention twin (`ModelAdapter.decoder_attentions`).
    """
    results = []
    for site in config.sites:
        quantizer = attention.get_submodule(f"{site}_quantizer")
        activation = read_input(attention, f"{site}_quantizer", lambda module: module.attention_map(q, k))

        distances = partial(score_candidates, attention, site, q, k, reference_map, theta=config.theta)
        choice = search_clip(quantizer, activation, distances, config.percentiles)
        results.append(PccChoice(f"{prefix}{site}", pass_index, choice))
        log.debug("PCC pass %d %s%s: p=%s range [%.4g, %.4g] distance %.4f", pass_index, prefix, site,
                  choice.percentile, choice.x_min, choice.x_max, choice.distance)
    return results


@torch.no_grad()
def reference_maps(model: nn.Module, sample: CalibrationSample) -> dict[str, Tensor]:
    """The FP attention map [B, heads, Nq, Nk] of every decoder attention on one sample, by path:
    one forward of `model` (the reference's `set_ori_ATM` pass), a quantizable twin that computes
    in FP (every site off or observing, e.g. the adapter's `fp_twin`, or the twin before calibration)."""
    adapter = adapter_for(model)
    maps: dict[str, Tensor] = {}

    def hook(path: str) -> Callable:
        return lambda module, args, kwargs: maps.__setitem__(path, module.attention_map(*_query_and_key(args, kwargs)))

    handles = [module.register_forward_pre_hook(hook(path), with_kwargs=True)
               for path, module in adapter.decoder_attentions(model).items()]
    try:
        adapter.forward(model, sample)
    finally:
        for handle in handles:
            handle.remove()
    return maps


def _check_only_qk_sites(qmodel: nn.Module, searched: set[str]) -> None:
    """PCC runs with weights, softmax and every other site FP: refuse a model where one quantizes
    (sites that only observe are identities and may stay, as the reference's observers do)."""
    busy = [name for name, q in quantizer_sites(qmodel).items() if name not in searched and q.mode == "quantize"]
    frozen = [path for path, m in qmodel.named_modules()
              if isinstance(m, QuantWeightLayer) and m.frozen_weight is not None]
    if busy or frozen:
        raise PtqbenchError(f"PCC needs every site other than the decoder QK sites FP (weights and softmax FP "
                            f"during the search); set already: {(busy + frozen)[:5]}")


@torch.no_grad()
def pcc_search(qmodel: nn.Module, fp_model: nn.Module, sample: CalibrationSample, config: PccConfig = PccConfig(),
               *, maps: dict[str, Tensor] | None = None, progress: bool = True) -> list[PccChoice]:
    """Run PCC on `qmodel` with the search image `sample`; returns every site choice of every pass.

    As the reference (SAQ-SAM `test_quant_SAQ_m.py:786-803`, `quant_model.py:426-467`): the FP
    maps come from one FP forward; then each pass is one real forward of `qmodel` in which every
    decoder attention, when the forward reaches it, searches its QK sites (`search_attention`) on
    the arguments it was called with and then runs with them quantizing, so later attentions see
    the upstream clipping. In the second pass each site is searched with its attention's other
    sites at their latest picks. Sites that observe (other methods' observers) see those forwards
    as the reference's observers do. qmodel: the quantizable twin, nothing but the QK sites
    quantizing (`_check_only_qk_sites`). maps: the FP maps (`reference_maps`) when the caller
    already computed them on `config.search_sample(sample)`, else from one forward of the FP twin
    of `fp_model`. On return the 4 x 7 QK sites quantize at their last picks.
    """
    adapter = adapter_for(qmodel)
    attentions = adapter.decoder_attentions(qmodel)
    sites = quantizer_sites(qmodel)
    searched = {f"{path}.{site}" for path in attentions for site in config.sites}
    missing = sorted(searched - set(sites))
    if missing:
        raise ConfigError(f"PCC sites {missing[:3]} do not exist in the model")
    _check_only_qk_sites(qmodel, searched)
    for name in searched:
        sites[name].mode = "off"
    sample = config.search_sample(sample)
    if maps is None:
        maps = reference_maps(adapter.fp_twin(fp_model), sample)
    results: list[PccChoice] = []
    bar = tqdm(total=config.passes * len(attentions), desc=phase("PCC search"), disable=not progress, leave=False)

    def hook(path: str, pass_index: int) -> Callable:
        def search(module: nn.Module, args: tuple, kwargs: dict) -> None:
            q, k = _query_and_key(args, kwargs)
            results.extend(search_attention(module, q, k, maps[path], config, pass_index, f"{path}."))
            bar.update()
        return search

    for pass_index in range(config.passes):
        handles = [module.register_forward_pre_hook(hook(path, pass_index), with_kwargs=True)
                   for path, module in attentions.items()]
        try:
            adapter.forward(qmodel, sample)
        finally:
            for handle in handles:
                handle.remove()
    bar.close()
    return results
