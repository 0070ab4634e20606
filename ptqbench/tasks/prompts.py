"""Prompt sources: the check every task makes of its prompt source (`prompt_source`,
`require_path`), and the reader of COCO results-format detection files.

A detection file is the JSON list a detector writes for COCO's evaluation server:
`[{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}, ...]`, boxes
in image pixels, xywh. Every entry is validated; the first bad one raises a DataError that
names the file and the entry index. Extra keys (e.g. `segmentation`) are ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ptqbench.errors import DataError

DETECTION_KEYS = ("image_id", "category_id", "bbox", "score")
# The reference's prompt for an image its detector gives no box (see `no_detection_prompt`).
NO_DETECTION_BOX = (0.0, 0.0, 0.0, 0.0)
NO_DETECTION_SCORE = 0.1


@dataclass(frozen=True)
class Detections:
    """The box prompts of one image, in the order the source lists them.

    boxes: float64 [N, 4] xyxy in image pixels; category_ids: int64 [N];
    scores: float64 [N] (the detector's confidence; 1.0 for ground-truth prompts).
    """

    boxes: np.ndarray
    category_ids: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """[N, 4] xywh -> [N, 4] xyxy (float64)."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)


def no_detection_prompt(category_id: int) -> Detections:
    """The prompt of an image for which the detector gave no box: one box NO_DETECTION_BOX (xyxy)
    with detector score NO_DETECTION_SCORE in category `category_id`.

    This is what the reference's generic detector wrapper returns for such an image (SAQ-SAM /
    PTQ4SAM `models/detector/detector_wrapper.py`, `simple_test`: boxes zeros(1, 4), scores
    [0.1], labels [0]); SAM then segments that box and the entry's score is 0.1 x SAM's IoU like
    any other. Label 0 is mmdetection's first class, written as the first category id of the
    annotation file (COCO's `person`, id 1), so callers pass that id.
    """
    return Detections(boxes=np.array([NO_DETECTION_BOX], dtype=np.float64),
                      category_ids=np.array([category_id], dtype=np.int64),
                      scores=np.array([NO_DETECTION_SCORE], dtype=np.float64))


def require_path(path: Path, what: str, kind: Literal["file", "folder"], expects: str) -> Path:
    """`path` when it is an existing `kind` ("file" or "folder"); DataError otherwise:
    "<what> <path> does not exist[ (it is a <other kind>)]; <expects>".

    what: names the source, e.g. "DOTA prompt folder"; expects: what to give instead, naming
    the option that sets it, e.g. "set --prompts to a folder of Task1_<class>.txt files, or 'gt'".
    """
    path = Path(path)
    if path.is_dir() if kind == "folder" else path.is_file():
        return path
    found = ""
    if path.exists():
        found = " (it is a folder)" if path.is_dir() else " (it is a file)"
    raise DataError(f"{what} {path} does not exist{found}; {expects}")


def prompt_source(source: str | None, what: str, kind: Literal["file", "folder"], expects: str) -> Path | None:
    """A task's prompt source option: None or "gt" (ground-truth prompts) -> None; anything else
    is a path that `require_path` checks (DataError naming it and the option to set)."""
    if source is None or source == "gt":
        return None
    return require_path(Path(source), what, kind, expects)


def load_json_file(path: Path, what: str) -> Any:
    """Parse a JSON file; a missing or malformed file raises DataError naming it (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    try:
        with path.open("rb") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise DataError(f"{what} {path} is not valid JSON: {err.msg} at line {err.lineno}, "
                        f"column {err.colno}") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{what} {path} is not UTF-8 text JSON: {err}") from err


def is_number(value: Any) -> bool:
    """True for a finite int or float (bools and NaN/inf are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def as_id(value: Any) -> int | None:
    """An integer id from an int or an integral float; None when `value` is not one."""
    if is_number(value) and float(value).is_integer():
        return int(value)
    return None


def read_coco_detections(path: Path, image_ids: Collection[int],
                         category_ids: Collection[int]) -> dict[int, Detections]:
    """Read a COCO results-format detection file into per-image box prompts.

    path: the JSON file. image_ids / category_ids: the ids of the split's annotation file; an
    entry naming another id is an error (a detection file made for another split or label map).
    Returns {image_id: Detections} with every box the file has for that image, in file order;
    images without detections are absent. Raises DataError naming the file and entry index for
    malformed JSON, a non-list top level, missing keys, non-numeric values, negative box sides,
    unknown image ids and unknown category ids.
    """
    path = Path(path)
    entries = load_json_file(path, "detection file")
    if not isinstance(entries, list):
        raise DataError(f"detection file {path}: expected a JSON list of "
                        f"{{image_id, category_id, bbox, score}} objects, got {type(entries).__name__}")
    known_images = set(image_ids)
    known_categories = set(category_ids)
    per_image: dict[int, tuple[list[list[float]], list[int], list[float]]] = {}
    for index, entry in enumerate(entries):
        where = f"detection file {path}, entry {index}"
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
        missing = [key for key in DETECTION_KEYS if key not in entry]
        if missing:
            raise DataError(f"{where}: missing key(s) {', '.join(missing)}")
        image_id = as_id(entry["image_id"])
        if image_id is None:
            raise DataError(f"{where}: image_id {entry['image_id']!r} is not an integer")
        if image_id not in known_images:
            raise DataError(f"{where}: unknown image_id {image_id} (not in the split's annotation file)")
        category_id = as_id(entry["category_id"])
        if category_id is None:
            raise DataError(f"{where}: category_id {entry['category_id']!r} is not an integer")
        if category_id not in known_categories:
            raise DataError(f"{where}: unknown category_id {category_id} "
                            f"(not among the annotation file's categories)")
        bbox = entry["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
            raise DataError(f"{where}: bbox {bbox!r} is not a list of 4 finite numbers [x, y, w, h]")
        if bbox[2] < 0 or bbox[3] < 0:
            raise DataError(f"{where}: bbox {bbox!r} has a negative width or height")
        if not is_number(entry["score"]):
            raise DataError(f"{where}: score {entry['score']!r} is not a finite number")
        boxes, categories, scores = per_image.setdefault(image_id, ([], [], []))
        boxes.append([float(v) for v in bbox])
        categories.append(category_id)
        scores.append(float(entry["score"]))
    return {
        image_id: Detections(boxes=xywh_to_xyxy(np.array(boxes, dtype=np.float64)),
                             category_ids=np.array(categories, dtype=np.int64),
                             scores=np.array(scores, dtype=np.float64))
        for image_id, (boxes, categories, scores) in per_image.items()
    }
