"""Independent scalar searches advanced in lockstep, their losses read back once per step.

A search is a generator (`ptqbench.quant.bounded_brent`): it yields a candidate, receives its
loss, and finally returns its result. The reference runs its searches one after another and
reads one loss back per evaluation; here every step collects the next candidate of every
unfinished search, scores all of them on the data's device (queued work, no read-back), and
reads the losses back in one transfer. Each search still sees exactly the losses it would see
alone, so the results do not depend on how searches are batched.

The searches are dealt into two lanes that take turns, so that on a GPU the host's share of a
step (advancing the generators, computing the next candidates' qparams, launching) overlaps the
device's scoring of the other lane's candidates instead of waiting for it.

The searches of one batch are grouped by a `RowEvaluator`, which scores the candidates of its
searches (one data row each) without reading anything back (for the MSE range search,
`LpErrorRows`).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ptqbench.quant.functional import quant_range
from ptqbench.quant.fused_lp_error import FusedLpError, can_fuse
from ptqbench.transfer import download


class RowEvaluator(Protocol):
    """Scores candidates for a group of searches, one data row per search."""

    def losses(self, rows: Sequence[int], candidates: Sequence[object]) -> Tensor:
        """rows: the indices (into the group, increasing) of the searches still running;
        candidates: one per row -> float32 losses [len(rows)] on the data's device."""
        ...


LANES = 2


def run_lockstep(groups: Sequence[tuple[RowEvaluator, Sequence[Generator]]],
                 lanes: int = LANES) -> list[list[object]]:
    """Run every search of every group to its end; returns each group's results in order.

    groups: (evaluator, searches) pairs, searches[i] scored on the evaluator's row i.
    lanes: search i of every group runs in lane i % lanes. A lane's step scores all its pending
    candidates (one `losses` call per group with unfinished searches) and queues one transfer of
    the losses to the host; the lanes then take turns: each waits for its own losses, advances
    its searches and queues its next step while the device works on the other lanes' steps.
    """
    results: list[list[object]] = [[None] * len(searches) for _, searches in groups]
    turns = [_Lane(groups, lane, lanes) for lane in range(lanes)]
    for lane in turns:
        lane.launch()
    while any(lane.in_flight for lane in turns):
        for lane in turns:
            if lane.in_flight:
                lane.advance(results)
                lane.launch()
    return results


class _Lane:
    """One lane of `run_lockstep`: the pending candidate of each of its searches, by group and
    search index, and the losses of its last step while they travel to the host."""

    def __init__(self, groups: Sequence[tuple[RowEvaluator, Sequence[Generator]]], lane: int, lanes: int) -> None:
        self.groups = groups
        self.pending: list[dict[int, object]] = [
            {i: next(search) for i, search in enumerate(searches) if i % lanes == lane} for _, searches in groups]
        self.losses: Tensor | None = None
        self.arrived: torch.cuda.Event | None = None

    @property
    def in_flight(self) -> bool:
        return self.losses is not None

    def launch(self) -> None:
        """Queue the scoring of every pending candidate and the losses' transfer to the host."""
        parts = [self.groups[g][0].losses(list(waiting), list(waiting.values()))
                 for g, waiting in enumerate(self.pending) if waiting]
        if not parts:
            return
        self.losses, self.arrived = download(torch.cat(parts).float())

    def advance(self, results: list[list[object]]) -> None:
        """Wait for the losses of the step in flight, send each to its search, and store the
        results of the searches that finish."""
        if self.arrived is not None:
            self.arrived.synchronize()
        losses = self.losses.numpy()
        self.losses, self.arrived = None, None
        position = 0
        for g, waiting in enumerate(self.pending):
            searches = self.groups[g][1]
            for i in list(waiting):
                try:
                    waiting[i] = searches[i].send(np.float32(losses[position]))
                except StopIteration as stop:
                    del waiting[i]
                    results[g][i] = stop.value
                position += 1


def deferral_limit(device: torch.device) -> int:
    """How many bytes of data a deferred batch of searches may collect before it runs: 1 GiB on
    the CPU, a quarter of the device's free memory (at most 16 GiB) on a GPU."""
    if device.type == "cuda":
        return min(16 << 30, torch.cuda.mem_get_info(device)[0] // 4)
    return 1 << 30


def grid_qparams(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """The reference's `calculate_qparams` for one candidate range, in float64 on the host:
    the range widened to include 0, scale = width / (qmax - qmin) (at least 1e-8), and the
    zero point qmin - round(low / scale) clamped to the grid."""
    qmin, qmax = quant_range(bits)
    low, high = min(lo, 0.0), max(hi, 0.0)
    scale = max((high - low) / (qmax - qmin), 1e-8)
    zero_point = int(min(max(qmin - round(low / scale), qmin), qmax))
    return scale, zero_point


def lp_error(x: Tensor, scale: float, zero_point: int, bits: int, p: float,
             reciprocal: bool | None = None) -> Tensor:
    """mean(|Q(x) - x|^p) of one tensor under a per-tensor grid, a 0-d float32 tensor on x's device.

    x: float32, any shape; scale, zero_point: Python numbers (`grid_qparams`), as the reference
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

    def losses(self, rows: Sequence[int], candidates: Sequence[object]) -> Tensor:
        qparams = [grid_qparams(lo, hi, self.bits) for lo, hi in candidates]
        if self.fused is not None:
            return self.fused.losses(rows, qparams)
        return torch.stack([lp_error(self.tensors[row], scale, zero_point, self.bits, self.p)
                            for row, (scale, zero_point) in zip(rows, qparams)])
