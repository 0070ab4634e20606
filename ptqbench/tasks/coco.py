"""COCO instance segmentation with box prompts, scored by pycocotools (tasks.md section 1).

Layout below the data root (the official COCO 2017 one):
    coco/annotations/instances_{val2017,train2017}.json
    coco/{val2017,train2017}/*.jpg
Evaluation split val2017; calibration split train2017 (`TaskConfig.calib_split` overrides it).

Prompts: `gt` (TaskConfig.prompts None) uses the box of every non-crowd annotation with its
category, score = SAM's predicted IoU. A COCO results-format detection file uses every box it
has for an image, score = detector score x SAM's predicted IoU (ground-truth prompts are the
same formula with a detector score of 1.0).

Image order: evaluation walks the split's images sorted by image id (the detectron2 order), and
`limit` keeps the first N of that order; calibration takes the first images of the calibration
split in the annotation file's `images` order, skipping images that have no box prompt.

Metric: pycocotools `COCOeval(iouType="segm")` restricted (`params.imgIds`) to the evaluated
images; stats[0..5] x 100 reported as mask_AP, AP50, AP75, APs, APm, APl. pycocotools writes -1
for a size range without ground truth among the evaluated images (possible with a small
`limit`); that value is reported as NaN rather than -100. An empty results list (pycocotools'
`loadRes` cannot take one) scores 0 on every metric. Results entries carry no `bbox` key: with
one, `loadRes` takes each detection's area from the box instead of the mask, which moves
detections between the small/medium/large ranges and changes APs/APm/APl.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from ptqbench.errors import ConfigError, DataError
from ptqbench.sam.inference import PromptedImage, predict_stream
from ptqbench.tasks.base import TASKS, CalibrationItem, TaskConfig, check_result_count, read_rgb_image
from ptqbench.tasks.prompts import (Detections, as_id, is_number, load_json_file, read_coco_detections,
                                    xywh_to_xyxy)

if TYPE_CHECKING:
    from pycocotools.coco import COCO

    from ptqbench.sam.inference import BoxPredictor

log = logging.getLogger(__name__)

EVAL_SPLIT = "val2017"
CALIB_SPLIT = "train2017"
METRICS = ("mask_AP", "AP50", "AP75", "APs", "APm", "APl")
RESULTS_FILE = "coco_segm_results.json"
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


@contextlib.contextmanager
def stdout_into_log(level: int = logging.DEBUG) -> Iterator[None]:
    """Capture what pycocotools prints and send it to this module's log instead."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        text = buffer.getvalue().strip()
        if text:
            log.log(level, "pycocotools:\n%s", text)


def _require_keys(entries: Any, keys: Sequence[str], path: Path, what: str) -> None:
    if not isinstance(entries, list):
        raise DataError(f"COCO annotation file {path}: '{what}' is not a list")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"COCO annotation file {path}: {what}[{index}] is not an object")
        missing = [key for key in keys if key not in entry]
        if missing:
            raise DataError(f"COCO annotation file {path}: {what}[{index}] lacks {', '.join(missing)}")


def load_coco(path: Path) -> "COCO":
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
    coco: "COCO"

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
        rgb = read_rgb_image(path)
        if rgb.shape[:2] != (info["height"], info["width"]):
            raise DataError(f"image {path} is {rgb.shape[1]}x{rgb.shape[0]} but {self.annotation_file} "
                            f"says {info['width']}x{info['height']}")
        return rgb


def load_split(data_root: Path, split: str) -> CocoSplit:
    """Read `coco/annotations/instances_<split>.json` below `data_root`."""
    path = require_annotation_file(data_root, split)
    return CocoSplit(name=split, annotation_file=path, image_dir=image_dir(data_root, split), coco=load_coco(path))


def mask_results(image_id: int, masks: np.ndarray, category_ids: np.ndarray,
                 scores: np.ndarray) -> list[dict[str, Any]]:
    """COCO segm results entries for one image.

    masks: bool [N, H, W] at the image's original size; category_ids: int [N]; scores: float [N].
    Each entry is {image_id, category_id, segmentation: compressed RLE with str counts, score};
    deliberately without `bbox` (see the module docstring).
    """
    from pycocotools import mask as mask_utils

    if not len(masks) == len(category_ids) == len(scores):
        raise ValueError(f"{len(masks)} masks, {len(category_ids)} categories and {len(scores)} scores")
    entries = []
    for mask, category_id, score in zip(masks, category_ids, scores):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        entries.append({
            "image_id": int(image_id),
            "category_id": int(category_id),
            "segmentation": {"size": [int(side) for side in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "score": float(score),
        })
    return entries


_MASK_ENCODERS: dict[bool, Executor] = {}


def mask_encoder(in_processes: bool) -> Executor:
    """The pool that RLE-encodes masks (`mask_results`) while the model runs, one per process.

    pycocotools holds the GIL while it encodes (about 0.35 ms per 640x480 mask, up to 2 ms for a
    speckled one), which stalls a host thread that should be launching GPU work; so with
    `in_processes` (evaluation on a GPU) the masks go to worker processes (up to 4, half the
    cores), otherwise to two threads. The workers are forked, as PyTorch's DataLoader workers
    are, when the pool is made: they run numpy and pycocotools only, never CUDA, and unlike
    spawned workers they do not re-run the caller's script (which may lack a `__main__` guard).
    """
    if in_processes not in _MASK_ENCODERS:
        if in_processes:
            workers = min(4, max(1, (os.cpu_count() or 2) // 2))
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
            with warnings.catch_warnings():  # "this process is multi-threaded": CUDA's own threads
                warnings.simplefilter("ignore", DeprecationWarning)
                pool.submit(os.getpid).result()  # fork every worker now, before the loader threads start
            _MASK_ENCODERS[True] = pool
        else:
            _MASK_ENCODERS[False] = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rle")
    return _MASK_ENCODERS[in_processes]


def _percent(stat: float) -> float:
    """A COCOeval stat as a percentage; its -1 (no ground truth in that range) becomes NaN."""
    return float(stat * 100.0) if stat >= 0 else math.nan


def score_results(coco_gt: "COCO", results: list[dict[str, Any]], image_ids: Sequence[int]) -> dict[str, float]:
    """COCOeval(segm) of `results` against `coco_gt` on `image_ids`; returns the METRICS x 100."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        log.warning("no segmentation results: every COCO metric is 0")
        return {key: 0.0 for key in METRICS}
    with stdout_into_log():
        # loadRes writes area/bbox/id/iscrowd into the entries it gets: hand it copies.
        coco_dt = coco_gt.loadRes([dict(entry) for entry in results])
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
    with stdout_into_log(logging.INFO):
        evaluator.summarize()
    return {key: _percent(stat) for key, stat in zip(METRICS, evaluator.stats[:6])}


def write_results(results: list[dict[str, Any]], path: Path) -> None:
    """Write COCO segm results entries as one JSON list."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        json.dump(results, handle)


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


class CocoTask:
    """The `coco` task (see the module docstring for the protocol)."""

    name = "coco"
    metric = "mask_AP"
    metrics = METRICS

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self.data_root = Path(config.data_root)
        self.eval_split = EVAL_SPLIT
        self.calib_split = config.calib_split or CALIB_SPLIT
        self.prompts = self._prompt_path(config.prompts, "prompts")
        self.calib_prompts = self._prompt_path(config.calib_prompts, "calibration prompts")
        require_annotation_file(self.data_root, self.eval_split)
        if not image_dir(self.data_root, self.eval_split).is_dir():
            raise DataError(f"COCO image folder {image_dir(self.data_root, self.eval_split)} does not exist; {LAYOUT}")
        self._splits: dict[str, CocoSplit] = {}
        self._fingerprint: str | None = None

    @staticmethod
    def _prompt_path(source: str | None, what: str) -> Path | None:
        """None or "gt" -> None (ground-truth boxes); otherwise an existing detection file."""
        if source is None or source == "gt":
            return None
        path = Path(source)
        if not path.is_file():
            raise DataError(f"{what} file {path} does not exist; the coco task expects a COCO "
                            f"results-format detection JSON [{{image_id, category_id, bbox, score}}]")
        return path

    def _split(self, split: str) -> CocoSplit:
        if split not in self._splits:
            self._splits[split] = load_split(self.data_root, split)
        return self._splits[split]

    def _prompt_lookup(self, split: CocoSplit, path: Path | None) -> Callable[[int], Detections | None]:
        """image id -> its box prompts (None when it has none) for `path` (None: GT boxes)."""
        if path is None:
            return split.gt_prompts
        detections = read_coco_detections(path, split.coco.imgs.keys(), split.category_ids)
        return detections.get

    def fingerprint(self) -> str:
        """sha256 (first 16 hex) of both splits' annotation files, image names + byte sizes, and
        the prompt files. A calibration split that is not on disk hashes as absent."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
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
        """The first `n` images of the calibration split (annotation file order) that have at
        least one box prompt, with those boxes (xyxy pixels). Images without boxes are skipped.
        `seed` is unused: the set is the same for every seed. Fewer than `n` available: a warning
        and all of them; none at all: DataError."""
        split = self._split(self.calib_split)
        lookup = self._prompt_lookup(split, self.calib_prompts)
        items: list[CalibrationItem] = []
        for image_id in split.image_ids:
            if len(items) >= n:
                break
            detections = lookup(image_id)
            if detections is None or len(detections) == 0:
                continue
            items.append(CalibrationItem(image=split.read_image(image_id), boxes=detections.boxes.copy()))
        if n > 0 and not items:
            raise DataError(f"no image of {split.annotation_file} has a box prompt for calibration")
        if len(items) < n:
            log.warning("coco %s has only %d images with box prompts; calibrating on %d instead of %d",
                        split.name, len(items), len(items), n)
        return items

    def eval_image_count(self, limit: int | None) -> int:
        return len(evaluation_image_ids(self._split(self.eval_split), limit))

    def predict(self, predictor: "BoxPredictor", indices: Sequence[int], progress: bool = False
                ) -> list[CocoImageResult]:
        """Segment every prompt box of the evaluation images at `indices` (positions in the
        id-sorted split); one `CocoImageResult` per index, in order (no entries for an image
        without prompts). Images are read and resized ahead in threads (`predict_stream`) and
        masks RLE-encoded by `mask_encoder` (worker processes on a GPU) while the model runs."""
        split = self._split(self.eval_split)
        lookup = self._prompt_lookup(split, self.prompts)
        image_ids = evaluation_image_ids(split, None)
        results = [CocoImageResult(image_id=image_ids[index], entries=[]) for index in indices]
        loaders = []
        for position, result in enumerate(results):
            detections = lookup(result.image_id)
            if detections is not None and len(detections) > 0:
                loaders.append(partial(_prompted_image, split, result.image_id, detections, position))
        encoder = mask_encoder(in_processes=predictor.device.type == "cuda")
        pending = {}
        stream = predict_stream(predictor, loaders)
        for item, masks, iou_pred in tqdm(stream, total=len(loaders), desc=f"coco {split.name}", unit="img",
                                          disable=not progress):
            detections = item.extra
            scores = detections.scores * np.asarray(iou_pred, dtype=np.float64)
            pending[item.key] = encoder.submit(mask_results, results[item.key].image_id, masks,
                                               detections.category_ids, scores)
        for position, future in pending.items():
            results[position].entries.extend(future.result())
        return results

    def score(self, results: Sequence[CocoImageResult], limit: int | None, out_dir: Path) -> dict[str, float]:
        """Write `out_dir/coco_segm_results.json` (every entry, in image order) and return the
        METRICS (percentages) over the first `limit` images by id."""
        split = self._split(self.eval_split)
        image_ids = evaluation_image_ids(split, limit)
        check_result_count(self.name, results, len(image_ids))
        if [result.image_id for result in results] != image_ids:
            raise ValueError("coco: the per-image results are not in evaluation order")
        entries = [entry for result in results for entry in result.entries]
        write_results(entries, Path(out_dir) / RESULTS_FILE)
        metrics = score_results(split.coco, entries, image_ids)
        log.info("coco %s: %d images, %d masks, mask AP %.2f", split.name, len(image_ids), len(entries),
                 metrics["mask_AP"])
        return metrics

    def evaluate(self, predictor: "BoxPredictor", *, limit: int | None, progress: bool,
                 out_dir: Path) -> dict[str, float]:
        """Segment every prompt box of the evaluation images, write
        `out_dir/coco_segm_results.json` and return the METRICS (percentages)."""
        indices = range(self.eval_image_count(limit))
        return self.score(self.predict(predictor, indices, progress), limit, out_dir)


def _prompted_image(split: "CocoSplit", image_id: int, detections: Detections, position: int) -> PromptedImage:
    return PromptedImage(key=position, image=split.read_image(image_id), boxes=detections.boxes, extra=detections)


@TASKS.register("coco")
def make_coco_task(config: TaskConfig) -> CocoTask:
    """Factory registered as `coco`."""
    return CocoTask(config)
