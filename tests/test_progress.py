"""The run's progress: bars named after their cell, one line per finished cell, the grid's ETA."""

from __future__ import annotations

import logging

import pytest

from ptqbench import progress
from ptqbench.progress import GridProgress, format_duration, phase


def test_bars_are_named_after_the_open_cell() -> None:
    grid = GridProgress(2)
    assert phase("PCC search") == "PCC search"
    with grid.cell("coco saqsam W4A4"):
        assert phase("PCC search") == "coco saqsam W4A4 · PCC search"
    assert phase("PCC search") == "PCC search"


def test_one_line_per_cell_and_the_grid_eta(monkeypatch, caplog) -> None:
    """The estimate waits for a timed quantized cell, then counts each kind at its own mean."""
    clock = iter([0.0, 1.0, 10.0, 40.0, 50.0, 60.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="ptqbench.progress")
    grid = GridProgress(6, fp_cells=2)
    with grid.cell("coco fp", fp=True):
        grid.finished("mask_AP = 63.15")
    assert grid.eta_s() is None  # 4 quantized cells left, none timed
    with grid.cell("coco mse W4A4"):
        grid.finished("mask_AP = 60.05")
    assert grid.eta_s() == pytest.approx(1.0 * 1 + 30.0 * 3)
    grid.skipped("coco mse W6A6")
    with grid.cell("dota mse W4A4"):
        grid.finished("mAP = 54.28")
    assert grid.eta_s() == pytest.approx(1.0 * 1 + 20.0 * 1)
    assert caplog.messages == ["[1/6] coco fp: mask_AP = 63.15",
                               "[2/6] coco mse W4A4: mask_AP = 60.05 · grid: about 1 min 31 s left",
                               "[3/6] coco mse W6A6: already in the store · grid: about 1 min 01 s left",
                               "[4/6] dota mse W4A4: mAP = 54.28 · grid: about 21 s left"]


def test_finished_needs_an_open_cell() -> None:
    with pytest.raises(RuntimeError):
        GridProgress(1).finished("mask_AP = 1.00")


@pytest.mark.parametrize(("seconds", "text"), [(4.4, "4 s"), (65, "1 min 05 s"), (3725, "1 h 02 min")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
