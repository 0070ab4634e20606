"""Independent scalar searches advanced in lockstep, their losses read back once per step.

A lane search (`LaneSearch`) holds many independent searches whose state lives in numpy arrays
(`ptqbench.quant.bounded_brent.BrentLanes`). The reference runs its searches one after another and
reads one loss back per evaluation; here every step queues the losses of every pending candidate
of every search on the data's device (no read-back), reads them back in one transfer, and advances
all searches with a few numpy operations. Each search still sees exactly the losses it would see
alone, so the results do not depend on how searches are batched.

`BrentSearches` is the plain case (one bounded search per lane, scored by a callable);
`ptqbench.quant.mse_search` nests two of them. `LpErrorRows` scores the MSE range searches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ptqbench.quant.bounded_brent import BrentLanes
from ptqbench.quant.functional import quant_range
from ptqbench.quant.fused_lp_error import FusedLpError, can_fuse


class LaneSearch(Protocol):
    """Independent searches that want losses of their pending candidates, step after step."""

    def done(self) -> bool:
        """Whether every search has finished."""
        ...

    def score_pending(self) -> Tensor:
        """The float32 losses [P] of the P pending candidates, queued on the data's device."""
        ...

    def tell(self, losses: np.ndarray) -> None:
        """Hand back the P losses of `score_pending` (float32, same order)."""
        ...


def run_lockstep(searches: Sequence[LaneSearch]) -> None:
    """Run every search to its end: each step scores the pending candidates of all unfinished
    searches and brings their losses to the host in one transfer."""
    while active := [search for search in searches if not search.done()]:
        parts = [search.score_pending() for search in active]
        losses = torch.cat(parts).float().cpu().numpy()
        position = 0
        for search, part in zip(active, parts):
            search.tell(losses[position : position + part.numel()])
            position += part.numel()


class BrentSearches:
    """One bounded Brent search per lane on [lower[i], upper[i]], its points scored by `score`.

    score(lanes, x): lane indices [P] (int64) and their points [P] (float64) -> float32 losses [P]
    on the data's device, queued. After `run_lockstep`, `best_x` / `best_loss` are each lane's
    minimiser and minimum.
    """

    def __init__(self, lower: Sequence[float], upper: Sequence[float],
                 score: Callable[[np.ndarray, np.ndarray], Tensor], max_iter: int | None = None) -> None:
        self.lanes = BrentLanes(len(lower), max_iter)
        self.active = np.arange(len(lower))
        self.lanes.start(self.active, np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64))
        self.score = score

    def done(self) -> bool:
        return self.active.size == 0

    def score_pending(self) -> Tensor:
        return self.score(self.active, self.lanes.x[self.active])

    def tell(self, losses: np.ndarray) -> None:
        self.active = self.active[~self.lanes.tell(self.active, losses)]

    @property
    def best_x(self) -> np.ndarray:
        return self.lanes.xf

    @property
    def best_loss(self) -> np.ndarray:
        return self.lanes.fx


def deferral_limit(device: torch.device) -> int:
    """How many bytes of data a deferred batch of searches may collect before it runs: 1 GiB on
    the CPU, a quarter of the device's free memory (at most 16 GiB) on a GPU."""
    if device.type == "cuda":
        return min(16 << 30, torch.cuda.mem_get_info(device)[0] // 4)
    return 1 << 30


def grid_qparams(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's `calculate_qparams` for candidate ranges (lo, hi) [P], in float64 on the
    host (as its Python arithmetic): each range widened to include 0, scale = width / (qmax - qmin)
    (at least 1e-8), and the zero point qmin - round(low / scale) (half to even, as Python's
    `round`) clamped to the grid. Returns (scale [P] float64, zero point [P] int64)."""
    qmin, qmax = quant_range(bits)
    low = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    high = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    scale = np.maximum((high - low) / (qmax - qmin), 1e-8)
    zero_point = np.clip(qmin - np.rint(low / scale), qmin, qmax).astype(np.int64)
    return scale, zero_point


def lp_error(x: Tensor, scale: float, zero_point: int, bits: int, p: float,
             reciprocal: bool | None = None) -> Tensor:
    """mean(|Q(x) - x|^p) of one tensor under a per-tensor grid, a 0-d float32 tensor on x's device.

    x: float32, any shape; scale, zero_point: Python numbers (from `grid_qparams`), as the reference
    hands them to its fake quantization. Q is that fake quantization (`round(x / s) + z`, clamped to
    the grid, minus z, times s) in the arithmetic the reference gets on each device: true division
    by the float32 scale on the CPU; on a GPU, torch multiplies by the float32 reciprocal of the
    scale, which is what the fused fake-quant kernel computes (one pass instead of five).
    reciprocal: force one of the two (None = by the device). x is scored as a tensor of its own,
    never as a row of a stack: vectorised CPU kernels and GPU reductions order their arithmetic by
    a tensor's layout, so a stacked row would score differently from the same data alone.
    """
    qmin, qmax = quant_range(bits)
    if x.device.type != "cpu" if reciprocal is None else reciprocal:
        x_hat = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    else:
        x_hat = torch.round(x / scale).add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)
    return x_hat.sub_(x).abs_().pow_(p).mean()


class LpErrorRows:
    """The loss of the MSE range searches of several tensors (row i: tensors[i]), on one device.

    A candidate is a range (lo, hi); its loss is `lp_error` under `grid_qparams(lo, hi)`. On a GPU
    with Triton every step's candidates are scored together by `FusedLpError` (the same
    element-wise arithmetic as `lp_error`, two launches per step); elsewhere one by one.
    """

    def __init__(self, tensors: Sequence[Tensor], bits: int, p: float) -> None:
        self.tensors = list(tensors)
        self.bits, self.p = bits, p
        self.fused = FusedLpError(self.tensors, bits, p) if can_fuse(self.tensors) else None

    def losses(self, rows: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> Tensor:
        """rows: tensor indices [P]; lo, hi: candidate ranges [P] -> float32 losses [P], queued."""
        scale, zero_point = grid_qparams(lo, hi, self.bits)
        if self.fused is not None:
            return self.fused.losses(rows, scale, zero_point)
        return torch.stack([lp_error(self.tensors[row], float(s), int(z), self.bits, self.p)
                            for row, s, z in zip(rows, scale, zero_point)])
