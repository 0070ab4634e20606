"""The MSE range searches of the reference's observers: the per-channel grid of `MSEObserver`
(weights) and the nested bounded search of `AvgMSEFastObserver` (per-tensor activations).

Both minimise `mean(|Q(x) - x|^p)` (p = 2.4 in the reference) and score each candidate in the
reference's float32 arithmetic, so that near-ties resolve as there. `ptqbench.quant.observers`
wraps them into observers (`make_observer("mse")`).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Generator, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ptqbench.errors import ConfigError
from ptqbench.quant.bounded_brent import bounded_brent, drive, loss_of
from ptqbench.quant.functional import affine_qparams, quant_range
from ptqbench.quant.fused_lp_error import can_fuse, channel_grid_minima
from ptqbench.quant.lockstep import LpErrorRows, run_lockstep

MSE_NUM_RANGES = 100
# Elements per [3, channels, K] block of the per-channel grid search.
_GRID_BLOCK_ELEMENTS = {"cpu": 1 << 18, "other": 1 << 26}
# Results of the CPU grid search, by the exact bytes of the rows and the search settings.
_CPU_GRID_MEMO: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()
_CPU_GRID_MEMO_ENTRIES = 4096


def grid_search_per_channel(rows: Tensor, bits: int, p: float,
                            num_ranges: int = MSE_NUM_RANGES) -> tuple[Tensor, Tensor]:
    """Per-channel search over (range, zero point) minimising mean(|Q(x) - x|^p), p >= 1:
    rows [C, K] -> (x_min [C], x_max [C]); see `search_grid_per_channel`.

    On the CPU, where the search of one model takes seconds, the result is remembered by the
    exact bytes of `rows` (blake2b) and the settings, for the rest of the process (the last
    4,096 weights): a grid of cells searches the same weights once per method configuration and
    bit width, not once per task. The result is the search's, bit for bit (a copy is returned).
    """
    if rows.device.type != "cpu":
        return search_grid_per_channel(rows, bits, p, num_ranges)
    rows = rows.detach().contiguous()
    digest = hashlib.blake2b(rows.reshape(-1).view(torch.uint8).numpy().data, digest_size=32).digest()
    key = (digest, rows.dtype, tuple(rows.shape), bits, float(p), num_ranges)
    if key not in _CPU_GRID_MEMO:
        _CPU_GRID_MEMO[key] = search_grid_per_channel(rows, bits, p, num_ranges)
        while len(_CPU_GRID_MEMO) > _CPU_GRID_MEMO_ENTRIES:
            _CPU_GRID_MEMO.popitem(last=False)
    _CPU_GRID_MEMO.move_to_end(key)
    x_min, x_max = _CPU_GRID_MEMO[key]
    return x_min.clone(), x_max.clone()


def search_grid_per_channel(rows: Tensor, bits: int, p: float,
                            num_ranges: int = MSE_NUM_RANGES) -> tuple[Tensor, Tensor]:
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

    Speed without giving up exactness: for a fixed scale each element's error
    |clamp(k, -z, qmax - z) - x/s|^p (k = round(x/s) the nearest
    level) is a convex function of the integer z when p >= 1 (constant while k is inside, then
    |c - x/s|^p with c moving away from x/s one level per step), so the loss, a sum of such terms,
    is convex in z. The zero-point scan is therefore a descent walk per channel, started from the
    previous range's minimiser: a few evaluations per range instead of 2^bits. Channels and
    walkers are vectorised in blocks of bounded size. On a GPU with Triton the whole grid is scored
    instead, as the reference scores it, in one kernel per block of channels
    (`exhaustive_grid_search`): no walk, no host round trip.
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
    fused = can_fuse([rows])
    budget = _GRID_BLOCK_ELEMENTS["cpu" if rows.device.type == "cpu" else "other"]
    per_channel = num_ranges * (z_range[1] - z_range[0] + 1) if fused else 3 * k
    c_block = max(1, min(num_channels, budget // per_channel))
    search = exhaustive_grid_search if fused else _grid_search_block
    x_min, x_max = [], []
    for c0 in range(0, num_channels, c_block):
        block_min, block_max = search(rows[c0 : c0 + c_block], span[c0 : c0 + c_block], bits, p, num_ranges, z_range)
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


def exhaustive_grid_search(x: Tensor, span: Tensor, bits: int, p: float, num_ranges: int,
                           z_range: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """`search_grid_per_channel` on one block by scoring every candidate (`channel_grid_minima`):
    x [C, K] float32 CUDA, span [C] -> (x_min [C], x_max [C]), the first minimiser in (i, z) order.

    The candidates' qparams are computed here with the eager expressions of `_error_mean`
    (element-wise, so each candidate's values do not depend on the block's shape).
    """
    z_low, z_high = z_range
    widths = (span / num_ranges)[None] * torch.arange(1, num_ranges + 1, dtype=span.dtype, device=span.device)[:, None]
    zero_points = torch.arange(z_low, z_high + 1, dtype=span.dtype, device=span.device)
    zero_points = zero_points[None, :, None].expand(num_ranges, -1, x.shape[0])
    lo, hi = candidate_range(widths[:, None, :], zero_points, bits, z_range)
    scale, zero_point = affine_qparams(lo, hi, bits)
    best_error, best_index = channel_grid_minima(x, scale, zero_point, bits, p)
    best_width = best_error.argmin(dim=0)
    chosen = best_index.gather(0, best_width[None]).long()
    channels = torch.arange(x.shape[0], device=x.device)
    return lo[best_width, chosen[0], channels], hi[best_width, chosen[0], channels]


def _grid_search_block(
    x: Tensor, span: Tensor, bits: int, p: float, num_ranges: int, z_range: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """`search_grid_per_channel` on one block: x [C, K], span [C] -> (x_min [C], x_max [C])."""
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


def side_of(x_min: float, x_max: float) -> OneSide:
    """'pos' when every element is >= 0, 'neg' when every one is <= 0, else 'no' (the reference's
    `one_side_dist`, decided on an observer's first update and kept for the later ones)."""
    return "pos" if x_min >= 0.0 else "neg" if x_max <= 0.0 else "no"


def tensor_extrema(xs: Sequence[Tensor]) -> list[tuple[float, float]]:
    """(min, max) of each tensor (float32 values as Python floats), read back in one transfer."""
    if not xs:
        return []
    stacked = torch.stack([torch.stack(torch.aminmax(x.detach().float())) for x in xs]).cpu()
    return [(float(lo), float(hi)) for lo, hi in stacked]


Range = tuple[float, float]


def mse_fast_search(side: OneSide, x_min: float, x_max: float, bits: int,
                    max_iter: int | None = None) -> Generator[Range, np.float32, Range]:
    """The reference's per-tensor MSEFast search (SAQ-SAM `observer.py:270-367`) as a search
    generator: yields candidate grids (lo, hi), receives each one's mean(|Q(x) - x|^p), returns
    the chosen range. x_min, x_max: the data's float32 min and max; side: its sidedness.

    - One-sided ('pos' / 'neg'): a bounded search of r over [min(0.1, 0.01 R), R],
      R = max(|x_min|, x_max), of the grid [0, r] (or [-r, 0]); returns (0, r) or (-r, 0).
    - Two-sided: R = x_max - x_min (float32); each width r in [min(0.1, 0.01 R), R] is scored by
      the best shift t in [qmin d, qmax d] (d = r / (qmax - qmin)) of the grid [-t, r - t]
      (a nested bounded search), then the best shift of the chosen width is searched again;
      the result is that grid clipped to the data, (max(-t, x_min), min(r - t, x_max)).
    Every search is scipy's bounded Brent search with its default tolerance (`bounded_brent`);
    `max_iter` caps each one (the `fast` preset's cut; None = scipy's default).
    """
    qmin, qmax = quant_range(bits)
    if side != "no":
        extent = max(abs(x_min), x_max)

        def grid(r: float) -> Range:
            return (0.0 if side == "pos" else -r), (0.0 if side == "neg" else r)

        r_best, _ = yield from drive(bounded_brent(min(0.1, 0.01 * extent), extent, max_iter),
                                     lambda r: loss_of(grid(r)))
        return grid(r_best)
    extent = float(np.float32(x_max) - np.float32(x_min))

    def best_shift(r: float) -> Generator[Range, np.float32, tuple[float, np.float32]]:
        step = r / float(qmax - qmin)
        return drive(bounded_brent(step * qmin, step * qmax, max_iter), lambda t: loss_of((0.0 - t, r - t)))

    def loss_of_width(r: float) -> Generator[Range, np.float32, np.float32]:
        _, loss = yield from best_shift(r)
        return loss

    r_best, _ = yield from drive(bounded_brent(min(0.1, 0.01 * extent), extent, max_iter), loss_of_width)
    t_best, _ = yield from best_shift(r_best)
    return max(0.0 - t_best, x_min), min(r_best - t_best, x_max)


def search_tensor_ranges(xs: Sequence[Tensor], sides: Sequence[OneSide], bits: Sequence[int], p: float,
                         max_iter: int | None = None,
                         extrema: Sequence[tuple[float, float]] | None = None) -> list[Range]:
    """`mse_fast_search` for many tensors at once, in lockstep (`run_lockstep`).

    xs: tensors of any shapes, on one device; sides, bits: per tensor; extrema: their
    `tensor_extrema` when already known. Returns each tensor's range, in order; every range equals
    what the search finds for that tensor alone.
    """
    extrema = list(extrema) if extrema is not None else tensor_extrema(xs)
    members: dict[int, list[int]] = {}
    for i, b in enumerate(bits):
        members.setdefault(b, []).append(i)
    groups = []
    for group_bits, indices in members.items():
        tensors = [xs[i].detach().float() for i in indices]
        searches = [mse_fast_search(sides[i], *extrema[i], group_bits, max_iter) for i in indices]
        groups.append((LpErrorRows(tensors, group_bits, p), searches))
    ranges: list[Range] = [(0.0, 0.0)] * len(xs)
    for indices, found in zip(members.values(), run_lockstep(groups)):
        for i, found_range in zip(indices, found):
            ranges[i] = found_range
    return ranges


def bounded_search_per_tensor(x: Tensor, bits: int, p: float, side: OneSide | None = None,
                              max_iter: int | None = None) -> Range:
    """The per-tensor range of the reference's MSEFast search for one tensor (`mse_fast_search`).

    x: any shape, on any device; side: the data's sidedness (None = decide from x).
    """
    extrema = tensor_extrema([x])
    return search_tensor_ranges([x], [side or side_of(*extrema[0])], [bits], p, max_iter, extrema)[0]


