"""`ptqbench run --protocol gt|paper`: a paper cell is prompted (and calibrated) with exactly the
generated detector prompts, rows record protocol and detector, protocols never share cells, and a
task without a generator here ends with one line."""

from __future__ import annotations

import csv
import json
import logging
from collections import defaultdict
from pathlib import Path

import pytest

from ptqbench.cli import main
from ptqbench.config import RunConfig, load_config_file
from ptqbench.errors import ConfigError
from ptqbench.tasks.coco import CocoTask, load_split

DETECTOR = ["--detector-weights", "random", "--detector-option", "score_threshold=0.3",
            "--detector-option", "min_size=96", "--detector-option", "max_size=128"]


def _rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _generated(cache: Path, split: str) -> Path:
    (path,) = (cache / "prompts" / "coco").glob(f"{split}-fasterrcnn_resnet50_fpn-" + "?" * 16 + ".json")
    return path


def test_a_paper_cell_uses_exactly_the_generated_prompts(small_demo, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("PTQBENCH_CACHE", str(tmp_path / "cache"))
    calibrated_from = []
    original = CocoTask.calibration_items

    def spy(self, n, seed):
        calibrated_from.append(self.calib_prompts)
        return original(self, n, seed)

    monkeypatch.setattr(CocoTask, "calibration_items", spy)
    out = tmp_path / "out"
    args = ["run", "--protocol", "paper", "--data-root", str(small_demo), "--tasks", "coco", "--methods", "minmax",
            "--bits", "8", "--calib-size", "1", "--limit", "2", "--out", str(out), "--device", "cpu", *DETECTOR]
    assert main(args) == 0
    val, train = _generated(tmp_path / "cache", "val2017"), _generated(tmp_path / "cache", "train2017")
    rows = _rows(out / "leaderboard_coco.csv")
    assert [(r["method"], r["protocol"], r["detector"], r["prompts"]) for r in rows] == [
        (method, "paper", "fasterrcnn_resnet50_fpn@random-seed0", val.name) for method in ("fp", "minmax")]
    assert set(calibrated_from) == {train}
    split = load_split(small_demo, "val2017")
    evaluated = sorted(split.image_ids)[:2]
    assert json.loads(val.with_name(val.name + ".meta.json").read_text())["image_ids"] == evaluated
    train_meta = json.loads(train.with_name(train.name + ".meta.json").read_text())
    assert train_meta["image_ids"] == load_split(small_demo, "train2017").image_ids[:1]

    detections = defaultdict(list)
    for entry in json.loads(val.read_text()):
        detections[entry["image_id"]].append(entry)
    for cell in (out / "runs").iterdir():
        masks = defaultdict(list)
        for entry in json.loads((cell / "coco_segm_results.json").read_text()):
            masks[entry["image_id"]].append(entry)
        assert set(masks) == set(evaluated)
        for image_id in evaluated:
            boxes = detections[image_id] or [{"category_id": split.category_ids[0], "score": 0.1}]  # placeholder
            assert [m["category_id"] for m in masks[image_id]] == [b["category_id"] for b in boxes]
            assert all(0 < m["score"] <= b["score"] * 1.5 for m, b in zip(masks[image_id], boxes))  # x SAM's IoU

    caplog.set_level(logging.INFO, logger="ptqbench")
    assert main(args) == 0
    assert sum("reusing the cached fasterrcnn_resnet50_fpn prompts" in m for m in caplog.messages) == 2
    assert sum("already in the store" in m for m in caplog.messages) == 2

    assert main(args[:1] + args[3:-len(DETECTOR)] + ["--methods", "fp"]) == 0  # the gt protocol: cells of its own
    rows = {(r["method"], r["protocol"], r["detector"], r["prompts"]): r for r in _rows(out / "leaderboard_coco.csv")}
    paper = ("paper", "fasterrcnn_resnet50_fpn@random-seed0", val.name)
    assert sorted(rows) == [("fp", "gt", "-", "gt"), ("fp", *paper), ("minmax", *paper)]
    assert float(rows[("fp", "gt", "-", "gt")]["mask_AP"]) != float(rows[("fp", *paper)]["mask_AP"])
    minmax = rows[("minmax", *paper)]  # compared with the FP row of its own protocol
    assert float(minmax["delta_vs_fp"]) == pytest.approx(
        float(minmax["mask_AP"]) - float(rows[("fp", *paper)]["mask_AP"]), abs=2e-4)


def test_paper_rows_with_the_users_detector_files_say_user(realdata, tmp_path):
    dets = realdata / "coco" / "detections"
    assert main(["run", "--protocol", "paper", "--data-root", str(realdata), "--model", "sam_tiny", "--tasks", "coco",
                 "--methods", "fp", "--limit", "1", "--prompts", str(dets / "yolov5n_val2017_bbox.json"),
                 "--out", str(tmp_path), "--device", "cpu"]) == 0
    (row,) = _rows(tmp_path / "leaderboard_coco.csv")
    assert (row["protocol"], row["detector"]) == ("paper", "user")
    assert row["prompts"] == str(dets / "yolov5n_val2017_bbox.json")


@pytest.mark.parametrize("argv, message", [
    (["--protocol", "paper", "--tasks", "dota"], "--protocol paper has no detector for dota here"),
    (["--protocol", "paper", "--tasks", "ade20k"], "--protocol paper on ade20k is SSA: add --task-option mode=ssa"),
    (["--protocol", "paper", "--tasks", "ade20k", "--task-option", "mode=ssa"], "semantic_prior=DIR"),
    (["--detector", "fcos_resnet50_fpn"], "detector is set but only --protocol paper runs a detector"),
    (["--detector-weights", "random"], "detector-weights is set but only --protocol paper"),
    (["--protocol", "paper", "--detector", "yolo"], "unknown detector 'yolo'"),
    (["--protocol", "paper", "--detector-option", "iou=0.5"], "unknown detector option 'iou'"),
    (["--protocol", "paper", "--detector-option", "nms"], "--detector-option expects KEY=VALUE, got 'nms'"),
    (["--protocol", "exact"], "invalid choice: 'exact'"),
])
def test_bad_protocol_input_is_one_line_and_exit_2(small_demo, tmp_path, monkeypatch, argv, message, capsys):
    monkeypatch.setenv("PTQBENCH_CACHE", str(tmp_path / "cache"))
    base = ["run", "--data-root", str(small_demo), "--methods", "minmax", "--out", str(tmp_path), "--device", "cpu"]
    try:
        code = main(base + argv)
    except SystemExit as exit:  # argparse's own errors (an invalid choice)
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ptqbench: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "cache" / "prompts").exists()


def test_yaml_takes_the_protocol_and_detector_options(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("protocol: paper\ndetector: fcos_resnet50_fpn\ndetector_options: {score_threshold: 0.1}\n")
    values = load_config_file(path)
    assert RunConfig(**values).detector_options == (("score_threshold", "0.1"),)
    path.write_text("protocol: oracle\n")
    with pytest.raises(ConfigError, match="--protocol must be one of gt, paper, got 'oracle'"):
        load_config_file(path)
