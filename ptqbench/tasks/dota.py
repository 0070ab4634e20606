"""DOTA-v1.0 oriented object detection with box-prompted SAM (task `dota`).

The MMRotate-SAM / SAM-RBox protocol:

- Data: `<data_root>/DOTA/{val,train}/images/*.png` + `labelTxt/*.txt`; evaluation on `val`,
  calibration on `train` (`TaskConfig.calib_split` overrides; without a train split, on `val`
  with a warning). Images are sorted by file name;
  `limit` keeps the first images and scores against those images only.
- Windows: each image is split into square windows of side `window` with overlap `gap`
  (step = window - gap; along each axis the starts are 0, step, 2 step, ... and the last window
  is shifted to max(side - window, 0), as DOTA_devkit's ImgSplit does), ordered row by row.
  Defaults: window = the model's input size, gap = round(window * 200 / 1024) (1024/200 for
  full-size SAM, 256/50 for sam_tiny); TaskConfig options `window` and `gap` override them.
  A window is a plain crop (smaller than `window` where the image is); SAM's own preprocessing
  resizes and pads it.
- Prompts: horizontal boxes in full-image pixels, clipped to the image. `gt` (the default): the
  axis-aligned box of every GT polygon, score = SAM's predicted IoU. A folder of Task1 files
  (`TaskConfig.prompts` = DIR): the enclosing horizontal box of every detection quad, score =
  the detector's score. Each prompt is run in exactly one window: the one with the largest
  intersection with its box, ties (every window that contains the whole box) broken by the
  nearest window centre, then by window order; the box is clipped to that window. So every
  prompt gives at most one detection; windows without prompts are not encoded. Every window
  with prompts is one image of `Predictor.stream` (crops read ahead in threads, each image file
  decoded once), its boxes in window pixels.
- Mask -> rotated box: `cv2.minAreaRect` over the (x, y) coordinates of all foreground pixels,
  `cv2.boxPoints` for the 4 corners, plus the window offset. An empty mask gives no detection
  (it is dropped and counted in the log).
- Merge: per image and class, polygon NMS in descending score order (stable on ties): a box is
  suppressed when its IoU with a kept box is > 0.1 (the devkit polygon IoU).
- Output: `out_dir/dota_task1/Task1_<class>.txt` for all 15 classes (lines
  `imgname score x1 y1 ... x4 y4`, `repr` of every float: full precision, never rounded), in
  the format of the official evaluation server; then scored by `dota_eval.evaluate_task1`.

Calibration items (`calibration_items(n, seed)`): calibration images in sorted file order, each
split into windows exactly like the evaluation images (same window and gap); a window to which
at least one prompt (GT box, or a `calib_prompts` Task1 folder box) is assigned becomes one item:
the window crop and its assigned boxes, clipped, in window pixels. The first `n` such windows are
returned (all of them when there are fewer); seed 0 takes the images in file order, another seed
in a seeded random order (`tasks.base.calibration_order`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from ptqbench.errors import ConfigError, DataError
from ptqbench.models.prediction import PromptedImage
from ptqbench.progress import phase
from ptqbench.tasks.base import TASKS, Task, TaskConfig, calibration_order, check_result_count, save_statistics
from ptqbench.tasks.dota_bootstrap import DotaImageStats, evaluate_task1_with_statistics
from ptqbench.tasks.dota_eval import (
    DOTA_CLASSES,
    METRIC_KEYS,
    DotaLabels,
    SplitItem,
    Task1Detections,
    dota_split_dir,
    list_split,
    read_dota_labels,
    read_split_labels,
    read_task1_folder,
)
from ptqbench.tasks.dota_geometry import (
    NMS_IOU,
    WindowPrompts,
    clip_boxes,
    mask_to_rbox,
    polygon_hboxes,
    polygon_nms,
    window_prompts,
)
from ptqbench.tasks.gallery import GALLERY_IMAGES, palette, polygons_to_labels, save_drawing
from ptqbench.tasks.images import image_size, read_image
from ptqbench.tasks.prompts import prompt_source
from ptqbench.types import CalibrationItem

if TYPE_CHECKING:
    from ptqbench.models.prediction import Predictor

log = logging.getLogger(__name__)

EVAL_SPLIT = "val"
CALIB_SPLIT = "train"
GAP_PER_WINDOW = 200 / 1024
OPTION_KEYS = ("window", "gap")
TASK1_FOLDER = "dota_task1"


@dataclass(frozen=True)
class BoxPrompts:
    """The box prompts of one image.

    boxes: float64 [N, 4] xyxy in full-image pixels; classes: int64 [N] indices into
    DOTA_CLASSES; scores: float64 [N] detector scores, or None for GT prompts (the score is
    then SAM's predicted IoU).
    """

    boxes: np.ndarray
    classes: np.ndarray
    scores: np.ndarray | None

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


@dataclass(frozen=True)
class RotatedBoxes:
    """Oriented detections of one image.

    polygons: float64 [M, 4 * 2] corners (x1 y1 ... x4 y4) in full-image pixels;
    scores: float64 [M]; classes: int64 [M] indices into DOTA_CLASSES.
    """

    polygons: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


@dataclass(frozen=True)
class DotaImageResult:
    """The detections of one val image: {class: Task1 lines} and the empty masks it dropped."""

    image: str
    lines: dict[str, list[str]]
    empty_masks: int


def draw_detections(result: DotaImageResult, image_path: Path, out_dir: Path, position: int) -> None:
    """The gallery drawing of one image: each detection's polygon filled in its class's colour."""
    image = read_image(image_path)
    polygons, classes = [], []
    for class_index, name in enumerate(DOTA_CLASSES):
        for line in result.lines.get(name, []):
            polygons.append(np.array(line.split()[2:10], dtype=np.float64).reshape(4, 2))
            classes.append(class_index)
    labels = polygons_to_labels(polygons, classes, image.shape[:2])
    save_drawing(image, labels, palette(len(DOTA_CLASSES)), out_dir, position)


def gt_prompts(labels: DotaLabels, width: int, height: int) -> BoxPrompts:
    """Box prompts from GT polygons: their horizontal boxes clipped to the image; scores None."""
    boxes = clip_boxes(polygon_hboxes(labels.polygons), 0, 0, width, height)
    classes = np.array([DOTA_CLASSES.index(name) for name in labels.names], dtype=np.int64)
    return BoxPrompts(boxes=boxes, classes=classes, scores=None)


def detection_prompts(detections: Mapping[str, Task1Detections]) -> dict[str, BoxPrompts]:
    """Per-image box prompts from Task1 detections {class: detections}: horizontal boxes of the
    quads (not yet clipped), detector scores; within an image, class order then file order."""
    per_image: dict[str, tuple[list[np.ndarray], list[int], list[float]]] = {}
    for class_index, name in enumerate(DOTA_CLASSES):
        found = detections.get(name)
        if found is None or len(found) == 0:
            continue
        hboxes = polygon_hboxes(found.polygons)
        for k, image in enumerate(found.image_ids):
            boxes, classes, scores = per_image.setdefault(image, ([], [], []))
            boxes.append(hboxes[k])
            classes.append(class_index)
            scores.append(float(found.scores[k]))
    return {image: BoxPrompts(boxes=np.array(boxes, dtype=np.float64).reshape(-1, 4),
                              classes=np.array(classes, dtype=np.int64),
                              scores=np.array(scores, dtype=np.float64))
            for image, (boxes, classes, scores) in per_image.items()}


def no_prompts() -> BoxPrompts:
    """An image without prompts (detector prompts with no box on it)."""
    return BoxPrompts(boxes=np.zeros((0, 4)), classes=np.zeros((0,), dtype=np.int64),
                      scores=np.zeros((0,)))


def clip_prompts(prompts: BoxPrompts, width: int, height: int) -> BoxPrompts:
    """The same prompts with boxes clipped to a width x height image."""
    return BoxPrompts(boxes=clip_boxes(prompts.boxes, 0, 0, width, height),
                      classes=prompts.classes, scores=prompts.scores)


class WindowedImage:
    """One evaluation image, cut into the windows that run its prompts, for `Predictor.stream`.

    `load(k)` gives window k as a `PromptedImage`; the first call to run (in a stream worker)
    decodes the file, the others wait for it and crop the same pixels, and the last one drops
    them. position: the image's place among the predicted images; hw: its (H, W) from the file's
    header; prompts: its prompts, clipped to it; windows: `window_prompts` of those prompts.
    """

    def __init__(self, position: int, path: Path, hw: tuple[int, int], prompts: BoxPrompts,
                 windows: list[WindowPrompts]) -> None:
        self.position = position
        self.path = path
        self.hw = hw
        self.prompts = prompts
        self.windows = windows
        self._lock = threading.Lock()
        self._image: np.ndarray | None = None
        self._crops_left = len(windows)

    def load(self, k: int) -> PromptedImage:
        """Window k: its crop uint8 [h, w, 3] and boxes [M, 4] (window pixels); key (position, k)."""
        with self._lock:
            if self._image is None:
                self._image = read_image(self.path, self.hw)
            crop = self.windows[k].window.crop(self._image)
            self._crops_left -= 1
            if self._crops_left == 0:
                self._image = None
        return PromptedImage(key=(self.position, k), image=crop, boxes=self.windows[k].boxes)


@dataclass
class DetectionsBuilder:
    """The rotated boxes of one image, gathered window by window (window order, then prompt
    order), and the number of empty masks dropped."""

    polygons: list[np.ndarray] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    classes: list[int] = field(default_factory=list)
    dropped: int = 0

    def add_window(self, masks: np.ndarray, ious: np.ndarray, prompts: BoxPrompts, window: WindowPrompts) -> None:
        """masks bool [M, h, w] and predicted IoUs [M] of the window's prompts (window.members of
        `prompts`) -> rotated boxes in full-image pixels; score = IoU for GT prompts, else the
        detector's."""
        for k, prompt in enumerate(window.members):
            corners = mask_to_rbox(masks[k])
            if corners is None:
                self.dropped += 1
                continue
            corners[0::2] += window.window.x0
            corners[1::2] += window.window.y0
            self.polygons.append(corners)
            self.scores.append(float(ious[k]) if prompts.scores is None else float(prompts.scores[prompt]))
            self.classes.append(int(prompts.classes[prompt]))

    def rotated_boxes(self) -> RotatedBoxes:
        """Everything added so far (before NMS)."""
        return RotatedBoxes(polygons=np.array(self.polygons, dtype=np.float64).reshape(-1, 8),
                            scores=np.array(self.scores, dtype=np.float64),
                            classes=np.array(self.classes, dtype=np.int64))


def nms_per_class(boxes: RotatedBoxes, iou_threshold: float = NMS_IOU) -> RotatedBoxes:
    """Polygon NMS within each class; output grouped by class, descending score within a class."""
    kept = []
    for class_index in range(len(DOTA_CLASSES)):
        members = np.nonzero(boxes.classes == class_index)[0]
        if members.size:
            kept.append(members[polygon_nms(boxes.polygons[members], boxes.scores[members], iou_threshold)])
    order = np.concatenate(kept) if kept else np.zeros((0,), dtype=np.int64)
    return RotatedBoxes(polygons=boxes.polygons[order], scores=boxes.scores[order],
                        classes=boxes.classes[order])


def task1_lines(image: str, boxes: RotatedBoxes) -> dict[str, list[str]]:
    """{class: Task1 lines `imgname score x1 y1 ... x4 y4`} with full-precision floats."""
    lines: dict[str, list[str]] = {}
    for polygon, score, class_index in zip(boxes.polygons, boxes.scores, boxes.classes):
        coords = " ".join(repr(float(v)) for v in polygon)
        lines.setdefault(DOTA_CLASSES[class_index], []).append(f"{image} {float(score)!r} {coords}")
    return lines


def write_task1(det_dir: Path, lines: Mapping[str, Sequence[str]]) -> None:
    """Write `Task1_<class>.txt` for all 15 classes (empty files for classes without lines)."""
    det_dir.mkdir(parents=True, exist_ok=True)
    for name in DOTA_CLASSES:
        text = "".join(f"{line}\n" for line in lines.get(name, ()))
        (det_dir / f"Task1_{name}.txt").write_text(text, encoding="utf-8")


def _prompt_folder(source: str | None, option: str) -> Path | None:
    """None or "gt" -> None (GT prompts); otherwise an existing folder of Task1 files (DataError
    naming the `option` that sets it)."""
    return prompt_source(source, "DOTA prompt folder", "folder",
                         f"set {option} to a folder of Task1_<class>.txt files, or 'gt'")


@TASKS.register("dota")
class DotaTask(Task):
    """DOTA-v1.0 Task 1 (oriented boxes) from SAM masks; see the module docstring (options: window,
    gap). `evaluate` predicts rotated boxes for the val images, writes Task1 files and scores them
    (percent)."""

    name = "dota"
    statistics_type = DotaImageStats
    options = OPTION_KEYS
    metric = "mAP"
    metrics = METRIC_KEYS

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self.check_options(config)
        self.window = self.int_option(config, "window", config.model_input_size, minimum=1)
        self.gap = self.int_option(config, "gap", round(self.window * GAP_PER_WINDOW), minimum=0)
        if self.gap >= self.window:
            raise ConfigError(f"dota windows need window > gap >= 0, got window={self.window}, gap={self.gap}")
        self.calib_split = config.calib_split or self._default_calib_split()
        self.prompt_dir = _prompt_folder(config.prompts, "--prompts")
        self.calib_prompt_dir = _prompt_folder(config.calib_prompts, "--calib-prompts")

    def _default_calib_split(self) -> str:
        """`train`, or `val` (with a warning) when the data root has no train split."""
        if (Path(self.config.data_root) / "DOTA" / CALIB_SPLIT).is_dir():
            return CALIB_SPLIT
        log.warning("DOTA: no %s split under %s; calibrating on the %s images instead (use --calib-split "
                    "to choose)", CALIB_SPLIT, Path(self.config.data_root) / "DOTA", EVAL_SPLIT)
        return EVAL_SPLIT

    def _items(self, split: str) -> list[SplitItem]:
        return list_split(dota_split_dir(self.config.data_root, split))

    def _prompt_source(self, prompt_dir: Path | None, items: Sequence[SplitItem]) -> dict[str, BoxPrompts] | None:
        """Detector prompts per image (None for GT prompts)."""
        if prompt_dir is None:
            return None
        return detection_prompts(read_task1_folder(prompt_dir, {item.name for item in items}))

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(f"dota window={self.window} gap={self.gap}\n".encode())
        splits = [(EVAL_SPLIT, self.prompt_dir), (self.calib_split, self.calib_prompt_dir)]
        for split, prompt_dir in splits:
            digest.update(f"split {split}\n".encode())
            try:
                items = self._items(split)
            except DataError:
                if split == EVAL_SPLIT:
                    raise
                digest.update(b"absent\n")
                continue
            for item in items:
                digest.update(f"{item.image_path.name} {item.image_path.stat().st_size}\n".encode())
                digest.update(item.label_path.read_bytes())
            digest.update(b"prompts gt\n" if prompt_dir is None else b"prompts\n")
            if prompt_dir is not None:
                for path in sorted(prompt_dir.glob("Task1_*.txt")):
                    digest.update(f"{path.name}\n".encode())
                    digest.update(path.read_bytes())
        return digest.hexdigest()[:16]

    def describe(self) -> str:
        prompts = "gt" if self.prompt_dir is None else str(self.prompt_dir)
        calib_prompts = "gt" if self.calib_prompt_dir is None else str(self.calib_prompt_dir)
        return (f"DOTA-v1.0 {EVAL_SPLIT} under {Path(self.config.data_root) / 'DOTA'}, prompts {prompts}, "
                f"windows {self.window}/gap {self.gap}, Task-1 mAP (DOTA_devkit); "
                f"calibration on {self.calib_split} with prompts {calib_prompts}")

    def _image_prompts(self, detector: dict[str, BoxPrompts] | None, item: SplitItem,
                       labels: DotaLabels | None, width: int, height: int) -> BoxPrompts:
        if detector is None:
            return gt_prompts(labels if labels is not None else read_dota_labels(item.label_path), width, height)
        return clip_prompts(detector.get(item.name, no_prompts()), width, height)

    def calibration_items(self, n: int, seed: int) -> list[CalibrationItem]:
        """The first `n` windows with prompts of the calibration split, its images in
        `calibration_order(seed)` (see the module docstring)."""
        if n <= 0:
            return []
        items = self._items(self.calib_split)
        detector = self._prompt_source(self.calib_prompt_dir, items)
        result: list[CalibrationItem] = []
        for item in calibration_order(items, seed):
            if len(result) >= n:
                break
            labels = read_dota_labels(item.label_path) if detector is None else None
            if (labels is not None and len(labels) == 0) or (detector is not None and item.name not in detector):
                continue
            image = read_image(item.image_path)
            height, width = image.shape[:2]
            prompts = self._image_prompts(detector, item, labels, width, height)
            for window in window_prompts(prompts.boxes, width, height, self.window, self.gap):
                result.append(CalibrationItem(image=window.window.crop(image), boxes=window.boxes))
                if len(result) >= n:
                    break
        if not result:
            raise DataError(f"no calibration window with box prompts in DOTA split {self.calib_split} "
                            f"under {Path(self.config.data_root) / 'DOTA'}")
        return result

    def eval_image_count(self, limit: int | None) -> int:
        return len(self._items(EVAL_SPLIT)[:limit])

    def check_eval_inputs(self) -> None:
        """Read the evaluation prompt folder (when given) as `predict` does; DataError for a
        malformed Task1 file."""
        self._prompt_source(self.prompt_dir, self._items(EVAL_SPLIT))

    def predict(self, predictor: Predictor, indices: Sequence[int], progress: bool = False
                ) -> list[DotaImageResult]:
        """Rotated boxes (after per-class NMS) of the val images at `indices` (positions in the
        name-sorted split), as Task1 lines; one `DotaImageResult` per index, in order. Every
        window with prompts is one image of `predictor.stream`."""
        all_items = self._items(EVAL_SPLIT)
        detector = self._prompt_source(self.prompt_dir, all_items)
        images = [self._windowed_image(position, all_items[index], detector)
                  for position, index in enumerate(indices)]
        loaders = [partial(image.load, k) for image in images for k in range(len(image.windows))]
        found = [DetectionsBuilder() for _ in images]
        stream = predictor.stream(loaders)
        bar = tqdm(stream, total=len(loaders), desc=phase("dota"), unit="window", disable=not progress)
        for item, masks, ious in bar:
            position, k = item.key
            found[position].add_window(masks, ious, images[position].prompts, images[position].windows[k])
        results = []
        for index, detections in zip(indices, found):
            name = all_items[index].name
            lines = task1_lines(name, nms_per_class(detections.rotated_boxes()))
            results.append(DotaImageResult(image=name, lines=lines, empty_masks=detections.dropped))
        return results

    def _windowed_image(self, position: int, item: SplitItem, detector: dict[str, BoxPrompts] | None
                        ) -> WindowedImage:
        """An evaluation image's prompts and windows; its size from the file's header (pixels are
        read by the stream's workers)."""
        height, width = image_size(item.image_path)
        labels = read_dota_labels(item.label_path) if detector is None else None
        prompts = self._image_prompts(detector, item, labels, width, height)
        windows = window_prompts(prompts.boxes, width, height, self.window, self.gap)
        return WindowedImage(position, item.image_path, (height, width), prompts, windows)

    def score(self, results: Sequence[DotaImageResult], limit: int | None, out_dir: Path) -> dict[str, float]:
        """Write `out_dir/dota_task1/Task1_<class>.txt` (lines in image order), the per-image
        statistics and the gallery drawings, and score them against the first `limit` val images (percent)."""
        items = self._items(EVAL_SPLIT)[:limit]
        check_result_count(self.name, results, len(items))
        if [result.image for result in results] != [item.name for item in items]:
            raise ValueError("dota: the per-image results are not in evaluation order")
        labels = read_split_labels(items)
        lines: dict[str, list[str]] = {}
        for result in results:
            for name, class_lines in result.lines.items():
                lines.setdefault(name, []).extend(class_lines)
        dropped = sum(result.empty_masks for result in results)
        if dropped:
            log.info("dota: %d empty masks gave no detection", dropped)
        det_dir = Path(out_dir) / TASK1_FOLDER
        write_task1(det_dir, lines)
        metrics, statistics = evaluate_task1_with_statistics(labels, read_task1_folder(det_dir, labels))
        save_statistics(statistics, Path(out_dir))
        for position, (result, item) in enumerate(zip(results[:GALLERY_IMAGES], items)):
            draw_detections(result, item.image_path, Path(out_dir), position)
        return metrics

