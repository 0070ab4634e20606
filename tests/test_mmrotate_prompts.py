"""DOTA detector prompts as MMRotate writes them (datasets/README.md, "DOTA: detector prompts from
MMRotate"): a hand-made `format_only` + `merge_patches` output folder on the real DOTA slice is
read by the dota task as horizontal box prompts, clipped to the image, with the detector's scores."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ptqbench.tasks.base import TaskConfig
from ptqbench.tasks.dota import DotaTask
from ptqbench.tasks.dota_eval import DOTA_CLASSES, list_split, read_task1_folder

# (image, class, rotated box cx, cy, w, h, angle in radians (le90), score as MMRotate prints it)
DETECTIONS = [
    ("P0706", "ship", (300.0, 420.0, 60.0, 20.0, 0.5), "0.9453125"),
    ("P0706", "ship", (1100.0, 30.0, 80.0, 40.0, -0.3), "0.61"),          # crosses the right and top edges
    ("P0706", "harbor", (500.0, 600.0, 200.0, 90.0, 1.2), "0.4"),
    ("P1888", "large-vehicle", (100.0, 200.0, 40.0, 15.0, 0.0), "0.87"),
    ("P1888", "small-vehicle", (700.0, 550.0, 30.0, 12.0, 0.8), "0.05"),  # crosses the bottom-right corner
]


def _corners(cx: float, cy: float, w: float, h: float, angle: float) -> list[float]:
    """The 4 corners (x1 y1 ... x4 y4) of a rotated box, as MMRotate's rbox -> polygon conversion."""
    cos, sin = math.cos(angle), math.sin(angle)
    half = [(-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)]
    return [value for dx, dy in half for value in (cx + dx * cos - dy * sin, cy + dx * sin + dy * cos)]


def write_mmrotate_folder(folder: Path) -> None:
    """What MMRotate's DOTAMetric(format_only=True, merge_patches=True, outfile_prefix=folder) leaves:
    Task1_<class>.txt for all 15 classes (empty ones included), lines `image score x1 y1 ... x4 y4`
    with 2-decimal corners, and the zip of them for the evaluation server."""
    folder.mkdir(parents=True)
    lines: dict[str, list[str]] = {name: [] for name in DOTA_CLASSES}
    for image, name, box, score in DETECTIONS:
        lines[name].append(" ".join([image, score] + [f"{v:.2f}" for v in _corners(*box)]))
    for name, class_lines in lines.items():
        (folder / f"Task1_{name}.txt").write_text("".join(f"{line}\n" for line in class_lines))
    with zipfile.ZipFile(folder / f"{folder.name}.zip", "w") as archive:
        for name in DOTA_CLASSES:
            archive.write(folder / f"Task1_{name}.txt", f"Task1_{name}.txt")


def test_mmrotate_task1_output_is_read_as_clipped_horizontal_prompts(realdata, tmp_path):
    folder = tmp_path / "Task1"
    write_mmrotate_folder(folder)
    config = TaskConfig(data_root=realdata, model_input_size=2048, prompts=str(folder), calib_prompts=str(folder))
    task = DotaTask(config)  # one 2048 window per image: calibration items are whole images
    task.check_eval_inputs()
    items = {item.name: item for item in list_split(realdata / "DOTA" / "val")}
    detector = task._prompt_source(task.prompt_dir, list(items.values()))
    calibration = task.calibration_items(4, seed=0)
    assert [item.image.shape[:2] for item in calibration] == [(1182, 1111), (557, 712)]
    for position, image in enumerate(("P0706", "P1888")):
        expected = [(DOTA_CLASSES.index(name), box, float(score)) for i, name, box, score in DETECTIONS if i == image]
        expected.sort(key=lambda entry: entry[0])  # class order, then file order
        height, width = calibration[position].image.shape[:2]
        prompts = task._image_prompts(detector, items[image], None, width, height)
        np.testing.assert_array_equal(prompts.classes, [entry[0] for entry in expected])
        np.testing.assert_array_equal(prompts.scores, [entry[2] for entry in expected])
        for row, (_, box, _) in zip(prompts.boxes, expected):
            corners = np.array([float(f"{v:.2f}") for v in _corners(*box)]).reshape(4, 2)
            low, high = np.clip(corners.min(0), 0, [width, height]), np.clip(corners.max(0), 0, [width, height])
            np.testing.assert_allclose(row, [*low, *high])
        np.testing.assert_allclose(calibration[position].boxes, prompts.boxes)
    assert prompts.boxes[:, 2:].max() <= max(width, height)


def test_a_folder_without_task1_files_or_with_another_class_is_one_error(realdata, tmp_path):
    from ptqbench.errors import DataError

    folder = tmp_path / "Task1"
    folder.mkdir()
    (folder / "Task1.zip").write_bytes(b"")
    with pytest.raises(DataError, match="holds no Task1_<class>.txt file"):
        read_task1_folder(folder, {"P0706"})
    (folder / "Task1_boat.txt").write_text("P0706 0.5 1 1 5 1 5 5 1 5\n")
    with pytest.raises(DataError, match="'boat' is not a DOTA-v1.0 class"):
        read_task1_folder(folder, {"P0706"})
