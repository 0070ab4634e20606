"""What a run shows while it works: the cell every progress bar belongs to, and a line per finished cell.

The harness opens each cell with `GridProgress.cell`; while it is open, `phase(desc)` names the
cell in a progress bar's description ("coco saqsam W4A4 · PCC search"), so the bars of the
calibration steps, the reconstruction units and the evaluation images say whose they are. When a
cell ends, `GridProgress.finished` prints one line: its place in the grid, its headline result and
times, and, from the first computed quantized cell on, the estimated time left for the whole grid
(per kind, FP or quantized, the mean time of its computed cells times its cells left; cells that
resume skips count as done).
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

    total: the number of cells (FP and quantized, every task); fp_cells: how many of them are FP
    cells (one per task). The lines are INFO log records. The time left is estimated per kind (FP
    cells evaluate only; quantized cells calibrate first and take far longer), so no estimate is
    given while quantized cells remain and none has been timed yet.
    """

    def __init__(self, total: int, fp_cells: int = 0) -> None:
        self.total = total
        self.left = {True: fp_cells, False: total - fp_cells}  # by "is FP"
        self.computed_s: dict[bool, list[float]] = {True: [], False: []}
        self._open: tuple[str, bool, float] | None = None

    @contextmanager
    def cell(self, name: str, *, fp: bool = False) -> Iterator[None]:
        """Open cell `name` (e.g. "coco mse W4A4"; `fp` for an FP cell) for the bars' descriptions and its timing."""
        token = _CELL.set(name)
        self._open = (name, fp, time.perf_counter())
        try:
            yield
        finally:
            _CELL.reset(token)
            self._open = None

    def finished(self, summary: str) -> None:
        """Count the open cell as computed and log "[k/N] <cell>: summary · grid: about T left"."""
        if self._open is None:
            raise RuntimeError("GridProgress.finished outside a cell")
        name, fp, started = self._open
        self.computed_s[fp].append(time.perf_counter() - started)
        self._count(f"{name}: {summary}", fp)

    def skipped(self, name: str, *, fp: bool = False) -> None:
        """Count a cell that resume skipped (already in the store)."""
        self._count(f"{name}: already in the store", fp)

    def eta_s(self) -> float | None:
        """Seconds left for the grid: per kind, the mean time of its computed cells x its cells left
        (FP cells not timed yet count as the quantized mean); None while quantized cells remain
        untimed, or before any cell was computed."""
        means = {kind: sum(times) / len(times) for kind, times in self.computed_s.items() if times}
        if self.left[False] and False not in means or not means:
            return None
        fp_mean = means.get(True, means.get(False, 0.0))
        return self.left[True] * fp_mean + self.left[False] * means.get(False, 0.0)

    def _count(self, line: str, fp: bool) -> None:
        self.left[fp] -= 1
        done = self.total - sum(self.left.values())
        eta = self.eta_s()
        tail = "" if eta is None or done >= self.total else f" · grid: about {format_duration(eta)} left"
        log.info("[%d/%d] %s%s", done, self.total, line, tail)
