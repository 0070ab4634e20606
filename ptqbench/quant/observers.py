"""Range observers: record statistics of a tensor over calibration updates, then propose a range.

Observers never quantize anything themselves. `update(x)` records one batch (one calibration
image); `compute_range(bits)` returns `(x_min, x_max)`: 0-d tensors per tensor, [C] tensors per
channel (channels along `channel_axis`, 0 for weights). The range is turned into a scale and zero
point by `functional.affine_qparams`, which widens it to include 0.

Implemented:
- `MinMaxObserver`: running global min / max over all updates.
- `AvgMinMaxObserver`: the mean over updates of each update's min and of its max (PTQ4SAM).
- `PercentileObserver`: FQ-ViT's observer; per update the (100 - P)th / Pth percentiles, combined
  across updates by an exponential moving average.
- `MSEObserver`: the range minimising `mean(|Q(x) - x|^p)`; per channel the minimiser of the
  100-ranges x every-zero-point grid, per tensor a nested bounded scalar search; per-update
  results averaged.
- `OMSEObserver`: FQ-ViT's grid of 90 shrunken min / max ranges under plain L2, per update,
  averaged over updates.

Search-based observers (MSE, OMSE) need the bit width to score candidates. Given `bits` at
construction they search each update as it arrives and keep only its range (constant memory);
without it they keep a copy of every update until `compute_range(bits)` (memory grows with the
number of updates: pass `bits` for large activations). Statistics-only observers accept `bits`
too, so that a caller can construct every observer the same way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ptqbench.errors import ConfigError, PtqbenchError
from ptqbench.quant.functional import affine_qparams, fake_quant_affine
from ptqbench.quant.lockstep import deferral_limit
from ptqbench.quant.mse_search import (
    MSE_NUM_RANGES,
    OneSide,
    grid_search_per_channel,
    search_tensor_ranges,
    side_of,
    strided_sample,
    tensor_extrema,
)
from ptqbench.registry import Registry

OBSERVERS: Registry[Observer] = Registry("observer")

OMSE_NUM_STEPS = 90


def _check_bits(bits: int, owner: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ConfigError(f"{owner}: bits must be an integer in [1, 16], got {bits!r}")
    return bits


def _as_rows(x: Tensor, channel_axis: int | None) -> Tensor:
    """The float32 [C, N] view of x with channels first; per tensor (axis None): [1, N]."""
    x = x.detach().float()
    if channel_axis is None:
        return x.reshape(1, -1)
    return x.movedim(channel_axis, 0).reshape(x.shape[channel_axis], -1)


class Observer:
    """Base class: records updates, proposes a range.

    channel_axis: None for one range per tensor; else one range per index along that axis.
    bits: the bit width the range is for, when known at construction (optional; if given,
        `compute_range` must be called with the same value).
    Subclasses implement `_observe(rows [C, N])`, `_range(bits) -> ([C], [C])` and `_clear()`.
    """

    def __init__(self, channel_axis: int | None = None, bits: int | None = None) -> None:
        self.channel_axis = channel_axis
        self.bits = None if bits is None else _check_bits(bits, type(self).__name__)
        self.num_updates = 0
        self._clear()

    def update(self, x: Tensor) -> None:
        """Record one batch x (any shape, any device); no gradient is recorded."""
        if x.numel() == 0:
            raise PtqbenchError(f"{type(self).__name__}.update got an empty tensor of shape {tuple(x.shape)}")
        with torch.no_grad():
            self._observe(_as_rows(x, self.channel_axis))
        self.num_updates += 1

    def compute_range(self, bits: int) -> tuple[Tensor, Tensor]:
        """(x_min, x_max) for a `bits`-bit grid: 0-d tensors per tensor, [C] per channel."""
        name = type(self).__name__
        _check_bits(bits, name)
        if self.bits is not None and bits != self.bits:
            raise ConfigError(f"{name} was built for {self.bits} bits, compute_range asked for {bits}")
        if self.num_updates == 0:
            raise PtqbenchError(f"{name}.compute_range called before any update")
        with torch.no_grad():
            x_min, x_max = self._range(bits)
        if self.channel_axis is None:
            return x_min[0], x_max[0]
        return x_min, x_max

    def defer_searches(self, batch: DeferredSearches) -> None:
        """Let `batch` run this observer's per-update searches together with other observers'
        (`DeferredSearches`); observers without such a search ignore it."""

    def reset(self) -> None:
        """Forget every update."""
        self.num_updates = 0
        self._clear()

    def _observe(self, rows: Tensor) -> None:
        raise NotImplementedError

    def _range(self, bits: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _clear(self) -> None:
        raise NotImplementedError


@OBSERVERS.register("minmax")
class MinMaxObserver(Observer):
    """Running global min and max over all updates."""

    def _clear(self) -> None:
        self._min: Tensor | None = None
        self._max: Tensor | None = None

    def _observe(self, rows: Tensor) -> None:
        lo, hi = torch.aminmax(rows, dim=1)
        if self._min is None or self._max is None:
            self._min, self._max = lo, hi
        else:
            self._min = torch.minimum(self._min, lo.to(self._min.device))
            self._max = torch.maximum(self._max, hi.to(self._max.device))

    def _range(self, bits: int) -> tuple[Tensor, Tensor]:
        assert self._min is not None and self._max is not None
        return self._min.clone(), self._max.clone()


@OBSERVERS.register("avgminmax")
class AvgMinMaxObserver(Observer):
    """The mean over updates of the per-update min and of the per-update max."""

    def _clear(self) -> None:
        self._sum_min: Tensor | None = None
        self._sum_max: Tensor | None = None

    def _observe(self, rows: Tensor) -> None:
        lo, hi = torch.aminmax(rows, dim=1)
        if self._sum_min is None or self._sum_max is None:
            self._sum_min, self._sum_max = lo, hi
        else:
            self._sum_min = self._sum_min + lo.to(self._sum_min.device)
            self._sum_max = self._sum_max + hi.to(self._sum_max.device)

    def _range(self, bits: int) -> tuple[Tensor, Tensor]:
        assert self._sum_min is not None and self._sum_max is not None
        return self._sum_min / self.num_updates, self._sum_max / self.num_updates


def row_quantile(rows: Tensor, q: float) -> Tensor:
    """The q-quantile (0 <= q <= 1) of each row, linear interpolation as torch.quantile / numpy.

    rows: [C, N] -> [C]. Works for any N (torch.quantile refuses inputs above 2^24 elements):
    one `topk` fetches the two order statistics around position q * (N - 1) (computed in float64),
    from whichever end of the row is nearer, so extreme percentiles stay cheap.

    Why it is not `ptqbench.methods.saqsam.pcc.reference_quantile`: that one reproduces the SAQ-SAM
    reference's arithmetic for PCC (a float32 rank below 2^24 elements, numpy's two-sided lerp
    above), one row at a time; this one takes the rank in float64 for many rows at once. The two
    differ in the last float32 bits (e.g. q = 0.999 of 1000 normal samples), so merging them
    would change the percentile observer's or PCC's numbers.
    """
    n = rows.shape[1]
    pos = q * (n - 1)
    below = min(int(math.floor(pos)), n - 1)
    above = min(below + 1, n - 1)
    frac = pos - below
    if above + 1 <= n - below:
        ascending = torch.topk(rows, above + 1, dim=1, largest=False, sorted=True).values
        v_below, v_above = ascending[:, below], ascending[:, above]
    else:
        descending = torch.topk(rows, n - below, dim=1, largest=True, sorted=True).values
        v_below, v_above = descending[:, n - 1 - below], descending[:, n - 1 - above]
    return torch.lerp(v_below, v_above, frac)


@OBSERVERS.register("percentile")
class PercentileObserver(Observer):
    """FQ-ViT's percentile observer.

    Per update: x_max = the `percentile`-th percentile, x_min = the (100 - percentile)-th
    (linear interpolation, as torch.quantile). Across updates an EMA: the first update sets the
    values, each later one moves them `v = v + momentum * (new - v)`.
    """

    def __init__(
        self,
        channel_axis: int | None = None,
        bits: int | None = None,
        percentile: float = 99.999,
        momentum: float = 0.01,
    ) -> None:
        if not 50.0 <= percentile <= 100.0:
            raise ConfigError(f"PercentileObserver: percentile must lie in [50, 100], got {percentile}")
        if not 0.0 < momentum <= 1.0:
            raise ConfigError(f"PercentileObserver: momentum must lie in (0, 1], got {momentum}")
        self.percentile = percentile
        self.momentum = momentum
        super().__init__(channel_axis, bits)

    def _clear(self) -> None:
        self._min: Tensor | None = None
        self._max: Tensor | None = None

    def _observe(self, rows: Tensor) -> None:
        lo = row_quantile(rows, (100.0 - self.percentile) / 100.0)
        hi = row_quantile(rows, self.percentile / 100.0)
        if self._min is None or self._max is None:
            self._min, self._max = lo, hi
        else:
            self._min = self._min + self.momentum * (lo.to(self._min.device) - self._min)
            self._max = self._max + self.momentum * (hi.to(self._max.device) - self._max)

    def _range(self, bits: int) -> tuple[Tensor, Tensor]:
        assert self._min is not None and self._max is not None
        return self._min.clone(), self._max.clone()


class SearchObserver(Observer):
    """Base of observers that search a range for each update and average the per-update ranges.

    Subclasses implement `_search(rows [C, N], bits) -> (x_min [C], x_max [C])`.
    """

    def _clear(self) -> None:
        self._pending: list[Tensor] = []
        self._ranges: list[tuple[Tensor, Tensor]] = []

    def _observe(self, rows: Tensor) -> None:
        if self.bits is None:
            self._pending.append(rows.clone())
        else:
            self._ranges.append(self._search(rows, self.bits))

    def _range(self, bits: int) -> tuple[Tensor, Tensor]:
        ranges = self._ranges if self.bits is not None else [self._search(r, bits) for r in self._pending]
        device = ranges[0][0].device
        x_min = torch.stack([lo.to(device) for lo, _ in ranges]).mean(dim=0)
        x_max = torch.stack([hi.to(device) for _, hi in ranges]).mean(dim=0)
        return x_min, x_max

    def _search(self, rows: Tensor, bits: int) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


@OBSERVERS.register("mse")
class MSEObserver(SearchObserver):
    """Lp clipping search (LAPQ / BRECQ / QDrop / PTQ4SAM), p = 2.4 by default.

    Per channel (`channel_axis` given, weights): `grid_search_per_channel` on each update.
    Per tensor (activations): the reference's AvgMSEFast observer, `mse_fast_search` on each
    update with the sidedness of the first update kept for the later ones; searched at once, or,
    after `defer_searches`, together with other observers' updates (same ranges).
    The per-update ranges are averaged over updates.
    """

    def __init__(self, channel_axis: int | None = None, bits: int | None = None, p: float = 2.4,
                 max_iter: int | None = None, num_ranges: int = MSE_NUM_RANGES,
                 max_elements: int | None = None) -> None:
        if not p >= 1:
            raise ConfigError(f"MSEObserver: p must be >= 1 (the searches rely on a convex loss), got {p}")
        self.p = p
        self.max_iter = max_iter
        self.num_ranges = num_ranges
        self.max_elements = max_elements
        self._batch: DeferredSearches | None = None
        super().__init__(channel_axis, bits)

    def _clear(self) -> None:
        super()._clear()
        self.side: OneSide | None = None

    def defer_searches(self, batch: DeferredSearches) -> None:
        if self.channel_axis is None and self.bits is not None:
            self._batch = batch

    def _observe(self, rows: Tensor) -> None:
        if self._batch is None:
            super()._observe(rows)
        else:
            self._batch.add(self, strided_sample(rows, self.max_elements))

    def _range(self, bits: int) -> tuple[Tensor, Tensor]:
        if self._batch is not None:
            self._batch.flush()
        return super()._range(bits)

    def add_range(self, lo: float, hi: float, device: torch.device) -> None:
        """Record one update's searched range (from `DeferredSearches`)."""
        self._ranges.append(_range_tensors(lo, hi, device))

    def _search(self, rows: Tensor, bits: int) -> tuple[Tensor, Tensor]:
        if self.channel_axis is not None:
            return grid_search_per_channel(rows, bits, self.p, self.num_ranges)
        sample = strided_sample(rows, self.max_elements)
        extrema = tensor_extrema([sample])
        self.side = self.side or side_of(*extrema[0])
        (lo, hi), = search_tensor_ranges([sample], [self.side], [bits], self.p, self.max_iter, extrema)
        return _range_tensors(lo, hi, rows.device)


def _range_tensors(lo: float, hi: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """A per-tensor searched range as the ([1], [1]) float32 tensors `SearchObserver` averages."""
    return (torch.tensor([lo], dtype=torch.float32, device=device),
            torch.tensor([hi], dtype=torch.float32, device=device))


class DeferredSearches:
    """The per-tensor MSE searches of many observers, collected and run together.

    `observing` hands one to every observer of a statistics pass; each update of a per-tensor
    `MSEObserver` then waits here instead of being searched at once, and `flush` (automatic
    once the collected tensors exceed `max_bytes`, and before any of these observers reports
    its range) searches all of them in lockstep (`search_tensor_ranges`). The ranges are those
    of searching each update alone, so when the flushes happen changes no number.
    max_bytes: None = `deferral_limit` of the first update's device, read once.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self._jobs: list[tuple[MSEObserver, Tensor]] = []
        self._bytes = 0

    def add(self, observer: MSEObserver, x: Tensor) -> None:
        """Queue one update of `observer` (a copy of x is kept until the flush)."""
        if self.max_bytes is None:
            self.max_bytes = deferral_limit(x.device)
        self._jobs.append((observer, x.detach().float().clone()))
        self._bytes += x.numel() * 4
        if self._bytes > self.max_bytes:
            self.flush()

    def flush(self) -> None:
        """Search every queued update and hand each range to its observer, in queue order."""
        jobs, self._jobs, self._bytes = self._jobs, [], 0
        extrema = tensor_extrema([x for _, x in jobs])
        settings: dict[tuple[float, int | None], list[int]] = {}
        for i, ((observer, _), (x_min, x_max)) in enumerate(zip(jobs, extrema)):
            observer.side = observer.side or side_of(x_min, x_max)
            settings.setdefault((observer.p, observer.max_iter), []).append(i)
        for (p, max_iter), indices in settings.items():
            ranges = search_tensor_ranges([jobs[i][1] for i in indices], [jobs[i][0].side for i in indices],
                                          [jobs[i][0].bits for i in indices], p, max_iter,
                                          [extrema[i] for i in indices])
            for i, (lo, hi) in zip(indices, ranges):
                jobs[i][0].add_range(lo, hi, jobs[i][1].device)


@OBSERVERS.register("omse")
class OMSEObserver(SearchObserver):
    """FQ-ViT's OMSE observer: a grid of shrunken min / max ranges under plain L2.

    Per update: candidates (x_min, x_max) * (1 - 0.01 i), i = 0..89, from that update's own
    min / max (per channel when `channel_axis` is given); the one with the lowest
    mean((Q(x) - x)^2) wins (ties: smallest i). The winners are averaged over updates. (FQ-ViT
    takes the running min / max of all batches and scores only the last batch; scoring every
    update on its own statistics uses all calibration data.)
    """

    def _search(self, rows: Tensor, bits: int) -> tuple[Tensor, Tensor]:
        lo, hi = torch.aminmax(rows, dim=1)
        factors = [1.0 - 0.01 * i for i in range(OMSE_NUM_STEPS)]
        losses = []
        for f in factors:
            scale, zero_point = affine_qparams(lo * f, hi * f, bits)
            x_hat = fake_quant_affine(rows, scale[:, None], zero_point[:, None], bits)
            losses.append((x_hat - rows).square().mean(dim=1))
        best = torch.stack(losses).argmin(dim=0)
        best_factor = torch.tensor(factors, dtype=rows.dtype, device=rows.device)[best]
        return lo * best_factor, hi * best_factor


def make_observer(name: str, channel_axis: int | None = None, **kwargs: object) -> Observer:
    """Build the observer registered as `name` ("minmax", "avgminmax", "percentile", "mse", "omse").

    kwargs go to its constructor (e.g. bits=4, percentile=99.99, p=2.0); an unknown name raises
    UnknownNameError listing the valid names, an unknown option ConfigError.
    """
    factory = OBSERVERS.get(name)
    try:
        return factory(channel_axis=channel_axis, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"observer {name!r}: bad options {sorted(kwargs)}: {exc}") from exc
