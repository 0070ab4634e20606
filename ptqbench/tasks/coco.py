"""COCO instance segmentation with box prompts, scored by pycocotools.

Layout below the data root (the official COCO 2017 one):
    coco/annotations/instances_{val2017,train2017}.json
    coco/{val2017,train2017}/*.jpg
Evaluation split val2017; calibration split train2017 (`TaskConfig.calib_split` overrides it).

Prompts: `gt` (TaskConfig.prompts None) uses the box of every non-crowd annotation with its
category, score = SAM's predicted IoU; an image without such a box gets no prompt and no
results entry. A COCO results-format detection file uses every box it has for an image, score =
detector score x SAM's predicted IoU (ground-truth prompts are the same formula with a detector
score of 1.0); an image the file gives no box gets the reference's placeholder prompt instead
(`prompts.no_detection_prompt`: box [0, 0, 0, 0], detector score 0.1, the annotation file's first
category), in evaluation and in calibration alike. The reference has no ground-truth-prompt mode
(its detector wrapper makes the placeholder), so `gt` prompts get no placeholder: an image
without ground truth would only gain a false positive.

Images are decoded with OpenCV and converted BGR -> RGB, as the reference does (`images.read_image`).

Image order: evaluation walks the split's images sorted by image id (the detectron2 order), and
`limit` keeps the first N of that order; calibration takes the first images of the calibration
split in the annotation file's `images` order, skipping images that have no box prompt (with
detection prompts every image has one).

Metric: pycocotools `COCOeval(iouType="segm")` as mmdetection runs it (maxDets 100, 300, 1000;
see `coco_eval`), restricted (`params.imgIds`) to the evaluated images; all twelve stats x 100.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from ptqbench.errors import ConfigError, DataError
from ptqbench.models.prediction import PromptedImage
from ptqbench.progress import phase
from ptqbench.tasks.base import TASKS, Task, TaskConfig, calibration_order, check_result_count, save_statistics
from ptqbench.tasks.coco_bootstrap import CocoImageStats, score_results_with_statistics
from ptqbench.tasks.coco_eval import METRICS, mask_encoder, mask_results, score_results, stdout_into_log, write_results
from ptqbench.tasks.gallery import GALLERY_IMAGES, INSTANCE_COLOURS, masks_to_labels, palette, save_drawing
from ptqbench.tasks.images import read_image
from ptqbench.tasks.prompts import (
    Detections,
    as_id,
    is_number,
    load_json_file,
    no_detection_prompt,
    prompt_source,
    read_coco_detections,
    xywh_to_xyxy,
)
from ptqbench.types import CalibrationItem

if TYPE_CHECKING:
    from pycocotools.coco import COCO

    from ptqbench.models.prediction import Predictor

log = logging.getLogger(__name__)

EVAL_SPLIT = "val2017"
CALIB_SPLIT = "train2017"
RESULTS_FILE = "coco_segm_results.json"
# The revision of the protocol, hashed into `CocoTask.fingerprint` so that a resumed run does not
# reuse cells scored under an earlier one. 2: mmdetection's maxDets and twelve metrics, the
# placeholder prompt for images without a detection, OpenCV decoding.
PROTOCOL = "2"
LAYOUT = ("expected the COCO 2017 layout <data_root>/coco/annotations/instances_<split>.json "
          "and <data_root>/coco/<split>/*.jpg")


def annotation_path(data_root: Path, split: str) -> Path:
    """<data_root>/coco/annotations/instances_<split>.json"""
    return Path(data_root) / "coco" / "annotations" / f"instances_{split}.json"


def image_dir(data_root: Path, split: str) -> Path:
    """<data_root>/coco/<split>"""
    return Path(data_root) / "coco" / split


def require_annotation_file(data_root: Path, split: str) -> Path:
    """The split's annotation file; DataError (with the expected layout) when it is missing."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise DataError(f"data root {data_root} does not exist; {LAYOUT}")
    path = annotation_path(data_root, split)
    if not path.is_file():
        raise DataError(f"COCO annotation file {path} does not exist; {LAYOUT}")
    return path


def _require_keys(entries: Any, keys: Sequence[str], path: Path, what: str) -> None:
    if not isinstance(entries, list):
        raise DataError(f"COCO annotation file {path}: '{what}' is not a list")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"COCO annotation file {path}: {what}[{index}] is not an object")
        missing = [key for key in keys if key not in entry]
        if missing:
            raise DataError(f"COCO annotation file {path}: {what}[{index}] lacks {', '.join(missing)}")


def load_coco(path: Path) -> COCO:
    """Parse and check a COCO instances file; returns an indexed pycocotools COCO object."""
    from pycocotools.coco import COCO

    dataset = load_json_file(path, "COCO annotation file")
    if not isinstance(dataset, dict):
        raise DataError(f"COCO annotation file {path}: expected a JSON object with images, "
                        f"annotations and categories")
    for what in ("images", "annotations", "categories"):
        if what not in dataset:
            raise DataError(f"COCO annotation file {path} has no '{what}' list")
    _require_keys(dataset["images"], ("id", "file_name", "height", "width"), path, "images")
    _require_keys(dataset["annotations"], ("id", "image_id", "category_id", "bbox", "segmentation", "area"),
                  path, "annotations")
    _require_keys(dataset["categories"], ("id",), path, "categories")
    if not dataset["categories"]:
        raise DataError(f"COCO annotation file {path} has an empty 'categories' list")
    coco = COCO()
    coco.dataset = dataset
    with stdout_into_log():
        coco.createIndex()
    return coco


@dataclass
class CocoSplit:
    """One split: its indexed annotation file and its image folder.

    `image_ids` lists the images in the annotation file's `images` order.
    """

    name: str
    annotation_file: Path
    image_dir: Path
    coco: COCO

    @property
    def image_ids(self) -> list[int]:
        return [image["id"] for image in self.coco.dataset["images"]]

    @property
    def category_ids(self) -> list[int]:
        return [category["id"] for category in self.coco.dataset["categories"]]

    def gt_prompts(self, image_id: int) -> Detections:
        """The boxes of the image's non-crowd annotations (file order), with score 1.0."""
        annotations = [ann for ann in self.coco.imgToAnns[image_id] if not ann.get("iscrowd", 0)]
        return Detections(boxes=xywh_to_xyxy(np.array([ann["bbox"] for ann in annotations], dtype=np.float64)),
                          category_ids=np.array([ann["category_id"] for ann in annotations], dtype=np.int64),
                          scores=np.ones(len(annotations), dtype=np.float64))

    def read_image(self, image_id: int) -> np.ndarray:
        """The image as uint8 RGB [H, W, 3]; DataError if missing, unreadable or of the wrong size."""
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise DataError(f"image {path} (listed in {self.annotation_file}) does not exist; {LAYOUT}")
        return read_image(path, (info["height"], info["width"]), size_from=str(self.annotation_file))


def load_split(data_root: Path, split: str) -> CocoSplit:
    """Read `coco/annotations/instances_<split>.json` below `data_root`."""
    path = require_annotation_file(data_root, split)
    return CocoSplit(name=split, annotation_file=path, image_dir=image_dir(data_root, split), coco=load_coco(path))


def evaluation_image_ids(split: CocoSplit, limit: int | None) -> list[int]:
    """The split's image ids sorted by id; the first `limit` of them when given (limit >= 1)."""
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of images, got {limit}")
    return sorted(split.image_ids)[:limit]


def _check_results(entries: Any, path: Path, split: CocoSplit) -> list[dict[str, Any]]:
    """Validate a COCO segm results list against the split; drop `bbox` keys (with a warning)."""
    if not isinstance(entries, list):
        raise DataError(f"results file {path}: expected a JSON list of segmentation results")
    known_categories = set(split.category_ids)
    checked = []
    dropped_boxes = 0
    for index, entry in enumerate(entries):
        where = f"results file {path}, entry {index}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
        missing = [key for key in ("image_id", "category_id", "segmentation", "score") if key not in entry]
        if missing:
            raise DataError(f"{where}: missing key(s) {', '.join(missing)}")
        image_id = as_id(entry["image_id"])
        if image_id is None or image_id not in split.coco.imgs:
            raise DataError(f"{where}: unknown image_id {entry['image_id']!r} (not in {split.annotation_file})")
        category_id = as_id(entry["category_id"])
        if category_id is None or category_id not in known_categories:
            raise DataError(f"{where}: unknown category_id {entry['category_id']!r}")
        if not is_number(entry["score"]):
            raise DataError(f"{where}: score {entry['score']!r} is not a finite number")
        segmentation = entry["segmentation"]
        if not (isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str)
                and isinstance(segmentation.get("size"), list)):
            raise DataError(f"{where}: segmentation must be a compressed RLE {{size: [h, w], counts: str}}")
        info = split.coco.imgs[image_id]
        if segmentation["size"] != [info["height"], info["width"]]:
            raise DataError(f"{where}: RLE size {segmentation['size']} differs from the image's "
                            f"[{info['height']}, {info['width']}]")
        if "bbox" in entry:
            dropped_boxes += 1
        kept = {key: value for key, value in entry.items() if key != "bbox"}
        kept.update(image_id=image_id, category_id=category_id)
        checked.append(kept)
    if dropped_boxes:
        log.warning("%s: dropped the 'bbox' key of %d entries; with it pycocotools would take each mask's "
                    "area from its box and change APs/APm/APl", path, dropped_boxes)
    return checked


def score_results_file(results_json: Path, data_root: Path, split: str = EVAL_SPLIT, *,
                       limit: int | None = None) -> dict[str, float]:
    """Score an existing COCO segm results file exactly as `CocoTask.evaluate` does.

    Evaluates on the split's images sorted by id (the first `limit` of them when given, to
    re-score a run made with a limit). Returns the METRICS keys. Raises DataError for a missing
    or malformed file, unknown image/category ids and RLE sizes that do not match the image.
    """
    coco_split = load_split(data_root, split)
    results = _check_results(load_json_file(Path(results_json), "results file"), Path(results_json), coco_split)
    return score_results(coco_split.coco, results, evaluation_image_ids(coco_split, limit))


def _hash_file(digest: Any, path: Path) -> None:
    """Feed a file's bytes into a hashlib digest."""
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


@dataclass
class CocoImageResult:
    """The predictions of one evaluation image: its COCO segm results entries (`mask_results`)."""

    image_id: int
    entries: list[dict[str, Any]]


@TASKS.register("coco")
class CocoTask(Task):
    """The `coco` task (see the module docstring for the protocol). `evaluate` segments every
    prompt box, writes `out_dir/coco_segm_results.json` and returns the METRICS (percentages)."""

    name = "coco"
    statistics_type = CocoImageStats
    metric = "mask_AP"
    metrics = METRICS

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self.data_root = Path(config.data_root)
        self.eval_split = EVAL_SPLIT
        self.calib_split = config.calib_split or CALIB_SPLIT
        self.prompts = _detection_file(config.prompts, "prompts", "--prompts")
        self.calib_prompts = _detection_file(config.calib_prompts, "calibration prompts", "--calib-prompts")
        require_annotation_file(self.data_root, self.eval_split)
        if not image_dir(self.data_root, self.eval_split).is_dir():
            raise DataError(f"COCO image folder {image_dir(self.data_root, self.eval_split)} does not exist; {LAYOUT}")
        self._splits: dict[str, CocoSplit] = {}
        self._fingerprint: str | None = None

    def _split(self, split: str) -> CocoSplit:
        if split not in self._splits:
            self._splits[split] = load_split(self.data_root, split)
        return self._splits[split]

    def _prompt_lookup(self, split: CocoSplit, path: Path | None) -> Callable[[int], Detections]:
        """image id -> its box prompts for `path`: None gives the GT boxes (empty for an image
        without a non-crowd annotation); a detection file gives its boxes, or the placeholder
        prompt (`no_detection_prompt`) for an image it has none for."""
        if path is None:
            return split.gt_prompts
        detections = read_coco_detections(path, split.coco.imgs.keys(), split.category_ids)
        without = len(split.coco.imgs) - len(detections)
        if without:
            log.info("%s has no box for %d of the %d images of %s: each gets the placeholder box "
                     "[0, 0, 0, 0] with detector score 0.1", path, without, len(split.coco.imgs), split.name)
        return partial(_detections_or_placeholder, detections, split.category_ids[0])

    def fingerprint(self) -> str:
        """sha256 (first 16 hex) of the PROTOCOL revision, both splits' annotation files, image
        names + byte sizes, and the prompt files. A calibration split that is not on disk hashes
        as absent."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            digest.update(f"protocol {PROTOCOL}\n".encode())
            for role, split in (("eval", self.eval_split), ("calib", self.calib_split)):
                digest.update(f"{role} split {split}\n".encode())
                annotations = annotation_path(self.data_root, split)
                if annotations.is_file():
                    _hash_file(digest, annotations)
                else:
                    digest.update(b"no annotation file\n")
                folder = image_dir(self.data_root, split)
                if folder.is_dir():
                    with os.scandir(folder) as entries:
                        files = sorted((entry.name, entry.stat().st_size) for entry in entries if entry.is_file())
                    for name, size in files:
                        digest.update(f"{name}\t{size}\n".encode())
            for role, path in (("prompts", self.prompts), ("calib_prompts", self.calib_prompts)):
                digest.update(f"{role}\n".encode())
                if path is None:
                    digest.update(b"gt\n")
                else:
                    _hash_file(digest, path)
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def describe(self) -> str:
        prompts = "GT boxes" if self.prompts is None else f"detections {self.prompts}"
        calib = "GT boxes" if self.calib_prompts is None else f"detections {self.calib_prompts}"
        return (f"COCO {self.eval_split} mask AP (pycocotools segm) with {prompts}; calibration on "
                f"{self.calib_split} with {calib}; data {self.data_root / 'coco'}")

    def calibration_items(self, n: int, seed: int) -> list[CalibrationItem]:
        """The first `n` images of the calibration split in `calibration_order(seed)` of the
        annotation file order (seed 0: that order) that have at least one box prompt, with those
        boxes (xyxy pixels). Images without boxes (only possible with GT prompts) are skipped.
        Fewer than `n` available: all of them; none at all: DataError."""
        split = self._split(self.calib_split)
        lookup = self._prompt_lookup(split, self.calib_prompts)
        items: list[CalibrationItem] = []
        for image_id in calibration_order(split.image_ids, seed):
            if len(items) >= n:
                break
            detections = lookup(image_id)
            if len(detections) == 0:
                continue
            items.append(CalibrationItem(image=split.read_image(image_id), boxes=detections.boxes.copy()))
        if n > 0 and not items:
            raise DataError(f"no image of {split.annotation_file} has a box prompt for calibration")
        return items

    def eval_image_count(self, limit: int | None) -> int:
        return len(evaluation_image_ids(self._split(self.eval_split), limit))

    def check_eval_inputs(self) -> None:
        """Read and check the evaluation detection file (when given) against the val2017
        annotation file, as `predict` does; DataError for a malformed one."""
        self._prompt_lookup(self._split(self.eval_split), self.prompts)

    def predict(self, predictor: Predictor, indices: Sequence[int], progress: bool = False
                ) -> list[CocoImageResult]:
        """Segment every prompt box of the evaluation images at `indices` (positions in the
        id-sorted split); one `CocoImageResult` per index, in order (no entries for an image
        without prompts). Images are read and resized ahead in threads (`predictor.stream`) and
        masks RLE-encoded by `mask_encoder` (worker processes on a GPU) while the model runs."""
        split = self._split(self.eval_split)
        lookup = self._prompt_lookup(split, self.prompts)
        image_ids = evaluation_image_ids(split, None)
        results = [CocoImageResult(image_id=image_ids[index], entries=[]) for index in indices]
        loaders = []
        for position, result in enumerate(results):
            detections = lookup(result.image_id)
            if len(detections) > 0:
                loaders.append(partial(_prompted_image, split, result.image_id, detections, position))
        encoder = mask_encoder(in_processes=predictor.device.type == "cuda")
        pending = {}
        stream = predictor.stream(loaders)
        for item, masks, iou_pred in tqdm(stream, total=len(loaders), desc=phase(f"coco {split.name}"), unit="img",
                                          disable=not progress):
            detections = item.extra
            scores = detections.scores * np.asarray(iou_pred, dtype=np.float64)
            pending[item.key] = encoder.submit(mask_results, results[item.key].image_id, masks,
                                               detections.category_ids, scores)
        for position, future in pending.items():
            results[position].entries.extend(future.result())
        return results

    def score(self, results: Sequence[CocoImageResult], limit: int | None, out_dir: Path) -> dict[str, float]:
        """Write `out_dir/coco_segm_results.json` (every entry, in image order), the per-image
        statistics and the gallery drawings (each prompt's mask in its colour), and return the
        METRICS (percentages) over the first `limit` images by id."""
        split = self._split(self.eval_split)
        image_ids = evaluation_image_ids(split, limit)
        check_result_count(self.name, results, len(image_ids))
        if [result.image_id for result in results] != image_ids:
            raise ValueError("coco: the per-image results are not in evaluation order")
        entries = [entry for result in results for entry in result.entries]
        write_results(entries, Path(out_dir) / RESULTS_FILE)
        metrics, statistics = score_results_with_statistics(split.coco, entries, image_ids)
        save_statistics(statistics, Path(out_dir))
        from pycocotools import mask as mask_utils

        for position, result in enumerate(results[:GALLERY_IMAGES]):
            image = split.read_image(result.image_id)
            masks = [mask_utils.decode(entry["segmentation"]).astype(bool) for entry in result.entries]
            save_drawing(image, masks_to_labels(masks, image.shape[:2]), palette(INSTANCE_COLOURS), Path(out_dir),
                         position)
        log.info("coco %s: %d images, %d masks, mask AP %.2f", split.name, len(image_ids), len(entries),
                 metrics["mask_AP"])
        return metrics


def _detection_file(source: str | None, what: str, option: str) -> Path | None:
    """None or "gt" -> None (ground-truth boxes); otherwise an existing detection file (DataError
    naming `what` and the `option` that sets it)."""
    return prompt_source(source, f"{what} file", "file",
                         f"the coco task expects a COCO results-format detection JSON "
                         f"[{{image_id, category_id, bbox, score}}] (set {option}, or 'gt')")


def _detections_or_placeholder(detections: dict[int, Detections], category_id: int, image_id: int) -> Detections:
    """The image's detections, or the placeholder prompt (in category `category_id`) without any."""
    found = detections.get(image_id)
    return found if found is not None else no_detection_prompt(category_id)


def _prompted_image(split: CocoSplit, image_id: int, detections: Detections, position: int) -> PromptedImage:
    return PromptedImage(key=position, image=split.read_image(image_id), boxes=detections.boxes, extra=detections)
