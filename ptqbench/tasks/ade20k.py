"""ADE20K semantic segmentation (SceneParsing, `ADEChallengeData2016`, 150 classes).

Layout below the data root: `ADEChallengeData2016/images/<split>/<stem>.jpg` and
`ADEChallengeData2016/annotations/<split>/<stem>.png` (uint8, 0 = other, 1..150); labels are
read with reduce_zero_label (training ids 0..149, 255 ignored). Evaluation split: `validation`
(option `split`); calibration split: `training`, else `config.calib_split`, else `validation`
with a logged warning.

Modes (TaskConfig option `mode`):

- `gt` (default, detector-free): every 8-connected component of every GT class with at least
  `MIN_COMPONENT_AREA` pixels gives one box prompt labelled with that class. The predicted
  masks are painted largest (predicted mask area) first, so smaller masks overwrite larger
  ones; pixels no mask covers stay 255 ("no prediction": they count against recall, never as a
  class). Every image with a prompt is one image of `Predictor.stream` (read ahead in threads,
  the model batched); an image without one is all 255, and SAM never sees it.
- `ssa` (the Semantic-Segment-Anything protocol): segment_anything's `SamAutomaticMaskGenerator`
  on the predictor's (quantized) model with SSA's settings (`SSA_SETTINGS`, 64 points per side
  unless option `points_per_side` says otherwise), then for each mask, largest first, every
  pixel of the mask gets the majority class of a user-supplied per-pixel semantic prior map
  (option `semantic_prior` = a folder of `<stem>.png`, uint8 training ids 0..149 and 255 =
  unknown, the same size as the image; default `ADEChallengeData2016/ptqbench_priors/<split>/`).
  Pixels no mask covers keep the prior's class. Votes count only prior pixels with a class;
  ties go to the smallest class id; a mask whose prior pixels are all 255 is skipped. SAM gets
  the image as RGB: SSA's own script fed BGR by accident (an OpenCV read passed on unconverted).
  The masks come from the predictor's `automatic_mask_generator`, image by image: a different
  protocol from the box prompts of `Predictor.stream` (a grid of point prompts per image and
  crop, with its own filtering), so it does not go through the stream.

Predictions are written to `<out_dir>/ade20k_pred/<stem>.png` (uint8 0..149, 255 = none) and
scored by `ade20k_metric.score_prediction_folder`, the code of `ptqbench evaluate ade20k`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from ptqbench.errors import ConfigError, DataError
from ptqbench.models.prediction import PromptedImage
from ptqbench.progress import phase
from ptqbench.tasks.ade20k_bootstrap import AdeImageStats, score_prediction_folder_with_statistics
from ptqbench.tasks.ade20k_metric import (
    IGNORE_INDEX,
    IMAGE_SUFFIXES,
    NUM_CLASSES,
    annotation_files,
    dataset_dir,
    read_annotation,
    read_label_png,
)
from ptqbench.tasks.base import TASKS, Task, TaskConfig, calibration_order, check_result_count, save_statistics
from ptqbench.tasks.gallery import GALLERY_IMAGES, palette, save_drawing
from ptqbench.tasks.images import image_size, read_image
from ptqbench.tasks.prompts import require_path
from ptqbench.types import CalibrationItem

if TYPE_CHECKING:
    from ptqbench.models.prediction import MaskGenerator, Predictor

log = logging.getLogger(__name__)

MIN_COMPONENT_AREA = 64
"""Smallest GT component (pixels) that becomes a box prompt."""

MAX_CALIB_BOXES = 16
"""At most this many box prompts per calibration image: the largest components."""

SSA_SETTINGS: dict[str, Any] = {
    "pred_iou_thresh": 0.86,
    "stability_score_thresh": 0.92,
    "crop_n_layers": 1,
    "crop_n_points_downscale_factor": 2,
    "min_mask_region_area": 100,
}
"""SamAutomaticMaskGenerator settings of the SSA protocol (besides points_per_side)."""

SSA_POINTS_PER_SIDE = 64
MODES = ("gt", "ssa")
OPTIONS = ("mode", "semantic_prior", "points_per_side", "points_per_batch", "split")
PRED_DIRNAME = "ade20k_pred"


@dataclass(frozen=True)
class AdeSample:
    """One image of a split: its stem, image path and annotation path."""

    stem: str
    image_path: Path
    annotation_path: Path


@dataclass(frozen=True)
class AdePrediction:
    """The prediction of one image: uint8 label map (0..149, 255 = none) as PNG file bytes."""

    stem: str
    png: bytes


def list_samples(data_root: Path, split: str) -> list[AdeSample]:
    """The samples of `split` in annotation-file order (sorted by name).

    Raises DataError when the split has no annotations or an annotation has no image.
    """
    root = dataset_dir(data_root)
    samples = []
    for annotation_path in annotation_files(data_root, split):
        stem = annotation_path.stem
        candidates = [root / "images" / split / f"{stem}{suffix}" for suffix in IMAGE_SUFFIXES]
        image_path = next((path for path in candidates if path.is_file()), None)
        if image_path is None:
            raise DataError(f"{annotation_path}: no image {candidates[0]} for this annotation")
        samples.append(AdeSample(stem, image_path, annotation_path))
    return samples


def read_sample(sample: AdeSample) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 RGB [H, W, 3], label uint8 [H, W] training ids, 255 ignored)."""
    image = read_image(sample.image_path)
    label = read_annotation(sample.annotation_path, expected_hw=image.shape[:2])
    return image, label


def component_boxes(label: np.ndarray, min_area: int = MIN_COMPONENT_AREA
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box prompts from the connected components of a label map.

    label: uint8 [H, W] training ids (255 ignored). Components are 8-connected, per class, in
    class order then OpenCV's component order; those under `min_area` pixels are dropped.
    Returns boxes float64 [N, 4] xyxy in pixel-edge coordinates (x0, y0, x1 + 1, y1 + 1, the
    COCO bbox convention), classes int64 [N], component areas int64 [N].
    """
    import cv2

    boxes, classes, areas = [], [], []
    for class_id in np.unique(label):
        if class_id >= NUM_CLASSES:
            continue
        count, _, stats, _ = cv2.connectedComponentsWithStats(
            (label == class_id).astype(np.uint8), connectivity=8)
        for x, y, w, h, area in stats[1:count]:
            if area >= min_area:
                boxes.append((x, y, x + w, y + h))
                classes.append(int(class_id))
                areas.append(int(area))
    return (np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
            np.asarray(classes, dtype=np.int64), np.asarray(areas, dtype=np.int64))


def paint_masks(masks: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Paint masks bool [N, H, W] with classes int [N]: largest mask first, smaller overwrite.

    Returns uint8 [H, W]; pixels no mask covers are 255. Equal areas keep prompt order.
    """
    canvas = np.full(masks.shape[1:], IGNORE_INDEX, dtype=np.uint8)
    order = np.argsort(-masks.reshape(len(masks), -1).sum(axis=1), kind="stable")
    for index in order:
        canvas[masks[index]] = classes[index]
    return canvas


def vote_with_prior(masks: list[np.ndarray], prior: np.ndarray) -> np.ndarray:
    """SSA's semantic voting.

    masks: bool [H, W] each; prior: uint8 [H, W] training ids (255 = unknown).
    Starting from the prior, each mask (largest first; equal areas keep list order) is painted
    with the majority prior class among its pixels; ties go to the smallest class id; masks
    with no classed prior pixel are skipped. Returns uint8 [H, W].
    """
    semantic = prior.copy()
    areas = np.asarray([int(mask.sum()) for mask in masks], dtype=np.int64)
    for index in np.argsort(-areas, kind="stable"):
        mask = masks[index]
        votes = np.bincount(prior[mask], minlength=256)[:NUM_CLASSES]
        if votes.any():
            semantic[mask] = int(np.argmax(votes))
    return semantic


def read_prior(path: Path, expected_hw: tuple[int, int]) -> np.ndarray:
    """Read a semantic prior PNG: uint8 [H, W] training ids 0..149 or 255 (DataError otherwise)."""
    if not path.is_file():
        raise DataError(f"missing semantic prior map {path} (option semantic_prior=DIR with "
                        f"one <stem>.png per image)")
    prior = read_label_png(path, expected_hw=expected_hw)
    bad = (prior >= NUM_CLASSES) & (prior != IGNORE_INDEX)
    if bad.any():
        raise DataError(f"{path}: prior value {int(prior[bad].max())} is not a training id "
                        f"0..{NUM_CLASSES - 1} or {IGNORE_INDEX}")
    return prior


@TASKS.register("ade20k")
class Ade20kTask(Task):
    """ADE20K semantic segmentation with SAM; see the module docstring for the protocol (options:
    mode, semantic_prior, points_per_side, points_per_batch, split). `evaluate` writes
    `<out_dir>/ade20k_pred/<stem>.png` and returns {"mIoU", "aAcc", "mAcc"} in percent."""

    name = "ade20k"
    statistics_type = AdeImageStats
    options = OPTIONS
    metric = "mIoU"
    metrics = ("mIoU", "aAcc", "mAcc")

    def __init__(self, config: TaskConfig) -> None:
        self.check_options(config)
        for field_name in ("prompts", "calib_prompts"):
            value = getattr(config, field_name)
            if value is not None and value.lower() != "gt":
                raise ConfigError(f"ade20k takes no {field_name} file ({value!r}): its prompts "
                                  f"are GT components (mode gt) or automatic masks (mode ssa)")
        self.config = config
        self.mode = (config.option("mode") or "gt").lower()
        if self.mode not in MODES:
            raise ConfigError(f"ade20k option mode={self.mode!r}: expected one of {MODES}")
        self.split = config.option("split") or "validation"
        self.points_per_side = self.int_option(config, "points_per_side", SSA_POINTS_PER_SIDE, minimum=1)
        self.points_per_batch = self.int_option(config, "points_per_batch", None, minimum=1)

    @cached_property
    def root(self) -> Path:
        """The `ADEChallengeData2016` folder (DataError if absent)."""
        return dataset_dir(self.config.data_root)

    @cached_property
    def samples(self) -> list[AdeSample]:
        """The evaluation samples, sorted by name."""
        return list_samples(self.config.data_root, self.split)

    @cached_property
    def calib_split(self) -> str:
        """`config.calib_split` if set, else `training` if present, else `validation`."""
        if self.config.calib_split is not None:
            return self.config.calib_split
        if any((self.root / "annotations" / "training").glob("*.png")):
            return "training"
        log.warning("ADE20K: no training split under %s; calibrating on the validation split",
                    self.root)
        return "validation"

    @property
    def prior_dir(self) -> Path:
        """The folder of semantic prior maps used in ssa mode."""
        option = self.config.option("semantic_prior")
        return Path(option) if option else self.root / "ptqbench_priors" / self.split

    def describe(self) -> str:
        text = f"ADE20K {self.split} ({len(self.samples)} images) at {self.root}, "
        if self.mode == "gt":
            return text + f"gt mode: a box per GT component >= {MIN_COMPONENT_AREA} px"
        return text + (f"ssa mode: automatic masks ({self.points_per_side} points/side) voted "
                       f"with semantic priors from {self.prior_dir}")

    def fingerprint(self) -> str:
        """sha256 (16 hex) of the mode, the evaluation annotations (contents), the image names and
        sizes, the calibration split's file names and sizes, and the prior maps in ssa mode."""
        digest = hashlib.sha256()
        digest.update(f"ade20k mode={self.mode} split={self.split}".encode())
        if self.mode == "ssa":
            digest.update(f" points_per_side={self.points_per_side}".encode())
        for sample in self.samples:
            digest.update(f"\n{sample.image_path.name} {sample.image_path.stat().st_size}".encode())
            digest.update(sample.annotation_path.read_bytes())
            if self.mode == "ssa":
                prior_path = self.prior_dir / f"{sample.stem}.png"
                if not prior_path.is_file():
                    raise DataError(f"missing semantic prior map {prior_path}")
                digest.update(prior_path.read_bytes())
        digest.update(f"\ncalibration {self.calib_split}".encode())
        for sample in list_samples(self.config.data_root, self.calib_split):
            for path in (sample.image_path, sample.annotation_path):
                digest.update(f"\n{path.name} {path.stat().st_size}".encode())
        return digest.hexdigest()[:16]

    def calibration_items(self, n: int, seed: int) -> list[CalibrationItem]:
        """The first `n` calibration images that have a GT component, in `calibration_order(seed)`
        of the images sorted by name (seed 0: that order).

        Boxes: the components of `component_boxes`, at most `MAX_CALIB_BOXES` per image, the
        largest (component area) first. Images without a component are skipped; fewer than `n`
        such images: all of them.
        """
        items: list[CalibrationItem] = []
        for sample in calibration_order(list_samples(self.config.data_root, self.calib_split), seed):
            if len(items) == n:
                break
            image, label = read_sample(sample)
            boxes, _, areas = component_boxes(label)
            if len(boxes) == 0:
                log.info("ADE20K calibration: %s has no component, skipped", sample.stem)
                continue
            order = np.argsort(-areas, kind="stable")[:MAX_CALIB_BOXES]
            items.append(CalibrationItem(image=image, boxes=boxes[order]))
        if not items:
            raise DataError(f"no ADE20K calibration image with a GT component in split "
                            f"{self.calib_split!r} under {self.root}")
        return items

    def eval_image_count(self, limit: int | None) -> int:
        return len(self.samples[:limit])

    def check_eval_inputs(self) -> None:
        """ssa mode: the semantic prior folder holds a map for every evaluation image (DataError
        otherwise); gt mode reads nothing besides the split."""
        if self.mode == "ssa":
            self._check_priors()

    def _check_priors(self) -> None:
        """DataError unless `prior_dir` exists and holds `<stem>.png` for every evaluation image."""
        require_path(self.prior_dir, "semantic prior folder", "folder",
                     "set the ade20k option semantic_prior=DIR (--task-option semantic_prior=DIR): "
                     "one <stem>.png per image")
        for sample in self.samples:
            path = self.prior_dir / f"{sample.stem}.png"
            if not path.is_file():
                raise DataError(f"missing semantic prior map {path} (the folder {self.prior_dir} "
                                f"needs one <stem>.png per image)")

    def predict(self, predictor: Predictor, indices: Sequence[int], progress: bool = False
                ) -> list[AdePrediction]:
        """The predicted label maps of the evaluation images at `indices` (positions in the
        name-sorted split), PNG-encoded; one `AdePrediction` per index, in order."""
        start = time.perf_counter()
        if self.mode == "gt":
            results = self._predict_gt(predictor, indices, progress)
        else:
            results = self._predict_ssa(predictor, indices, progress)
        log.info("ADE20K %s mode: %d images in %.1f s", self.mode, len(results), time.perf_counter() - start)
        return results

    def score(self, results: Sequence[AdePrediction], limit: int | None, out_dir: Path) -> dict[str, float]:
        """Write `<out_dir>/ade20k_pred/<stem>.png`, the per-image statistics and the gallery
        drawings (classes in their colours), and score the first `limit` images (sorted by name).
        Returns {"mIoU", "aAcc", "mAcc"} in percent."""
        samples = self.samples if limit is None else self.samples[:limit]
        check_result_count(self.name, results, len(samples))
        if [result.stem for result in results] != [sample.stem for sample in samples]:
            raise ValueError("ade20k: the per-image results are not in evaluation order")
        pred_dir = Path(out_dir) / PRED_DIRNAME
        pred_dir.mkdir(parents=True, exist_ok=True)
        for result in results:
            (pred_dir / f"{result.stem}.png").write_bytes(result.png)
        metrics, statistics = score_prediction_folder_with_statistics(pred_dir, self.config.data_root, self.split,
                                                                      limit=len(samples))
        save_statistics(statistics, Path(out_dir))
        for position, (result, sample) in enumerate(zip(results[:GALLERY_IMAGES], samples)):
            classes = read_label_png(pred_dir / f"{result.stem}.png").astype(np.int32)
            classes[classes == IGNORE_INDEX] = -1
            save_drawing(read_image(sample.image_path), classes, palette(NUM_CLASSES), Path(out_dir), position)
        return metrics

    def _predict_gt(self, predictor: Predictor, indices: Sequence[int], progress: bool) -> list[AdePrediction]:
        """gt mode: the GT components' boxes of each image (its annotation read here, checked
        against the image's size from the file's header), the images with boxes through
        `predictor.stream`, the masks painted."""
        results: list[AdePrediction | None] = [None] * len(indices)
        loaders = []
        for position, index in enumerate(indices):
            sample = self.samples[index]
            label = read_annotation(sample.annotation_path, expected_hw=image_size(sample.image_path))
            boxes, classes, _ = component_boxes(label)
            if len(boxes) == 0:
                results[position] = encode_prediction(sample.stem, np.full(label.shape, IGNORE_INDEX, dtype=np.uint8))
            else:
                loaders.append(partial(_prompted_sample, sample, label.shape, boxes, classes, position))
        stream = predictor.stream(loaders)
        for item, masks, _ in tqdm(stream, total=len(loaders), desc=phase("ade20k gt"), disable=not progress):
            results[item.key] = encode_prediction(self.samples[indices[item.key]].stem, paint_masks(masks, item.extra))
        return results

    def _predict_ssa(self, predictor: Predictor, indices: Sequence[int], progress: bool) -> list[AdePrediction]:
        """ssa mode: automatic masks of each image, voted with its semantic prior."""
        generator = self._mask_generator(predictor)
        results = []
        for index in tqdm(indices, desc=phase("ade20k ssa"), disable=not progress):
            sample = self.samples[index]
            image, _ = read_sample(sample)
            prior = read_prior(self.prior_dir / f"{sample.stem}.png", image.shape[:2])
            results.append(encode_prediction(sample.stem, vote_with_prior(generator.masks(image), prior)))
        return results

    def _mask_generator(self, predictor: Predictor) -> MaskGenerator:
        """The predictor's automatic mask generator with SSA settings."""
        self._check_priors()
        points_per_batch = self.points_per_batch
        if points_per_batch is None:
            points_per_batch = 256 if predictor.device.type == "cuda" else 64
        return predictor.automatic_mask_generator(self.points_per_side, points_per_batch, SSA_SETTINGS)


def encode_prediction(stem: str, prediction: np.ndarray) -> AdePrediction:
    """A label map uint8 [H, W] as the PNG bytes of `AdePrediction`."""
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(prediction).save(png, format="PNG")
    return AdePrediction(stem=stem, png=png.getvalue())


def _prompted_sample(sample: AdeSample, hw: tuple[int, int], boxes: np.ndarray, classes: np.ndarray,
                     position: int) -> PromptedImage:
    """A gt-mode image to segment (read in a stream worker): its component boxes [N, 4], classes
    [N] as `extra`, key its position among the predicted images."""
    return PromptedImage(key=position, image=read_image(sample.image_path, hw), boxes=boxes, extra=classes)
