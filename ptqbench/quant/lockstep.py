"""Independent scalar searches advanced in lockstep, their candidates scored in one batched pass.

A search is a generator (`ptqbench.quant.bounded_brent`): it yields a candidate, receives its
loss, and finally returns its result. The reference runs its searches one after another and
reads one loss back per evaluation; here every step collects the next candidate of every
unfinished search, scores all of them with tensor work on the data's device, and reads the
losses back in one transfer. Each search still sees exactly the losses it would see alone, so
the results do not depend on how searches are batched.

The searches of one batch are grouped by a `RowEvaluator`: the data of its B searches stacked
as rows of one tensor, scored together (for the MSE range search, `LpErrorRows`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator, Sequence
from typing import Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor

from ptqbench.quant.functional import quant_range

# Elements per chunk of rows scored at once (bounds the temporaries of one step).
_CHUNK_ELEMENTS = {"cpu": 1 << 22, "other": 1 << 28}
# Score candidates on a GPU with kernels fused by torch.compile (one pass over the data per step
# instead of about ten); `benchmarks/stats_speed.py --eager` turns it off to compare.
FUSE_ON_GPU = True

Scorer = TypeVar("Scorer", bound=Callable)


@functools.cache
def _fused(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=True)


def on_device(fn: Scorer, device: torch.device) -> Scorer:
    """`fn` compiled into fused kernels on a GPU (FUSE_ON_GPU), `fn` itself elsewhere. Its tensor
    arguments vary freely; every other argument must take few values (each one compiles once)."""
    return _fused(fn) if FUSE_ON_GPU and device.type == "cuda" else fn


class RowEvaluator(Protocol):
    """Scores candidates for a group of searches, one data row per search."""

    def losses(self, rows: Sequence[int], candidates: Sequence[object]) -> Tensor:
        """rows: the indices (into the group, increasing) of the searches still running;
        candidates: one per row -> float32 losses [len(rows)] on the data's device."""
        ...


def run_lockstep(groups: Sequence[tuple[RowEvaluator, Sequence[Generator]]]) -> list[list[object]]:
    """Run every search of every group to its end; returns each group's results in order.

    groups: (evaluator, searches) pairs, searches[i] scored on the evaluator's row i. Each step
    scores all pending candidates (one `losses` call per group with unfinished searches) and
    brings the losses to the host in one transfer.
    """
    pending: list[dict[int, object]] = [{i: next(search) for i, search in enumerate(searches)}
                                        for _, searches in groups]
    results: list[list[object]] = [[None] * len(searches) for _, searches in groups]
    while any(pending):
        active = [g for g, waiting in enumerate(pending) if waiting]
        parts = [groups[g][0].losses(list(pending[g]), list(pending[g].values())) for g in active]
        losses = torch.cat(parts).float().cpu().numpy()
        position = 0
        for g in active:
            searches = groups[g][1]
            for i in list(pending[g]):
                try:
                    pending[g][i] = searches[i].send(np.float32(losses[position]))
                except StopIteration as stop:
                    del pending[g][i]
                    results[g][i] = stop.value
                position += 1
    return results


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


def lp_errors(rows: Tensor, scale: Tensor, zero_point: Tensor, bits: int, p: float) -> Tensor:
    """mean(|Q(x) - x|^p) of each row x under its own per-tensor grid, in float32.

    rows: [B, K]; scale, zero_point: [B] float32 -> [B]. Q is the reference's fake quantization
    (`round(x / s) + z`, clamped to the grid, minus z, times s), as `fake_quantize_per_tensor_affine`.
    """
    qmin, qmax = quant_range(bits)
    s, z = scale[:, None], zero_point[:, None]
    x_hat = torch.round(rows / s).add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)
    return x_hat.sub_(rows).abs_().pow_(p).mean(dim=1)


class LpErrorRows:
    """The loss of the MSE range searches for B same-size tensors: rows [B, K] on one device.

    A candidate is a range (lo, hi); its loss is `lp_errors` under `grid_qparams(lo, hi)`.
    Rows of finished searches are dropped from the stack as they finish.
    """

    def __init__(self, rows: Tensor, bits: int, p: float) -> None:
        self.rows = rows
        self.bits, self.p = bits, p
        self._ids = list(range(rows.shape[0]))

    def losses(self, rows: Sequence[int], candidates: Sequence[object]) -> Tensor:
        if list(rows) != self._ids:
            keep = torch.tensor([self._ids.index(i) for i in rows], device=self.rows.device)
            self.rows, self._ids = self.rows.index_select(0, keep), list(rows)
        qparams = [grid_qparams(lo, hi, self.bits) for lo, hi in candidates]
        scale = torch.tensor([s for s, _ in qparams], dtype=torch.float32).to(self.rows.device)
        zero_point = torch.tensor([z for _, z in qparams], dtype=torch.float32).to(self.rows.device)
        budget = _CHUNK_ELEMENTS["cpu" if self.rows.device.type == "cpu" else "other"]
        step = max(1, budget // self.rows.shape[1])
        score = on_device(lp_errors, self.rows.device)
        return torch.cat([score(self.rows[i:i + step], scale[i:i + step], zero_point[i:i + step], self.bits, self.p)
                          for i in range(0, self.rows.shape[0], step)])
