"""AGQ (Adaptive Granularity Quantization, PTQ4SAM): the search of the log2 grid of a softmax site.

The grid is `ptqbench.quant.functional.fake_quant_log2`: base 2^(1/tau), scale s, values below
the smallest level become exactly 0. For each tau in {1, 2, 4} and each calibration image the
scale is found by bounded scalar minimisation (scipy's `minimize_scalar(method="bounded")`) of the
attention-output error

    err(s) = mean(|(A_hat(s) - A) V|^p),   s in [min(0.1, 0.01 * max(A)), max(A)],

with A the attention probabilities and V the values of that image. Over images the chosen scales
are averaged and the errors summed; tau is the argmin of the summed error (ties: the smaller tau).
p = 2.4 follows the reference code (the paper writes p = 2).

Each search is the reference's bounded Brent search (`bounded_brent`), run in lockstep with the
other taus and the other attention maps (`run_lockstep`): every step scores all pending
candidates on the device and reads their losses back at once.

`AgqSearch` accumulates one site; `AgqCapture` feeds it from forward hooks on an attention's
`softmax_quantizer` (its input is A) and `v_quantizer` (its output is V), so no forward code is
copied. It keeps copies of the maps until they exceed `deferral_limit` (or the results are
asked for), then searches all of them together and releases them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ptqbench.errors import PtqbenchError
from ptqbench.quant import functional as qf
from ptqbench.quant.bounded_brent import Search, bounded_brent
from ptqbench.quant.lockstep import deferral_limit, run_lockstep
from ptqbench.transfer import upload

AGQ_TAUS: tuple[int, ...] = (1, 2, 4)
AGQ_P = 2.4


def agq_scale_bounds(attn_max: float) -> tuple[float, float]:
    """The search interval of the scale: [min(0.1, 0.01 * max(A)), max(A)]."""
    return min(0.1, 0.01 * attn_max), attn_max


def check_multiplies(attn: Tensor, value: Tensor) -> None:
    """Raise unless A [..., Nq, Nk] and V [..., Nk, D] have the same leading dims and multiply."""
    if attn.shape[:-2] != value.shape[:-2] or attn.shape[-1] != value.shape[-2]:
        raise PtqbenchError(
            f"AGQ: attention map {tuple(attn.shape)} and values {tuple(value.shape)} do not multiply")


@torch.no_grad()
def agq_loss(attn: Tensor, value: Tensor, scale: Tensor, tau: int, bits: int, p: float = AGQ_P,
             target: Tensor | None = None) -> Tensor:
    """mean(|A_hat V - A V|^p) with A_hat the log2 fake-quantized A, in float32 as the reference's
    `LogAvgMSEFastObserver.loss_fx` (two products, then the difference), as a 0-d tensor on
    A's device (nothing is read back).

    attn: [..., Nq, Nk] non-negative; value: [..., Nk, D] with the same leading dims (as the SAM
    attentions multiply them: encoder [B*heads, N, N] and [B*heads, N, D], decoder
    [B, heads, Nq, Nk] and [B, heads, Nk, D]); scale: 0-d float32 on A's device. target: A V
    when already computed (it does not depend on the scale, so a search computes it once).
    """
    target = attn @ value if target is None else target
    quantized = qf.fake_quant_log2(attn, scale, tau, bits)
    return (quantized @ value - target).abs().pow(p).mean()


def agq_error(attn: Tensor, value: Tensor, scale: float, tau: int, bits: int, p: float = AGQ_P,
              target: Tensor | None = None) -> float:
    """`agq_loss` at a Python-number scale, read back as a Python float."""
    check_multiplies(attn, value)
    return float(agq_loss(attn, value, torch.tensor(scale, dtype=attn.dtype, device=attn.device), tau, bits, p, target))


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


class AgqRows:
    """The AGQ loss of one image's attention map for each tau's search (`run_lockstep` rows).

    attn: [..., Nq, Nk], value: [..., Nk, D] (after `split_heads`), float32 on one device.
    A candidate of row i is a scale for the grid with base 2^(1/taus[i]).
    """

    def __init__(self, attn: Tensor, value: Tensor, taus: tuple[int, ...], bits: int, p: float) -> None:
        self.attn, self.value, self.target = attn, value, attn @ value
        self.taus, self.bits, self.p = taus, bits, p

    def losses(self, rows: Sequence[int], candidates: Sequence[object]) -> Tensor:
        scales = upload(torch.tensor([float(s) for s in candidates], dtype=torch.float32), self.attn.device)
        return torch.stack([agq_loss(self.attn, self.value, scale, self.taus[row], self.bits, self.p, self.target)
                            for row, scale in zip(rows, scales)])


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

    def searches(self, attn: Tensor, value: Tensor, attn_max: float) -> tuple[AgqRows, list[Search]]:
        """The lockstep group of one image: every tau's bounded search of the scale over
        `agq_scale_bounds(attn_max)` and their evaluator. Feed the results to `record`.

        attn: A [..., Nq, Nk]; value: [..., Nk, D] with A's leading dims, or [B, Nk, C] for
        A [B, heads, Nq, Nk] (see `split_heads`); attn_max: max(A).
        """
        attn = attn.detach().float()
        value = split_heads(attn, value.detach().float())
        check_multiplies(attn, value)
        low, high = agq_scale_bounds(attn_max)
        rows = AgqRows(attn, value, self.taus, self.bits, self.p)
        return rows, [bounded_brent(low, high, self.max_iter) for _ in self.taus]

    def record(self, found: Sequence[tuple[float, np.float32]]) -> None:
        """Add one image's (scale, error) per tau, in `taus` order."""
        for tau, (scale, error) in zip(self.taus, found):
            self.scale_sums[tau] = self.scale_sums.get(tau, 0.0) + float(scale)
            self.error_sums[tau] = self.error_sums.get(tau, 0.0) + float(error)
        self.images += 1

    @torch.no_grad()
    def update(self, attn: Tensor, value: Tensor) -> None:
        """Search every tau on one image's attention map A [..., Nq, Nk] and values V (see `searches`)."""
        (found,) = run_lockstep([self.searches(attn, value, attn.max().item())])
        self.record(found)

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
    (output: V) children, e.g. the twins of `ptqbench.models.sam1.quantized`; the bit width is the
    softmax quantizer's. Use as a context manager: the hooks exist only inside the `with` block;
    every call of a module is one `update`.
    """

    def __init__(self, attentions: Mapping[str, nn.Module], taus: Iterable[int] = AGQ_TAUS, p: float = AGQ_P,
                 max_iter: int | None = None) -> None:
        self.attentions = dict(attentions)
        self.searches = {name: AgqSearch(module.softmax_quantizer.bits, tuple(taus), p, max_iter)
                         for name, module in self.attentions.items()}
        self._pending: dict[str, dict[str, Tensor]] = {name: {} for name in self.attentions}
        self._maps: list[tuple[str, Tensor, Tensor]] = []
        self._bytes = 0
        self._max_bytes: int | None = None
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

    def __enter__(self) -> AgqCapture:
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
        pending[kind] = tensor.detach().float().clone()
        if len(pending) == 2:
            attn, value = pending.pop("attn"), pending.pop("value")
            self._maps.append((name, attn, value))
            self._bytes += 4 * (attn.numel() + value.numel())
            if self._max_bytes is None:
                self._max_bytes = deferral_limit(attn.device)
            if self._bytes > self._max_bytes:
                self.flush()

    def flush(self) -> None:
        """Search every attention map received so far, all in lockstep, and release them."""
        maps, self._maps, self._bytes = self._maps, [], 0
        if not maps:
            return
        maxima = torch.stack([attn.max() for _, attn, _ in maps]).cpu().tolist()
        groups = [self.searches[name].searches(attn, value, attn_max)
                  for (name, attn, value), attn_max in zip(maps, maxima)]
        for (name, _, _), found in zip(maps, run_lockstep(groups)):
            self.searches[name].record(found)

    def results(self) -> dict[str, AgqResult]:
        """The result of every attention module, keyed like `attentions`."""
        self.flush()
        return {name: search.result() for name, search in self.searches.items()}

