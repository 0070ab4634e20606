"""Bootstrap intervals in a run: every cell keeps its per-image statistics, its rows carry the 95%
intervals of its metrics and the paired interval of its difference to FP, and the leaderboards show them."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from ptqbench.cli import main
from ptqbench.results import STORE_FILENAME, RunStore
from ptqbench.tasks.base import STATISTICS_FILE


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("task", ["coco", "dota", "ade20k"])
def test_rows_carry_intervals_and_paired_differences(small_demo, tmp_path, task) -> None:
    args = ["run", "--data-root", str(small_demo), "--tasks", task, "--methods", "minmax", "--bits", "4",
            "--calib-size", "1", "--bootstrap", "200", "--out", str(tmp_path), "--device", "cpu"]
    assert main(args) == 0
    assert len(list((tmp_path / "runs").glob(f"*/{STATISTICS_FILE}"))) == 2
    records = {r.method: r for r in RunStore(tmp_path / STORE_FILENAME).records(task)}
    for record in records.values():
        low, high = record.intervals[record.metric]
        assert low <= record.metrics[record.metric] <= high
    fp, quantized = records["fp"], records["minmax"]
    assert fp.delta_interval is None
    delta = quantized.metrics[quantized.metric] - fp.metrics[fp.metric]
    low, high = quantized.delta_interval
    assert low <= delta + 1e-9 and delta - 1e-9 <= high
    row_fp, row_q = _rows(tmp_path / f"leaderboard_{task}.csv")
    assert (row_fp["delta_ci_low"], row_fp["delta_ci_high"]) == ("0.0000", "0.0000")
    assert float(row_q["ci_low"]) == pytest.approx(quantized.intervals[quantized.metric][0], abs=1e-4)
    assert float(row_q["delta_ci_high"]) == pytest.approx(high, abs=1e-4)


def test_no_bootstrap_no_intervals(small_demo, tmp_path) -> None:
    args = ["run", "--data-root", str(small_demo), "--tasks", "coco", "--methods", "minmax", "--bits", "4",
            "--calib-size", "1", "--bootstrap", "0", "--out", str(tmp_path), "--device", "cpu"]
    assert main(args) == 0
    assert all(r.intervals == {} and r.delta_interval is None for r in RunStore(tmp_path / STORE_FILENAME).records())
    assert {r["ci_low"] for r in _rows(tmp_path / "leaderboard_coco.csv")} == {""}


def test_a_resumed_fp_cell_still_pairs_the_new_cells(small_demo, tmp_path) -> None:
    """The FP cell of an earlier run is skipped; its kept statistics pair the run's new cells."""
    args = ["run", "--data-root", str(small_demo), "--tasks", "coco", "--methods", "minmax", "--calib-size", "1",
            "--bootstrap", "200", "--out", str(tmp_path), "--device", "cpu"]
    assert main(args + ["--bits", "4"]) == 0
    assert main(args + ["--bits", "4,8"]) == 0
    records = {r.bits: r for r in RunStore(tmp_path / STORE_FILENAME).records("coco")}
    low, high = records["W8A8"].delta_interval
    delta = records["W8A8"].metrics["mask_AP"] - records["fp"].metrics["mask_AP"]
    assert low <= delta + 1e-9 and delta - 1e-9 <= high
