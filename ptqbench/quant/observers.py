"""Range observers: record statistics of a tensor over calibration updates, then propose a range.

Observers never quantize anything themselves. `update(x)` records one batch (one calibration
image); `compute_range(bits)` returns `(x_min, x_max)`: 0-d tensors per tensor, [C] tensors per
channel (channels along `channel_axis`, 0 for weights). The range is turned into a scale and zero
point by `functional.affine_qparams`, which widens it to include 0.

Implemented (methods.md, section 2):
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
from typing import Callable, Literal

import torch
from scipy.optimize import minimize_scalar
from torch import Tensor

from ptqbench.errors import ConfigError, PtqbenchError
from ptqbench.quant.functional import affine_qparams, fake_quant_affine, quant_range
from ptqbench.registry import Registry

OBSERVERS: Registry[Observer] = Registry("observer")

MSE_NUM_RANGES = 100
OMSE_NUM_STEPS = 90
# Elements per [3, channels, K] block of the per-channel grid search.
_GRID_BLOCK_ELEMENTS = {"cpu": 1 << 18, "other": 1 << 26}


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


def abs_pow_(d: Tensor, p: float) -> Tensor:
    """|d|^p in place; exp(p ln|d|) for p != 2 (about 4x faster than torch.pow on CPU, equal up to
    float rounding; ln 0 = -inf gives exactly 0)."""
    if p == 2.0:
        return d.square_()
    return d.abs_().log_().mul_(p).exp_()


def lp_loss(x_hat: Tensor, x: Tensor, p: float, dim: int | None = None) -> Tensor:
    """mean(|x_hat - x|^p) over `dim` (over all elements when None)."""
    error = abs_pow_(x_hat - x, p)
    return error.mean() if dim is None else error.mean(dim=dim)


def grid_search_per_channel(rows: Tensor, bits: int, p: float, num_ranges: int = MSE_NUM_RANGES) -> tuple[Tensor, Tensor]:
    """Per-channel search over (range, zero point) minimising mean(|Q(x) - x|^p), p >= 1.

    rows: [C, K] -> (x_min [C], x_max [C]).
    Candidates per channel: widths r_i = span / num_ranges * i, i = 1..num_ranges, where span is
    the channel's range widened to include 0 (`max(x_max, 0) - min(x_min, 0)`, i.e.
    x_max - x_min for two-sided data); times every integer zero point z in [qmin, qmax] for
    two-sided data (the 2-D grid), only z = qmin when all of `rows` is >= 0 and only z = qmax
    when all of it is <= 0 (the 1-D search). Candidate (r, z) is the range (-z d, r - z d),
    d = r / (qmax - qmin) (`candidate_range`), scored with the qparams `affine_qparams` recovers
    from it, in the reference's float32 arithmetic (`x / s`, `pow`, mean). The result is the grid's
    minimiser, the first one in (i, z) order on ties, as the reference's exhaustive loop finds it.

    Speed without giving up exactness: for a fixed scale each element's error |clamp(k, -z, qmax - z) - x/s|^p (k = round(x/s) the nearest
    level) is a convex function of the integer z when p >= 1 (constant while k is inside, then
    |c - x/s|^p with c moving away from x/s one level per step), so the loss, a sum of such terms,
    is convex in z. The zero-point scan is therefore a descent walk per channel, started from the
    previous range's minimiser: a few evaluations per range instead of 2^bits. Channels and
    walkers are vectorised in blocks of bounded size.
    """
    if p < 1:
        raise ConfigError(f"the per-channel MSE grid search needs p >= 1 (convex loss), got p={p}")
    qmin, qmax = quant_range(bits)
    num_channels, k = rows.shape
    span = rows.amax(dim=1).clamp(min=0.0) - rows.amin(dim=1).clamp(max=0.0)
    if bool(rows.min() >= 0):
        z_range = (qmin, qmin)
    elif bool(rows.max() <= 0):
        z_range = (qmax, qmax)
    else:
        z_range = (qmin, qmax)
    budget = _GRID_BLOCK_ELEMENTS["cpu" if rows.device.type == "cpu" else "other"]
    c_block = max(1, min(num_channels, budget // (3 * k)))
    x_min, x_max = [], []
    for c0 in range(0, num_channels, c_block):
        block_min, block_max = _grid_search_block(rows[c0 : c0 + c_block], span[c0 : c0 + c_block], bits, p, num_ranges, z_range)
        x_min.append(block_min)
        x_max.append(block_max)
    return torch.cat(x_min), torch.cat(x_max)


def candidate_range(width: Tensor, zero_points: Tensor, bits: int, z_range: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The reference's grid candidate (MSEObserver `perform_2D_search` / `perform_1D_search`) in float32.

    width: [C] the candidate range (span / num_ranges * i); zero_points: [W, C] ->
    (lo, hi) [W, C]: (-z d, width - z d) with d = width / (qmax - qmin); (-width, 0) for data
    that is all <= 0 (z_range (qmax, qmax)).
    """
    qmin, qmax = quant_range(bits)
    if z_range == (qmax, qmax):
        return (-width).expand_as(zero_points), torch.zeros_like(zero_points)
    step = width / float(qmax - qmin)
    shift = zero_points * step
    return 0.0 - shift, width - shift


def _error_mean(x: Tensor, width: Tensor, zero_points: Tensor, bits: int, p: float,
                z_range: tuple[int, int]) -> Tensor:
    """mean_K |Q(x) - x|^p per channel for the candidates `candidate_range(width, zero_points)`, with
    the qparams recomputed from each candidate as the reference's `calculate_qparams` does.

    x: [C, K]; width: [C]; zero_points: [W, C] -> [W, C], +inf where a zero point lies outside z_range.
    """
    qmin, qmax = quant_range(bits)
    z_low, z_high = z_range
    lo, hi = candidate_range(width, zero_points.clamp(z_low, z_high), bits, z_range)
    scale, zero_point = affine_qparams(lo, hi, bits)
    scale, zero_point = scale[:, :, None], zero_point[:, :, None]
    x_hat = (torch.round(x[None] / scale) + zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)
    error = x_hat.sub_(x[None]).abs_().pow_(p).mean(dim=2)
    return error.masked_fill((zero_points < z_low) | (zero_points > z_high), math.inf)


def _grid_search_block(
    x: Tensor, span: Tensor, bits: int, p: float, num_ranges: int, z_range: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """`grid_search_per_channel` on one block: x [C, K], span [C] -> (x_min [C], x_max [C])."""
    qmin, qmax = quant_range(bits)
    z_low, z_high = z_range
    num_channels = x.shape[0]
    zero_fraction = torch.where(span > 0, -x.amin(dim=1).clamp(max=0.0) / span, torch.zeros_like(span))
    z = torch.round(zero_fraction * (qmax - qmin)).clamp(z_low, z_high)
    best_error = torch.full((num_channels,), math.inf, device=x.device)
    best_min = torch.zeros(num_channels, device=x.device)
    best_max = torch.zeros(num_channels, device=x.device)
    for i in range(1, num_ranges + 1):
        width = span / num_ranges * i
        errors = _error_mean(x, width, torch.stack([z - 1, z, z + 1]), bits, p, z_range)
        down, here, up = errors[0], errors[1], errors[2]
        moving_down = down <= here
        moving_up = ~moving_down & (up < here)
        here = torch.where(moving_down, down, torch.where(moving_up, up, here))
        z = z - moving_down.float() + moving_up.float()
        for step, moving in ((-1.0, moving_down), (1.0, moving_up)):
            channels = torch.nonzero(moving).flatten()
            while channels.numel() > 0:
                candidate = _error_mean(x[channels], width[channels], (z[channels] + step)[None], bits, p, z_range)[0]
                accept = candidate <= here[channels] if step < 0 else candidate < here[channels]
                channels = channels[accept]
                z[channels] += step
                here[channels] = candidate[accept]
        better = here < best_error
        lo, hi = candidate_range(width, z[None], bits, z_range)
        best_error = torch.where(better, here, best_error)
        best_min = torch.where(better, lo[0], best_min)
        best_max = torch.where(better, hi[0], best_max)
    return best_min, best_max


def _bounded_minimize(fn: Callable[[float], float], lo: float, hi: float,
                      max_iter: int | None = None) -> tuple[float, float]:
    """(argmin, min) of fn on [lo, hi] by scipy's bounded Brent search with its default tolerance
    (xatol 1e-5), as the reference's `minimize_scalar(..., method='Bounded')`; a point interval is
    evaluated. max_iter: scipy's iteration cap (None = scipy's default, 500)."""
    if hi <= lo:
        return lo, fn(lo)
    options = None if max_iter is None else {"maxiter": max_iter}
    result = minimize_scalar(fn, bounds=(lo, hi), method="bounded", options=options)
    return float(result.x), float(result.fun)


def strided_sample(x: Tensor, max_elements: int | None) -> Tensor:
    """x itself when it has at most `max_elements` elements (or no cap is set), else a
    deterministic strided subset of about `max_elements` elements plus x's min and max
    (so the searched interval is the full tensor's). Returns a 1-D tensor or x."""
    if max_elements is None or x.numel() <= max_elements:
        return x
    flat = x.reshape(-1)
    stride = -(-flat.numel() // max_elements)
    return torch.cat([flat[::stride], torch.stack([flat.min(), flat.max()])])


OneSide = Literal["pos", "neg", "no"]


def one_sided(x: Tensor) -> OneSide:
    """'pos' when every element is >= 0, 'neg' when every one is <= 0, else 'no' (the reference's
    `one_side_dist`, decided on an observer's first update and kept for the later ones)."""
    x_min, x_max = (float(v) for v in torch.aminmax(x.detach()))
    return "pos" if x_min >= 0.0 else "neg" if x_max <= 0.0 else "no"


def range_loss(x: Tensor, lo: float, hi: float, bits: int, p: float) -> float:
    """mean(|Q(x) - x|^p) for the grid covering [lo, hi] (one scalar read back to the host).

    The qparams are computed in float64 on the host from the candidate, exactly as the
    reference's `calculate_qparams` on its float64 candidate tensors, and handed to the fused
    per-tensor kernel as Python numbers, so nothing of the candidate lives on another device or
    in another dtype than x. x: float32, any shape, any device.
    """
    qmin, qmax = quant_range(bits)
    low, high = min(lo, 0.0), max(hi, 0.0)
    scale = max((high - low) / (qmax - qmin), 1e-8)
    zero_point = int(min(max(qmin - round(low / scale), qmin), qmax))
    x_hat = (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale
    return float((x_hat - x).abs().pow(p).mean())


def bounded_search_per_tensor(x: Tensor, bits: int, p: float, side: OneSide | None = None,
                              max_iter: int | None = None) -> tuple[float, float]:
    """The per-tensor range of the reference's MSEFast search (SAQ-SAM `observer.py:270-367`).

    x: any shape, on any device (every loss evaluation runs there; one scalar per step comes back).
    side: the data's sidedness (`one_sided`; None = decide from x).
    - One-sided ('pos' / 'neg'): a bounded search of r over [min(0.1, 0.01 R), R],
      R = max(|x_min|, x_max), of the grid [0, r] (or [-r, 0]); returns (0, r) or (-r, 0).
    - Two-sided: R = x_max - x_min; each width r in [min(0.1, 0.01 R), R] is scored by the best
      shift t in [0, r] of the grid [-t, r - t] (a nested bounded search), then the best shift of
      the chosen width; the result is that grid clipped to the data, (max(-t, x_min), min(r - t, x_max)).
    Every search is scipy's bounded Brent search with its default tolerance; `max_iter` caps each
    one (the `fast` preset's cut; None = scipy's default).
    """
    x = x.detach().float()
    lo_t, hi_t = torch.aminmax(x)
    x_min, x_max = float(lo_t), float(hi_t)
    side = side or one_sided(x)
    qmin, qmax = quant_range(bits)
    if side != "no":
        extent = float(torch.maximum(lo_t.abs(), hi_t))

        def grid(r: float) -> tuple[float, float]:
            return (0.0 if side == "pos" else -r), (0.0 if side == "neg" else r)

        r_best, _ = _bounded_minimize(lambda r: range_loss(x, *grid(r), bits, p),
                                      min(0.1, 0.01 * extent), extent, max_iter)
        return grid(r_best)
    extent = float(hi_t - lo_t)  # float32 arithmetic, as the reference's bounds

    def best_shift(r: float) -> tuple[float, float]:
        step = r / (qmax - qmin)
        return _bounded_minimize(lambda t: range_loss(x, -t, r - t, bits, p), step * qmin, step * qmax, max_iter)

    r_best, _ = _bounded_minimize(lambda r: best_shift(r)[1], min(0.1, 0.01 * extent), extent, max_iter)
    t_best, _ = best_shift(r_best)
    return max(-t_best, x_min), min(r_best - t_best, x_max)


@OBSERVERS.register("mse")
class MSEObserver(SearchObserver):
    """Lp clipping search (LAPQ / BRECQ / QDrop / PTQ4SAM), p = 2.4 by default.

    Per channel (`channel_axis` given, weights): `grid_search_per_channel` on each update.
    Per tensor (activations): the reference's AvgMSEFast observer, `bounded_search_per_tensor` on
    each update with the sidedness of the first update kept for the later ones.
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
        super().__init__(channel_axis, bits)

    def _clear(self) -> None:
        super()._clear()
        self.side: OneSide | None = None

    def _search(self, rows: Tensor, bits: int) -> tuple[Tensor, Tensor]:
        if self.channel_axis is not None:
            return grid_search_per_channel(rows, bits, self.p, self.num_ranges)
        sample = strided_sample(rows, self.max_elements)
        self.side = self.side or one_sided(sample)
        lo, hi = bounded_search_per_tensor(sample, bits, self.p, self.side, self.max_iter)
        return (torch.tensor([lo], dtype=torch.float32, device=rows.device),
                torch.tensor([hi], dtype=torch.float32, device=rows.device))


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
            losses.append(lp_loss(x_hat, rows, 2.0, dim=1))
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
