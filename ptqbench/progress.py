"""What a run shows while it works: the cell every progress bar belongs to, and a line per finished cell.

The harness opens each cell with `GridProgress.cell`; while it is open, `phase(desc)` names the
cell in a progress bar's description ("coco saqsam W4A4 · PCC search"), so the bars of the
calibration steps, the reconstruction units and the evaluation images say whose they are. When a
cell ends, `GridProgress.finished` prints one line: its place in the grid, its headline result and
times, and, from the first computed cell on, the estimated time left for the whole grid (the mean
time of the computed cells times the cells left; cells that resume skips count as done).
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)
_CELL: contextvars.ContextVar[str | None] = contextvars.ContextVar("ptqbench_cell", default=None)


def phase(desc: str) -> str:
    """A progress bar's description: `desc`, prefixed with the open cell's name when there is one."""
    cell = _CELL.get()
    return desc if cell is None else f"{cell} · {desc}"


def format_duration(seconds: float) -> str:
    """E.g. "42 s", "3 min 05 s", "1 h 02 min"."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class GridProgress:
    """The cells of one run's grid as they finish.

    total: the number of cells (FP and quantized, every task). The lines are INFO log records.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.computed_s: list[float] = []
        self._open: tuple[str, float] | None = None

    @contextmanager
    def cell(self, name: str) -> Iterator[None]:
        """Open cell `name` (e.g. "coco mse W4A4") for the bars' descriptions and its timing."""
        token = _CELL.set(name)
        self._open = (name, time.perf_counter())
        try:
            yield
        finally:
            _CELL.reset(token)
            self._open = None

    def finished(self, summary: str) -> None:
        """Count the open cell as computed and log "[k/N] <cell>: summary · grid: about T left"."""
        if self._open is None:
            raise RuntimeError("GridProgress.finished outside a cell")
        name, started = self._open
        self.computed_s.append(time.perf_counter() - started)
        self._count(f"{name}: {summary}")

    def skipped(self, name: str) -> None:
        """Count a cell that resume skipped (already in the store)."""
        self._count(f"{name}: already in the store")

    def eta_s(self) -> float | None:
        """Seconds left for the grid (mean computed cell time x cells left); None before any computed cell."""
        if not self.computed_s:
            return None
        return sum(self.computed_s) / len(self.computed_s) * (self.total - self.done)

    def _count(self, line: str) -> None:
        self.done += 1
        eta = self.eta_s()
        tail = "" if eta is None or self.done >= self.total else f" · grid: about {format_duration(eta)} left"
        log.info("[%d/%d] %s%s", self.done, self.total, line, tail)
