"""AGQ (Adaptive Granularity Quantization, PTQ4SAM): the search of the log2 grid of a softmax site.

The grid is `ptqbench.quant.functional.fake_quant_log2`: base 2^(1/tau), scale s, values below
the smallest level become exactly 0. For each tau in {1, 2, 4} and each calibration image the
scale is found by bounded scalar minimisation (scipy `minimize_scalar(method="bounded")`) of the
attention-output error

    err(s) = mean(|(A_hat(s) - A) V|^p),   s in [min(0.1, 0.01 * max(A)), max(A)],

with A the attention probabilities and V the values of that image. Over images the chosen scales
are averaged and the errors summed; tau is the argmin of the summed error (ties: the smaller tau).
p = 2.4 follows the reference code (the paper writes p = 2).

`AgqSearch` accumulates one site; `AgqCapture` feeds it from forward hooks on an attention's
`softmax_quantizer` (its input is A) and `v_quantizer` (its output is V), so no forward code is
copied. Each map is searched as soon as it exists and then released: memory stays at one
attention map (plus a few temporaries of its size) however many images are calibrated.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from scipy.optimize import minimize_scalar
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ptqbench.errors import PtqbenchError
from ptqbench.quant import functional as qf

AGQ_TAUS: tuple[int, ...] = (1, 2, 4)
AGQ_P = 2.4


def agq_scale_bounds(attn_max: float) -> tuple[float, float]:
    """The search interval of the scale: [min(0.1, 0.01 * max(A)), max(A)]."""
    return min(0.1, 0.01 * attn_max), attn_max


@torch.no_grad()
def agq_error(attn: Tensor, value: Tensor, scale: float, tau: int, bits: int, p: float = AGQ_P,
              target: Tensor | None = None) -> float:
    """mean(|A_hat V - A V|^p) with A_hat the log2 fake-quantized A, in float32 as the reference's
    `LogAvgMSEFastObserver.loss_fx` (two products, then the difference; one scalar read back).

    attn: [..., Nq, Nk] non-negative; value: [..., Nk, D] with the same leading dims (as the SAM
    attentions multiply them: encoder [B*heads, N, N] and [B*heads, N, D], decoder
    [B, heads, Nq, Nk] and [B, heads, Nk, D]). target: A V when already computed (it does not
    depend on the scale, so a search computes it once).
    """
    if attn.shape[:-2] != value.shape[:-2] or attn.shape[-1] != value.shape[-2]:
        raise PtqbenchError(f"AGQ: attention map {tuple(attn.shape)} and values {tuple(value.shape)} do not multiply")
    target = attn @ value if target is None else target
    quantized = qf.fake_quant_log2(attn, torch.tensor(scale, dtype=attn.dtype, device=attn.device), tau, bits)
    return float((quantized @ value - target).abs().pow(p).mean())


def split_heads(attn: Tensor, value: Tensor) -> Tensor:
    """The values in the layout that multiplies the attention map.

    The decoder twin quantizes V before separating heads: value [B, Nk, C] with
    attn [B, heads, Nq, Nk] becomes [B, heads, Nk, C / heads] (segment_anything's head split).
    Values that already have the map's number of dims are returned as they are.
    """
    if value.dim() == attn.dim() - 1:
        heads = attn.shape[-3]
        return value.reshape(*value.shape[:-1], heads, value.shape[-1] // heads).transpose(-3, -2)
    return value


@dataclass
class AgqResult:
    """The outcome of a search: the chosen tau, its averaged scale, and every tau's summed error."""

    tau: int
    scale: float
    errors: dict[int, float]
    scales: dict[int, float]


@dataclass
class AgqSearch:
    """Accumulates the per-image searches of one softmax site (one `update` per image)."""

    bits: int
    taus: tuple[int, ...] = AGQ_TAUS
    p: float = AGQ_P
    max_iter: int | None = None
    images: int = 0
    scale_sums: dict[int, float] = field(default_factory=dict)
    error_sums: dict[int, float] = field(default_factory=dict)

    @torch.no_grad()
    def update(self, attn: Tensor, value: Tensor) -> None:
        """Search every tau on one image's attention map A [..., Nq, Nk] and values V.

        value: [..., Nk, D] with A's leading dims, or [B, Nk, C] for A [B, heads, Nq, Nk]
        (see `split_heads`).
        """
        attn = attn.detach().float()
        value = split_heads(attn, value.detach().float())
        low, high = agq_scale_bounds(attn.max().item())
        target = attn @ value
        for tau in self.taus:
            options = {} if self.max_iter is None else {"maxiter": self.max_iter}
            best = minimize_scalar(lambda s: agq_error(attn, value, s, tau, self.bits, self.p, target),
                                   bounds=(low, high), method="bounded", options=options)
            self.scale_sums[tau] = self.scale_sums.get(tau, 0.0) + float(best.x)
            self.error_sums[tau] = self.error_sums.get(tau, 0.0) + float(best.fun)
        self.images += 1

    def result(self) -> AgqResult:
        """tau = argmin of the summed error (first of `taus` on ties), scale = mean over images."""
        if self.images == 0:
            raise RuntimeError("AGQ search finished without seeing any attention map")
        tau = min(self.taus, key=lambda t: self.error_sums[t])
        scales = {t: self.scale_sums[t] / self.images for t in self.taus}
        return AgqResult(tau=tau, scale=scales[tau], errors=dict(self.error_sums), scales=scales)


class AgqCapture:
    """Runs `AgqSearch` on the attention maps of the given attention modules during forwards.

    attentions: site prefix -> a module with `softmax_quantizer` (input: A) and `v_quantizer`
    (output: V) children, e.g. the twins of `ptqbench.sam.quantized`; the bit width is the
    softmax quantizer's. Use as a context manager: the hooks exist only inside the `with` block;
    every call of a module is one `update`.
    """

    def __init__(self, attentions: Mapping[str, nn.Module], taus: Iterable[int] = AGQ_TAUS, p: float = AGQ_P,
                 max_iter: int | None = None) -> None:
        self.attentions = dict(attentions)
        self.searches = {name: AgqSearch(module.softmax_quantizer.bits, tuple(taus), p, max_iter)
                         for name, module in self.attentions.items()}
        self._pending: dict[str, dict[str, Tensor]] = {name: {} for name in self.attentions}
        self._handles: list[RemovableHandle] = []
        self._only: frozenset[str] | None = None

    @contextmanager
    def restricted_to(self, names: Iterable[str]) -> Iterator[None]:
        """Inside the block only the attentions `names` are searched; the others ignore their calls."""
        self._only = frozenset(names)
        try:
            yield
        finally:
            self._only = None

    def __enter__(self) -> "AgqCapture":
        for name, module in self.attentions.items():
            self._handles.append(module.v_quantizer.register_forward_hook(
                lambda _m, _args, out, name=name: self._receive(name, "value", out)))
            self._handles.append(module.softmax_quantizer.register_forward_pre_hook(
                lambda _m, args, name=name: self._receive(name, "attn", args[0])))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for pending in self._pending.values():
            pending.clear()

    def _receive(self, name: str, kind: str, tensor: Tensor) -> None:
        if self._only is not None and name not in self._only:
            return
        pending = self._pending[name]
        pending[kind] = tensor.detach()
        if len(pending) == 2:
            self.searches[name].update(pending.pop("attn"), pending.pop("value"))

    def results(self) -> dict[str, AgqResult]:
        """The result of every attention module, keyed like `attentions`."""
        return {name: search.result() for name, search in self.searches.items()}

