"""The `dota` task: windows, prompt assignment, mask -> rotated box, NMS, Task1 output,
calibration windows, and whole-task runs with a box-filling fake predictor and with sam_tiny."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ptqbench.errors import ConfigError, DataError
from ptqbench.tasks.base import TASKS, TaskConfig
from ptqbench.tasks.dota import DotaTask
from ptqbench.tasks.dota_eval import METRIC_KEYS
from ptqbench.tasks.dota_geometry import (
    Window,
    assign_windows,
    mask_to_rbox,
    polygon_nms,
    split_windows,
    window_starts,
)
from ptqbench.tasks.images import read_image
from ptqbench.tasks.polygon_iou import poly_iou

# image A: 300 x 200 -> windows 256/50 at x 0 and 44; image B: 150 x 260 -> windows at y 0 and 4
IMAGES = {
    "A": ((200, 300), [((20, 30, 80, 90), "plane", 0), ((230, 40, 290, 100), "ship", 0),
                       ((120, 120, 160, 150), "small-vehicle", 0), ((200, 150, 220, 190), "large-vehicle", 1)]),
    "B": ((260, 150), [((10, 200, 60, 255), "plane", 0)]),
}


def rect_line(box: tuple[float, float, float, float], name: str, difficult: int) -> str:
    x0, y0, x1, y1 = box
    return f"{x0} {y0} {x1} {y0} {x1} {y1} {x0} {y1} {name} {difficult}"


def write_dota(root: Path, split: str = "val") -> Path:
    """A DOTA-layout split with the two IMAGES (textured PNGs + labelTxt with headers)."""
    import cv2

    split_dir = root / "DOTA" / split
    (split_dir / "images").mkdir(parents=True)
    (split_dir / "labelTxt").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, ((height, width), objects) in IMAGES.items():
        image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        for (x0, y0, x1, y1), _, _ in objects:
            image[y0:y1, x0:x1] = rng.integers(150, 255, 3, dtype=np.uint8)
        cv2.imwrite(str(split_dir / "images" / f"{name}.png"), image)
        lines = ["imagesource:GoogleEarth", "gsd:0.5"] + [rect_line(*obj) for obj in objects]
        (split_dir / "labelTxt" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return split_dir


class BoxFillPredictor:
    """Fake Predictor: the mask of a box is every pixel centre inside it; IoU 0.75 - 0.01 k."""

    input_size = 256

    def __init__(self) -> None:
        self.encoded: list[tuple[int, int]] = []
        self.shape = (0, 0)

    def set_image(self, image: np.ndarray) -> None:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.flags.c_contiguous
        self.shape = image.shape[:2]
        self.encoded.append(self.shape)

    def predict_boxes(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        masks = np.zeros((len(boxes),) + self.shape, dtype=bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes):
            masks[k, math.ceil(y0):math.floor(y1) + 1, math.ceil(x0):math.floor(x1) + 1] = True
        return masks, (0.75 - 0.01 * np.arange(len(boxes))).astype(np.float32)

    def stream(self, loaders):
        for loader in loaders:
            item = loader()
            self.set_image(item.image)
            yield item, *self.predict_boxes(item.boxes)


def make_task(root: Path, **kwargs) -> DotaTask:
    kwargs.setdefault("model_input_size", 256)
    return TASKS.get("dota")(TaskConfig(data_root=root, **kwargs))


def test_window_starts_follow_devkit_imgsplit() -> None:
    assert window_starts(1111, 1024, 824) == [0, 87]
    assert window_starts(2000, 1024, 824) == [0, 824, 976]
    assert window_starts(1024, 1024, 824) == [0]
    assert window_starts(600, 1024, 824) == [0]
    assert window_starts(300, 256, 206) == [0, 44]
    assert split_windows(300, 200, 256, 50) == [Window(0, 0, 256, 200), Window(44, 0, 300, 200)]
    assert split_windows(150, 260, 256, 50) == [Window(0, 0, 150, 256), Window(0, 4, 150, 260)]


def test_window_options(tmp_path: Path) -> None:
    write_dota(tmp_path)
    task = make_task(tmp_path, model_input_size=1024)
    assert (task.window, task.gap) == (1024, 200)
    task = make_task(tmp_path)
    assert (task.window, task.gap) == (256, 50)
    task = make_task(tmp_path, options=(("window", "512"),))
    assert (task.window, task.gap) == (512, 100)
    task = make_task(tmp_path, options=(("window", "400"), ("gap", "0")))
    assert (task.window, task.gap) == (400, 0)
    with pytest.raises(ConfigError, match="window > gap"):
        make_task(tmp_path, options=(("window", "100"), ("gap", "100")))
    with pytest.raises(ConfigError, match="expected an integer"):
        make_task(tmp_path, options=(("window", "big"),))
    with pytest.raises(ConfigError, match="unknown dota option"):
        make_task(tmp_path, options=(("windw", "512"),))


def test_assign_windows_prefers_full_overlap_then_nearest_centre() -> None:
    windows = split_windows(300, 200, 256, 50)  # centres x 128 and 172
    boxes = np.array([[120, 10, 160, 50],     # inside both, centre 140: window 0
                      [150, 10, 200, 50],     # inside both, centre 175: window 1
                      [10, 10, 280, 50],      # inside neither: overlap 246 vs 236 -> window 0
                      [30, 10, 290, 50]], dtype=np.float64)  # overlap 226 vs 246 -> window 1
    assert assign_windows(boxes, windows).tolist() == [0, 1, 0, 1]


def test_mask_to_rbox() -> None:
    import cv2

    mask = np.zeros((50, 60), dtype=bool)
    mask[10:21, 5:36] = True
    corners = mask_to_rbox(mask)
    assert corners.dtype == np.float64 and corners.shape == (8,)
    assert poly_iou(corners, [5, 10, 35, 10, 35, 20, 5, 20]) == pytest.approx(1.0)
    rotated = np.zeros((100, 100), dtype=np.uint8)
    quad = np.array([[50, 10], [90, 50], [50, 90], [10, 50]], dtype=np.int32)  # a diamond
    cv2.fillPoly(rotated, [quad], 1)
    corners = mask_to_rbox(rotated.astype(bool))
    assert poly_iou(corners, quad.ravel().astype(float)) == pytest.approx(1.0, abs=0.01)
    assert mask_to_rbox(np.zeros((5, 5), dtype=bool)) is None


def test_polygon_nms_hand_case() -> None:
    polygons = np.array([[0, 0, 10, 0, 10, 10, 0, 10], [1, 0, 11, 0, 11, 10, 1, 10],
                         [20, 0, 30, 0, 30, 10, 20, 10], [9, 0, 19, 0, 19, 10, 9, 10]], dtype=np.float64)
    # 1 (0.9) kept; 3 (0.8) overlaps it 20/180 = 0.11 > 0.1: gone; 0 (0.5): gone; 2 is apart: kept
    assert polygon_nms(polygons, np.array([0.5, 0.9, 0.3, 0.8])).tolist() == [1, 2]
    # 2 vs 3 (IoU 10/190 = 0.053) never suppresses
    assert polygon_nms(polygons[2:], np.array([0.3, 0.8])).tolist() == [1, 0]
    assert polygon_nms(np.zeros((0, 8)), np.zeros((0,))).tolist() == []


def read_task1(det_dir: Path) -> dict[str, list[str]]:
    return {path.stem[len("Task1_"):]: path.read_text().splitlines() for path in sorted(det_dir.glob("Task1_*.txt"))}


def test_evaluate_with_gt_prompts_and_a_box_filling_predictor(tmp_path: Path) -> None:
    write_dota(tmp_path / "data")
    task = make_task(tmp_path / "data")
    predictor = BoxFillPredictor()
    result = task.evaluate(predictor, limit=None, progress=False, out_dir=tmp_path / "out")
    assert tuple(result) == METRIC_KEYS == task.metrics and task.metric == "mAP"
    # A: both windows hold prompts; B: only the window at y 4 does (the plane's centre is nearer)
    assert predictor.encoded == [(200, 256), (200, 256), (256, 150)]
    for name in ("plane", "ship", "small-vehicle"):
        assert result[f"AP_{name}"] == pytest.approx(100.0)
    assert result["AP_large-vehicle"] == 0.0  # its only object is difficult: npos 0
    assert result["mAP"] == pytest.approx(300.0 / 15)
    lines = read_task1(tmp_path / "out" / "dota_task1")
    assert len(lines) == 15 and lines["bridge"] == []
    # window 0 of A runs plane then small-vehicle (IoUs 0.75, 0.74); window 1 runs ship, large-vehicle
    plane = [line.split() for line in lines["plane"]]
    top_iou = repr(float(np.float32(0.75)))
    assert [(p[0], p[1]) for p in plane] == [("A", top_iou), ("B", top_iou)]
    ship = lines["ship"][0].split()
    assert poly_iou([float(v) for v in ship[2:]], [230, 40, 290, 40, 290, 100, 230, 100]) == pytest.approx(1.0)
    assert lines["small-vehicle"][0].split()[1] == repr(float(np.float32(0.74)))


def test_evaluate_limit_scores_only_the_first_images(tmp_path: Path) -> None:
    write_dota(tmp_path / "data")
    result = make_task(tmp_path / "data").evaluate(BoxFillPredictor(), limit=1, progress=False, out_dir=tmp_path)
    assert result["AP_plane"] == pytest.approx(100.0)
    assert {line.split()[0] for line in read_task1(tmp_path / "dota_task1")["plane"]} == {"A"}


def test_evaluate_with_a_task1_prompt_folder_keeps_detector_scores(tmp_path: Path) -> None:
    write_dota(tmp_path / "data")
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "Task1_plane.txt").write_text(
        "B 0.123456789012345678 10 200 60 200 60 255 10 255\n"
        "A 0.6 20 30 80 30 80 90 20 90\n"
        "A 0.2 21 31 79 31 79 89 21 89\n"       # a duplicate: removed by NMS
        "A 0.1 150 20 190 20 190 60 150 60\n")  # nothing there: a false positive
    task = make_task(tmp_path / "data", prompts=str(prompts))
    result = task.evaluate(BoxFillPredictor(), limit=None, progress=False, out_dir=tmp_path / "out")
    plane = [line.split()[:2] for line in read_task1(tmp_path / "out" / "dota_task1")["plane"]]
    assert plane == [["A", "0.6"], ["A", "0.1"], ["B", "0.12345678901234568"]]
    # sorted: 0.6 TP, 0.123 TP, 0.1 FP -> precision 1 up to recall 1
    assert result["AP_plane"] == pytest.approx(100.0)
    assert result["AP_ship"] == 0.0
    assert "prompts" in task.describe() and str(prompts) in task.describe()
    (prompts / "Task1_plane.txt").write_text("Z 0.5 1 1 5 1 5 5 1 5\n")
    with pytest.raises(DataError, match=r"Task1_plane\.txt, line 1: unknown image 'Z'"):
        task.evaluate(BoxFillPredictor(), limit=None, progress=False, out_dir=tmp_path / "out")


def test_calibration_items_are_the_first_windows_with_prompts(tmp_path: Path) -> None:
    write_dota(tmp_path, split="train")
    task = make_task(tmp_path)
    items = task.calibration_items(10, seed=0)
    assert [item.image.shape for item in items] == [(200, 256, 3), (200, 256, 3), (256, 150, 3)]
    np.testing.assert_array_equal(items[0].boxes, [[20, 30, 80, 90], [120, 120, 160, 150]])
    np.testing.assert_array_equal(items[1].boxes, [[186, 40, 246, 100], [156, 150, 176, 190]])  # x - 44
    np.testing.assert_array_equal(items[2].boxes, [[10, 196, 60, 251]])  # y - 4
    assert items[1].image.dtype == np.uint8 and items[1].image.flags.c_contiguous
    original = read_image(tmp_path / "DOTA" / "train" / "images" / "A.png")
    np.testing.assert_array_equal(items[1].image, original[:, 44:300])
    assert len(task.calibration_items(2, seed=0)) == 2
    prompts = tmp_path / "calib_prompts"
    prompts.mkdir()
    (prompts / "Task1_ship.txt").write_text("B 0.3 0 0 20 0 20 300 0 300\n")  # clipped to the image
    items = make_task(tmp_path, calib_prompts=str(prompts)).calibration_items(10, seed=0)
    assert len(items) == 1 and items[0].image.shape == (256, 150, 3)
    # 20 x 256 overlap with both windows, centres equally far: the first window (y 0..256)
    np.testing.assert_array_equal(items[0].boxes, [[0, 0, 20, 256]])
    with pytest.raises(DataError, match="DOTA/val2/images does not exist"):
        make_task(tmp_path, calib_split="val2").calibration_items(2, seed=0)


def test_fingerprint_and_describe(tmp_path: Path) -> None:
    write_dota(tmp_path)
    first = make_task(tmp_path).fingerprint()
    assert len(first) == 16 and first == make_task(tmp_path).fingerprint()
    assert make_task(tmp_path, options=(("gap", "10"),)).fingerprint() != first
    label = tmp_path / "DOTA" / "val" / "labelTxt" / "B.txt"
    label.write_text(label.read_text().replace("plane 0", "plane 1"))
    assert make_task(tmp_path).fingerprint() != first
    assert "windows 256/gap 50" in make_task(tmp_path).describe()


def test_bad_images_and_missing_labels(tmp_path: Path) -> None:
    split_dir = write_dota(tmp_path)
    (split_dir / "images" / "C.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"C\.png has no label file"):
        make_task(tmp_path).evaluate(BoxFillPredictor(), limit=None, progress=False, out_dir=tmp_path)
    (split_dir / "labelTxt" / "C.txt").write_text("1 1 5 1 5 5 1 5 plane 0\n")
    with pytest.raises(DataError, match=r"image .*C\.png cannot be read"):
        make_task(tmp_path).evaluate(BoxFillPredictor(), limit=None, progress=False, out_dir=tmp_path)


def test_evaluate_with_sam_tiny_box_predictor(tmp_path: Path) -> None:
    from ptqbench.models.sam1.inference import BoxPredictor
    from ptqbench.models.sam1.models import build_sam_tiny

    write_dota(tmp_path / "data")
    predictor = BoxPredictor(build_sam_tiny(seed=0))
    result = make_task(tmp_path / "data").evaluate(predictor, limit=None, progress=False, out_dir=tmp_path / "out")
    assert tuple(result) == METRIC_KEYS
    assert all(0.0 <= value <= 100.0 + 1e-9 for value in result.values())
    assert len(list((tmp_path / "out" / "dota_task1").glob("Task1_*.txt"))) == 15


def test_real_slice_run_calibrates_on_val_when_train_is_absent(tmp_path, caplog):
    from ptqbench.cli import main

    realdata = Path(__file__).resolve().parents[2] / "shared" / "realdata"
    if not (realdata / "DOTA").is_dir():
        pytest.skip("../shared/realdata is absent")
    code = main(["run", "--model", "sam_tiny", "--tasks", "dota", "--data-root", str(realdata), "--methods", "minmax",
                 "--bits", "8", "--calib-size", "2", "--limit", "1", "--out", str(tmp_path), "--device", "cpu"])
    assert code == 0
    assert any("calibrating on the val images" in m for m in caplog.messages)
    rows = (tmp_path / "leaderboard_dota.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[2].startswith("sam_tiny,minmax,W8A8")
