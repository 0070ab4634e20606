"""Calibration seeds: `--seeds` repeats every quantized cell with another calibration draw, and the
leaderboard merges the seeds of a setting (mean, standard deviation) next to the per-seed rows."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from ptqbench.cli import main
from ptqbench.results import STORE_FILENAME, RunStore
from ptqbench.tasks.base import calibration_order


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_seed_zero_keeps_the_split_order_and_others_draw_a_permutation() -> None:
    items = list(range(20))
    assert calibration_order(items, 0) == items
    drawn = calibration_order(items, 1)
    assert sorted(drawn) == items and drawn != items
    assert calibration_order(items, 1) == drawn and calibration_order(items, 2) != drawn


def test_seeds_repeat_the_quantized_cells_and_merge_in_the_leaderboard(small_demo, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="ptqbench")
    args = ["run", "--data-root", str(small_demo), "--tasks", "coco", "--methods", "minmax", "--bits", "4",
            "--calib-size", "1", "--seeds", "0,3", "--out", str(tmp_path), "--device", "cpu"]
    assert main(args) == 0
    records = RunStore(tmp_path / STORE_FILENAME).records("coco")
    assert sorted((r.method, r.seed) for r in records) == [("fp", 0), ("minmax", 0), ("minmax", 3)]
    minmax = {r.seed: r for r in records if r.method == "minmax"}
    assert minmax[0].calib_fingerprint != minmax[3].calib_fingerprint  # seed 3 draws the other image first
    assert any(m.startswith("[3/3] coco minmax W4A4 seed 3: mask_AP = ") for m in caplog.messages)

    by_seed = _rows(tmp_path / "leaderboard_coco_by_seed.csv")
    assert [(r["method"], r["seed"]) for r in by_seed] == [("fp", "0"), ("minmax", "0"), ("minmax", "3")]
    merged = _rows(tmp_path / "leaderboard_coco.csv")
    assert [(r["method"], r["seeds"]) for r in merged] == [("fp", "0"), ("minmax", "0,3")]
    values = [float(r["mask_AP"]) for r in by_seed[1:]]
    assert float(merged[1]["mask_AP"]) == round(sum(values) / 2, 4)
    assert merged[1]["mask_AP_std"] != "" and merged[0]["mask_AP_std"] == ""

    caplog.clear()
    assert main(args) == 0  # resumed: nothing recomputed
    assert sum("already in the store" in m for m in caplog.messages) == 3
