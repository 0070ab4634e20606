"""DOTA-v1.0 Task 1 (oriented boxes) readers and the DOTA_devkit evaluator.

Readers:
- `read_dota_labels`: one v1.0 `labelTxt` file. Header lines (`imagesource:...`, `gsd:...`, any
  single `key:value` token) and blank lines are skipped; every other line must be
  `x1 y1 x2 y2 x3 y3 x4 y4 class [difficult]` with finite numbers, one of the 15 v1.0 classes
  and an integer difficult flag (nonzero = difficult, absent = 0). Anything else raises a
  DataError naming the file and line. (The devkit silently skips lines of fewer than 9 tokens;
  on well-formed files both read the same objects.)
- `read_task1_file` / `read_task1_folder`: detection files `Task1_<class>.txt` with lines
  `imgname score x1 y1 ... x4 y4` in full-image coordinates.

Evaluator (`class_ap`, `evaluate_task1`, `score_task1_folder`): the same computation as
DOTA_devkit's `dota_evaluation_task1.py` (`voc_eval` with `use_07_metric=True`, `ovthresh=0.5`):
- per class, over every image of the split; npos = number of non-difficult GT objects;
- detections ordered by `np.argsort(-confidence)` over the class file in file order (numpy's
  default, unstable sort: ties keep the order that call gives);
- per detection: the horizontal-box pre-filter with the devkit's +1 pixel convention (GTs with
  box overlap > 0 are kept), then polygon IoU (`poly_iou`) with each kept GT; with the maximum
  IoU strictly > 0.5: a difficult GT -> neither TP nor FP, a free GT -> TP (now taken), a taken
  GT -> FP; otherwise FP. NaN IoUs propagate through `np.max` exactly as in the devkit;
- rec = tp / npos, prec = tp / max(tp + fp, eps); VOC07 11-point AP over exactly
  `np.arange(0., 1.1, 0.1)`; mAP = mean over all 15 classes (a class without positives or
  without detections scores 0 and still counts).
Where the devkit would crash, this module decides: a missing or empty class file gives AP 0;
a detection on an image outside the split raises DataError naming the file and line.

Polygon IoU: `ptqbench.tasks.polygon_iou` (the devkit's `polyiou.iou_poly`, to the last bit).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptqbench.errors import DataError
from ptqbench.tasks.polygon_iou import poly_iou_batch

log = logging.getLogger(__name__)

DOTA_CLASSES: tuple[str, ...] = (
    "plane", "baseball-diamond", "bridge", "ground-track-field", "small-vehicle",
    "large-vehicle", "ship", "tennis-court", "basketball-court", "storage-tank",
    "soccer-ball-field", "roundabout", "harbor", "swimming-pool", "helicopter",
)
METRIC_KEYS: tuple[str, ...] = ("mAP",) + tuple(f"AP_{name}" for name in DOTA_CLASSES)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
IOU_THRESHOLD = 0.5



@dataclass(frozen=True)
class DotaLabels:
    """The objects of one image, in file order.

    polygons: float64 [N, 8] (x1 y1 x2 y2 x3 y3 x4 y4); names: N class names;
    difficult: bool [N].
    """

    polygons: np.ndarray
    names: tuple[str, ...]
    difficult: np.ndarray

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class Task1Detections:
    """The lines of one `Task1_<class>.txt` file, in file order.

    image_ids: D image names (file stems); scores: float64 [D]; polygons: float64 [D, 8].
    """

    image_ids: tuple[str, ...]
    scores: np.ndarray
    polygons: np.ndarray

    def __len__(self) -> int:
        return len(self.image_ids)


@dataclass(frozen=True)
class SplitItem:
    """One image of a split: its name (file stem), image file and labelTxt file."""

    name: str
    image_path: Path
    label_path: Path


def empty_detections() -> Task1Detections:
    """A class file without lines."""
    return Task1Detections(image_ids=(), scores=np.zeros((0,), dtype=np.float64),
                           polygons=np.zeros((0, 8), dtype=np.float64))


def _parse_float(token: str, where: str, what: str) -> float:
    try:
        value = float(token)
    except ValueError as err:
        raise DataError(f"{where}: {what} {token!r} is not a number") from err
    if not math.isfinite(value):
        raise DataError(f"{where}: {what} {token!r} is not finite")
    return value


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{what} {path} is not UTF-8 text: {err}") from err


def read_dota_labels(path: Path) -> DotaLabels:
    """Read one DOTA-v1.0 labelTxt file (see the module docstring for the accepted format)."""
    path = Path(path)
    polygons: list[list[float]] = []
    names: list[str] = []
    difficult: list[bool] = []
    for number, line in enumerate(_read_lines(path, "label file"), start=1):
        tokens = line.split()
        if not tokens or (len(tokens) == 1 and ":" in tokens[0]):
            continue
        where = f"label file {path}, line {number}"
        if len(tokens) not in (9, 10):
            raise DataError(f"{where}: expected 'x1 y1 x2 y2 x3 y3 x4 y4 class [difficult]' "
                            f"(9 or 10 tokens), got {len(tokens)}: {line.strip()!r}")
        polygons.append([_parse_float(token, where, "coordinate") for token in tokens[:8]])
        if tokens[8] not in DOTA_CLASSES:
            raise DataError(f"{where}: unknown class {tokens[8]!r}; DOTA-v1.0 classes: "
                            f"{', '.join(DOTA_CLASSES)}")
        names.append(tokens[8])
        flag = tokens[9] if len(tokens) == 10 else "0"
        try:
            difficult.append(int(flag) != 0)
        except ValueError as err:
            raise DataError(f"{where}: difficult flag {flag!r} is not an integer") from err
    return DotaLabels(polygons=np.array(polygons, dtype=np.float64).reshape(-1, 8),
                      names=tuple(names), difficult=np.array(difficult, dtype=bool))


def dota_split_dir(data_root: Path, split: str) -> Path:
    """`<data_root>/DOTA/<split>`, which must hold `images/` and `labelTxt/`."""
    split_dir = Path(data_root) / "DOTA" / split
    for sub in ("images", "labelTxt"):
        if not (split_dir / sub).is_dir():
            raise DataError(f"DOTA split folder {split_dir / sub} does not exist; expected the layout "
                            f"<data-root>/DOTA/{split}/images/*.png + labelTxt/*.txt")
    return split_dir


def list_split(split_dir: Path) -> list[SplitItem]:
    """The images of a split folder sorted by file name, each with its labelTxt file.

    An image without `labelTxt/<stem>.txt` raises DataError; label files without an image are
    ignored; no image at all raises DataError.
    """
    split_dir = Path(split_dir)
    images = sorted(path for path in (split_dir / "images").iterdir()
                    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {split_dir / 'images'}")
    items = []
    seen: set[str] = set()
    for image_path in images:
        if image_path.stem in seen:
            raise DataError(f"two images named {image_path.stem!r} in {split_dir / 'images'}")
        seen.add(image_path.stem)
        label_path = split_dir / "labelTxt" / f"{image_path.stem}.txt"
        if not label_path.is_file():
            raise DataError(f"image {image_path} has no label file {label_path}")
        items.append(SplitItem(name=image_path.stem, image_path=image_path, label_path=label_path))
    return items


def read_task1_file(path: Path, known_images: Container[str]) -> Task1Detections:
    """Read one Task1 detection file; lines `imgname score x1 y1 x2 y2 x3 y3 x4 y4`.

    Blank lines are skipped. A line of another token count, a non-numeric value or an image
    name not in `known_images` raises DataError naming the file and line.
    """
    path = Path(path)
    image_ids: list[str] = []
    scores: list[float] = []
    polygons: list[list[float]] = []
    for number, line in enumerate(_read_lines(path, "detection file"), start=1):
        tokens = line.split()
        if not tokens:
            continue
        where = f"detection file {path}, line {number}"
        if len(tokens) != 10:
            raise DataError(f"{where}: expected 'imgname score x1 y1 x2 y2 x3 y3 x4 y4' "
                            f"(10 tokens), got {len(tokens)}: {line.strip()!r}")
        if tokens[0] not in known_images:
            raise DataError(f"{where}: unknown image {tokens[0]!r} (not an image of the split)")
        image_ids.append(tokens[0])
        scores.append(_parse_float(tokens[1], where, "score"))
        polygons.append([_parse_float(token, where, "coordinate") for token in tokens[2:]])
    return Task1Detections(image_ids=tuple(image_ids), scores=np.array(scores, dtype=np.float64),
                           polygons=np.array(polygons, dtype=np.float64).reshape(-1, 8))


def read_task1_folder(det_dir: Path, known_images: Container[str]) -> dict[str, Task1Detections]:
    """Read `Task1_<class>.txt` for the 15 classes; a missing class file counts as empty.

    Raises DataError when the folder does not exist, holds no Task1 file at all, or holds a
    `Task1_<name>.txt` whose name is not a DOTA-v1.0 class.
    """
    det_dir = Path(det_dir)
    if not det_dir.is_dir():
        raise DataError(f"detection folder {det_dir} does not exist")
    files = sorted(det_dir.glob("Task1_*.txt"))
    if not files:
        raise DataError(f"detection folder {det_dir} holds no Task1_<class>.txt file")
    for path in files:
        if path.stem[len("Task1_"):] not in DOTA_CLASSES:
            raise DataError(f"detection file {path}: {path.stem[len('Task1_'):]!r} is not a "
                            f"DOTA-v1.0 class ({', '.join(DOTA_CLASSES)})")
    detections = {}
    for name in DOTA_CLASSES:
        path = det_dir / f"Task1_{name}.txt"
        detections[name] = read_task1_file(path, known_images) if path.is_file() else empty_detections()
    return detections


def voc07_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    """VOC2007 11-point AP: mean over t in np.arange(0., 1.1, 0.1) of max(prec[rec >= t]) (or 0).

    rec, prec: float64 [D] cumulative recall and precision in detection order.
    """
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        p = 0.0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
        ap = ap + p / 11.0
    return float(ap)


def _hbox_prefilter(det_polygons: np.ndarray, gt_polygons: np.ndarray) -> np.ndarray:
    """The devkit's horizontal-box pre-filter: bool [D, G], True where the +1-pixel box overlap
    of detection d and GT g is > 0 (element for element the devkit's float operations)."""
    gt_xmin, gt_ymin = np.min(gt_polygons[:, 0::2], axis=1), np.min(gt_polygons[:, 1::2], axis=1)
    gt_xmax, gt_ymax = np.max(gt_polygons[:, 0::2], axis=1), np.max(gt_polygons[:, 1::2], axis=1)
    bb_xmin, bb_ymin = np.min(det_polygons[:, 0::2], axis=1)[:, None], np.min(det_polygons[:, 1::2], axis=1)[:, None]
    bb_xmax, bb_ymax = np.max(det_polygons[:, 0::2], axis=1)[:, None], np.max(det_polygons[:, 1::2], axis=1)[:, None]
    iw = np.maximum(np.minimum(gt_xmax, bb_xmax) - np.maximum(gt_xmin, bb_xmin) + 1.0, 0.0)
    ih = np.maximum(np.minimum(gt_ymax, bb_ymax) - np.maximum(gt_ymin, bb_ymin) + 1.0, 0.0)
    inters = iw * ih
    uni = ((bb_xmax - bb_xmin + 1.0) * (bb_ymax - bb_ymin + 1.0)
           + (gt_xmax - gt_xmin + 1.0) * (gt_ymax - gt_ymin + 1.0) - inters)
    with np.errstate(divide="ignore", invalid="ignore"):
        return inters / uni > 0


def _best_overlaps(image_ids: Sequence[str], polygons: np.ndarray,
                   gt_polygons: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """For detections in evaluation order (image_ids: D names, polygons [D, 8]): the devkit's
    `ovmax` (max polygon IoU over the pre-filtered same-image GTs, -inf when none; NaN when any
    IoU is NaN) and `jmax` (index of the first maximum among the image's class GTs, -1 when none).
    All IoUs are computed in one batch."""
    positions: dict[str, list[int]] = {}
    for d, image in enumerate(image_ids):
        positions.setdefault(image, []).append(d)
    pair_det, pair_gt, pair_image = [], [], []
    for image, members in positions.items():
        gt = gt_polygons[image]
        if gt.size == 0:
            continue
        rows, cols = np.nonzero(_hbox_prefilter(polygons[members], gt))
        pair_det.append(np.asarray(members)[rows])
        pair_gt.append(cols)
        pair_image.extend([image] * len(rows))
    ovmax = np.full(len(image_ids), -np.inf)
    jmax = np.full(len(image_ids), -1, dtype=np.int64)
    if not pair_det:
        return ovmax, jmax
    pair_det_arr, pair_gt_arr = np.concatenate(pair_det), np.concatenate(pair_gt)
    gt_rows = np.array([gt_polygons[image][g] for image, g in zip(pair_image, pair_gt_arr)]).reshape(-1, 8)
    ious = poly_iou_batch(gt_rows, polygons[pair_det_arr])
    order = np.argsort(pair_det_arr, kind="stable")
    pair_det_arr, pair_gt_arr, ious = pair_det_arr[order], pair_gt_arr[order], ious[order]
    bounds = np.searchsorted(pair_det_arr, np.arange(len(image_ids) + 1))
    for d in range(len(image_ids)):
        start, end = bounds[d], bounds[d + 1]
        if end > start:
            overlaps = ious[start:end]
            ovmax[d] = np.max(overlaps)
            jmax[d] = pair_gt_arr[start + int(np.argmax(overlaps))]
    return ovmax, jmax


@dataclass(frozen=True)
class ClassMatches:
    """One class's detections in the devkit's evaluation order and their outcome.

    image_ids: D image names; tp, fp: float64 [D] 0/1 (both 0: matched a difficult GT);
    npos: non-difficult GT objects of the class over the evaluated images.
    """

    image_ids: tuple[str, ...]
    tp: np.ndarray
    fp: np.ndarray
    npos: int


def class_matches(labels: Mapping[str, DotaLabels], detections: Task1Detections, class_name: str,
                  iou_threshold: float = IOU_THRESHOLD) -> ClassMatches:
    """The devkit's greedy matching of one class's detections against the GT of every image in
    `labels` ({image name: DotaLabels} for every image of the evaluated set)."""
    gt_polygons: dict[str, np.ndarray] = {}
    gt_difficult: dict[str, np.ndarray] = {}
    npos = 0
    for image, objects in labels.items():
        selected = np.array([name == class_name for name in objects.names], dtype=bool)
        gt_polygons[image] = objects.polygons[selected]
        gt_difficult[image] = objects.difficult[selected]
        npos += int((~gt_difficult[image]).sum())
    unknown = sorted(set(detections.image_ids) - set(labels))
    if unknown:
        raise DataError(f"{class_name} detections on image(s) outside the evaluated set: {', '.join(unknown[:5])}")
    nd = len(detections)
    if nd == 0:
        return ClassMatches(image_ids=(), tp=np.zeros(0), fp=np.zeros(0), npos=npos)
    order = np.argsort(-detections.scores)
    image_ids = [detections.image_ids[k] for k in order]
    ovmax, jmax = _best_overlaps(image_ids, detections.polygons[order, :], gt_polygons)
    taken = {image: np.zeros(len(flags), dtype=bool) for image, flags in gt_difficult.items()}
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d, image in enumerate(image_ids):
        if ovmax[d] > iou_threshold:
            if not gt_difficult[image][jmax[d]]:
                if not taken[image][jmax[d]]:
                    tp[d] = 1.0
                    taken[image][jmax[d]] = True
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    return ClassMatches(image_ids=tuple(image_ids), tp=tp, fp=fp, npos=npos)


def matches_ap(matches: ClassMatches) -> float:
    """The devkit's AP (a fraction) of matched detections: rec, prec and the VOC07 rule."""
    if len(matches.image_ids) == 0:
        return 0.0
    fp = np.cumsum(matches.fp)
    tp = np.cumsum(matches.tp)
    with np.errstate(divide="ignore", invalid="ignore"):
        rec = tp / float(matches.npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc07_ap(rec, prec)


def class_ap(labels: Mapping[str, DotaLabels], detections: Task1Detections, class_name: str,
             iou_threshold: float = IOU_THRESHOLD) -> float:
    """AP (a fraction) of one class's detections against the GT of every image in `labels`.

    labels: {image name: DotaLabels} for every image of the evaluated set.
    """
    ap = matches_ap(class_matches(labels, detections, class_name, iou_threshold))
    log.debug("DOTA AP %s: %.4f", class_name, ap)
    return ap


def task1_metrics(aps: Mapping[str, float]) -> dict[str, float]:
    """{class: AP fraction} for the 15 classes -> mAP (the devkit's sum / 15) and the class APs,
    in percent, keys `METRIC_KEYS` (the APs may also be arrays, one value per resample)."""
    total = 0.0
    for name in DOTA_CLASSES:
        total = total + aps[name]
    result = {"mAP": total / len(DOTA_CLASSES) * 100.0}
    result.update({f"AP_{name}": aps[name] * 100.0 for name in DOTA_CLASSES})
    return result


def evaluate_task1(labels: Mapping[str, DotaLabels],
                   detections: Mapping[str, Task1Detections]) -> dict[str, float]:
    """mAP and the 15 per-class APs in percent, keys `METRIC_KEYS`.

    labels: {image name: DotaLabels} of every evaluated image; detections: {class: Task1Detections}
    (missing classes count as empty). mAP = the devkit's sum of class APs / 15, times 100.
    """
    return task1_metrics({name: class_ap(labels, detections.get(name, empty_detections()), name)
                          for name in DOTA_CLASSES})


def read_split_labels(items: Sequence[SplitItem]) -> dict[str, DotaLabels]:
    """{image name: DotaLabels} for the given split items, in their order."""
    return {item.name: read_dota_labels(item.label_path) for item in items}


def score_task1_folder(det_dir: Path, data_root: Path, split: str = "val") -> dict[str, float]:
    """Score a folder of `Task1_<class>.txt` files against `<data_root>/DOTA/<split>`.

    Returns {"mAP": ..., "AP_<class>": ...} in percent (keys `METRIC_KEYS`), over every image
    of the split.
    """
    items = list_split(dota_split_dir(data_root, split))
    labels = read_split_labels(items)
    return evaluate_task1(labels, read_task1_folder(det_dir, labels))
