"""DOTA and ADE20K (gt mode) predict through `Predictor.stream`: the results equal, to the byte, those of
the per-image `set_image` + `predict_boxes` loops they replaced, kept here as references."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ptqbench.models.checkpoints import load_model
from ptqbench.models.sam1.inference import BoxPredictor
from ptqbench.tasks.ade20k import IGNORE_INDEX, Ade20kTask, AdePrediction, component_boxes, paint_masks
from ptqbench.tasks.ade20k_metric import read_annotation
from ptqbench.tasks.base import TaskConfig
from ptqbench.tasks.dota import (
    EVAL_SPLIT,
    DotaImageResult,
    DotaTask,
    RotatedBoxes,
    nms_per_class,
    task1_lines,
)
from ptqbench.tasks.dota_eval import read_dota_labels
from ptqbench.tasks.dota_geometry import assign_windows, clip_boxes, mask_to_rbox, split_windows

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
MASK_BATCH = 64  # boxes per predict_boxes call of the former DOTA loop
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


@pytest.fixture(scope="module")
def shipped():
    """The shipped (trained) sam_tiny: its masks survive NMS, so there is much to compare."""
    return load_model("sam_tiny").model


def old_read_rgb(path: Path) -> np.ndarray:
    """The former DOTA reader (OpenCV, BGR -> RGB)."""
    import cv2

    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def old_predict_rotated_boxes(predictor, image, prompts, window, gap):
    """The former per-window loop of the dota task: set_image per window, predict_boxes per
    MASK_BATCH prompts; rotated boxes (before NMS) in window order, then prompt order."""
    height, width = image.shape[:2]
    windows = split_windows(width, height, window, gap)
    assignment = assign_windows(prompts.boxes, windows)
    polygons, scores, classes = [], [], []
    dropped = 0
    for index, win in enumerate(windows):
        members = np.nonzero(assignment == index)[0]
        if members.size == 0:
            continue
        predictor.set_image(np.ascontiguousarray(image[win.y0:win.y1, win.x0:win.x1]))
        offset = np.array([win.x0, win.y0, win.x0, win.y0], dtype=np.float64)
        local = clip_boxes(prompts.boxes[members], win.x0, win.y0, win.x1, win.y1) - offset
        for start in range(0, members.size, MASK_BATCH):
            batch = members[start:start + MASK_BATCH]
            masks, ious = predictor.predict_boxes(local[start:start + MASK_BATCH])
            for k, prompt in enumerate(batch):
                corners = mask_to_rbox(masks[k])
                if corners is None:
                    dropped += 1
                    continue
                corners[0::2] += win.x0
                corners[1::2] += win.y0
                polygons.append(corners)
                scores.append(float(ious[k]) if prompts.scores is None else float(prompts.scores[prompt]))
                classes.append(int(prompts.classes[prompt]))
    return RotatedBoxes(polygons=np.array(polygons, dtype=np.float64).reshape(-1, 8),
                        scores=np.array(scores, dtype=np.float64),
                        classes=np.array(classes, dtype=np.int64)), dropped


def old_dota_predict(task: DotaTask, predictor, indices) -> list[DotaImageResult]:
    """The former `DotaTask.predict`: image by image, window by window."""
    all_items = task._items(EVAL_SPLIT)
    detector = task._prompt_source(task.prompt_dir, all_items)
    results = []
    for index in indices:
        item = all_items[index]
        image = old_read_rgb(item.image_path)
        height, width = image.shape[:2]
        labels = read_dota_labels(item.label_path) if detector is None else None
        prompts = task._image_prompts(detector, item, labels, width, height)
        boxes, empty = old_predict_rotated_boxes(predictor, image, prompts, task.window, task.gap)
        results.append(DotaImageResult(image=item.name, lines=task1_lines(item.name, nms_per_class(boxes)),
                                       empty_masks=empty))
    return results


def write_detector_prompts(folder: Path, task: DotaTask) -> Path:
    """A Task1 prompt folder: every GT object of the val split, shifted by a pixel, scored by
    its position (distinct scores), plus one box on an image edge."""
    folder.mkdir()
    lines: dict[str, list[str]] = {}
    for item in task._items(EVAL_SPLIT):
        labels = read_dota_labels(item.label_path)
        for k, (polygon, name) in enumerate(zip(labels.polygons, labels.names)):
            coords = " ".join(repr(float(v) + 1.0) for v in polygon)
            lines.setdefault(name, []).append(f"{item.name} {0.9 - 0.001 * k!r} {coords}")
        lines.setdefault("plane", []).append(f"{item.name} 0.5 -5 -5 30 -5 30 30 -5 30")
    for name, class_lines in lines.items():
        (folder / f"Task1_{name}.txt").write_text("\n".join(class_lines) + "\n")
    return folder


def write_dense_dota(root: Path) -> Path:
    """A DOTA val split of one 240 x 260 image (one 256 window at sam_tiny's size) with 80 small
    objects: its window runs 80 prompts, two decoder calls of at most 64 boxes."""
    import cv2

    split_dir = root / "DOTA" / "val"
    (split_dir / "images").mkdir(parents=True)
    (split_dir / "labelTxt").mkdir(parents=True)
    rng = np.random.default_rng(5)
    image = rng.integers(0, 80, (240, 260, 3), dtype=np.uint8)
    lines = []
    for k in range(80):
        row, col = divmod(k, 10)
        x0, y0 = 4 + 25 * col, 4 + 29 * row
        image[y0:y0 + 16, x0:x0 + 18] = rng.integers(120, 255, 3, dtype=np.uint8)
        lines.append(f"{x0} {y0} {x0 + 18} {y0} {x0 + 18} {y0 + 16} {x0} {y0 + 16} small-vehicle 0")
    cv2.imwrite(str(split_dir / "images" / "D.png"), image)
    (split_dir / "labelTxt" / "D.txt").write_text("\n".join(lines) + "\n")
    return root


def dota_case(case: str, small_demo: Path, tmp_path: Path) -> tuple[DotaTask, list[int]]:
    """(task, evaluation indices) of a named case."""
    if case == "demo":
        task = DotaTask(TaskConfig(data_root=small_demo, model_input_size=256))
        return task, list(range(task.eval_image_count(None)))
    if case == "80 prompts in a window":
        return DotaTask(TaskConfig(data_root=write_dense_dota(tmp_path), model_input_size=256)), [0]
    if not (REALDATA / "DOTA").is_dir():
        pytest.skip("../shared/realdata is absent")
    prompts = write_detector_prompts(tmp_path / "prompts", DotaTask(TaskConfig(data_root=REALDATA)))
    task = DotaTask(TaskConfig(data_root=REALDATA, model_input_size=256, prompts=str(prompts)))
    return task, [1]  # P1888: 64 objects in 10 windows


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["demo", "80 prompts in a window", "real, detector prompts"])
def test_dota_stream_equals_the_per_window_loop(case, device, small_demo, tmp_path, shipped):
    """Task1 lines (every float's repr), their order and the dropped-mask counts are those of the
    former loop; the stream encodes two windows at a time (on a GPU: decoding on its own stream)."""
    task, indices = dota_case(case, small_demo, tmp_path)
    streamed = task.predict(BoxPredictor(shipped, device, encoder_batch=2), indices)
    reference = old_dota_predict(task, BoxPredictor(shipped, device), indices)
    assert sum(len(lines) for result in reference for lines in result.lines.values()) > 5
    assert streamed == reference


def old_ade_predict_gt(task: Ade20kTask, predictor, indices) -> list[AdePrediction]:
    """The former gt mode of `Ade20kTask.predict`: Pillow read, set_image + predict_boxes per image."""
    results = []
    for index in indices:
        sample = task.samples[index]
        with Image.open(sample.image_path) as stored:
            image = np.array(stored.convert("RGB"))
        label = read_annotation(sample.annotation_path, expected_hw=image.shape[:2])
        boxes, classes, _ = component_boxes(label)
        if len(boxes) == 0:
            prediction = np.full(label.shape, IGNORE_INDEX, dtype=np.uint8)
        else:
            predictor.set_image(image)
            masks, _ = predictor.predict_boxes(boxes)
            prediction = paint_masks(masks, classes)
        png = io.BytesIO()
        Image.fromarray(prediction).save(png, format="PNG")
        results.append(AdePrediction(stem=sample.stem, png=png.getvalue()))
    return results


def add_image_without_components(root: Path) -> None:
    """An extra validation image whose every GT component is under 64 px (no prompt)."""
    ade = root / "ADEChallengeData2016"
    raw = np.zeros((40, 48), dtype=np.uint8)
    raw[5:10, 5:10] = 4
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(ade / "images" / "validation" / "zz.jpg")
    Image.fromarray(raw).save(ade / "annotations" / "validation" / "zz.png")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["demo, shipped sam_tiny", "real, untrained sam_tiny"])
def test_ade20k_gt_stream_equals_the_per_image_loop(case, device, small_demo, tmp_path, sam_tiny, shipped):
    """The PNG bytes of every prediction are those of the former loop, an image without a
    component included (all 255, never encoded)."""
    import shutil

    if case.startswith("real"):
        if not (REALDATA / "ADEChallengeData2016").is_dir():
            pytest.skip("../shared/realdata is absent")
        source, model = REALDATA, sam_tiny
    else:
        source, model = small_demo, shipped
    root = tmp_path / "data"
    shutil.copytree(source / "ADEChallengeData2016", root / "ADEChallengeData2016")
    add_image_without_components(root)
    task = Ade20kTask(TaskConfig(data_root=root, model_input_size=256))
    indices = list(range(task.eval_image_count(None)))
    streamed = task.predict(BoxPredictor(model, device, encoder_batch=2), indices)
    reference = old_ade_predict_gt(task, BoxPredictor(model, device), indices)
    assert streamed[-1].stem == "zz"
    assert streamed == reference
