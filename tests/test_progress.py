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
    clock = iter([0.0, 10.0, 10.0, 40.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="ptqbench.progress")
    grid = GridProgress(5)
    grid.skipped("coco fp")
    assert grid.eta_s() is None
    with grid.cell("coco mse W4A4"):
        grid.finished("mask_AP = 60.05")
    assert grid.eta_s() == pytest.approx(10.0 * 3)
    with grid.cell("coco mse W6A6"):
        grid.finished("mask_AP = 62.50")
    assert grid.eta_s() == pytest.approx(20.0 * 2)
    assert caplog.messages == ["[1/5] coco fp: already in the store",
                               "[2/5] coco mse W4A4: mask_AP = 60.05 · grid: about 30 s left",
                               "[3/5] coco mse W6A6: mask_AP = 62.50 · grid: about 40 s left"]


def test_finished_needs_an_open_cell() -> None:
    with pytest.raises(RuntimeError):
        GridProgress(1).finished("mask_AP = 1.00")


@pytest.mark.parametrize(("seconds", "text"), [(4.4, "4 s"), (65, "1 min 05 s"), (3725, "1 h 02 min")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
