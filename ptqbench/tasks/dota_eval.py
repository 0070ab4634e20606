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

Polygon IoU (`poly_iou`) re-implements the devkit's `polyiou.iou_poly` algorithm: the first 4
vertices of each quad; each quad is reversed when its shoelace area is negative; the
intersection is the sum, over every pair of edges, of the signed intersection of the two
triangles (origin, edge) clipped against each other (Sutherland-Hodgman, eps 1e-8);
IoU = inter / (|area1| + |area2| - inter) with IEEE division. For simple quads (convex or not)
this is the exact polygon IoU. For a self-intersecting ("bow-tie") quad it is a winding-number
weighted overlap: a symmetric bow-tie has area 0 and IoU 0 with a quad covering both lobes
equally, but a quad covering one lobe overlaps with +-lobe area, so the IoU can be any value,
including NaN or infinity where the union is 0 (the devkit behaves the same; shapely would
raise instead). The operation order follows the devkit, so results agree to the last bit
wherever the devkit's own behaviour is defined.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptqbench.errors import DataError

log = logging.getLogger(__name__)

DOTA_CLASSES: tuple[str, ...] = (
    "plane", "baseball-diamond", "bridge", "ground-track-field", "small-vehicle",
    "large-vehicle", "ship", "tennis-court", "basketball-court", "storage-tank",
    "soccer-ball-field", "roundabout", "harbor", "swimming-pool", "helicopter",
)
METRIC_KEYS: tuple[str, ...] = ("mAP",) + tuple(f"AP_{name}" for name in DOTA_CLASSES)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
IOU_THRESHOLD = 0.5

_EPS = 1e-8


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


def _differs(values: np.ndarray) -> np.ndarray:
    """The devkit's `sig(v) != 0`: |v| > 1e-8 (NaN counts as 0)."""
    return (values > _EPS) | (values < -_EPS)


def _sig(values: np.ndarray) -> np.ndarray:
    """The devkit's `sig`: 1 above 1e-8, -1 below -1e-8, else 0 (int8, same shape)."""
    return (values > _EPS).astype(np.int8) - (values < -_EPS).astype(np.int8)


def _next_vertex(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """values[p, k + 1], wrapping to values[p, 0] at the last vertex k = counts[p] - 1; [P, C]."""
    shifted = np.empty_like(values)
    shifted[:, :-1] = values[:, 1:]
    shifted[np.arange(len(values)), np.maximum(counts - 1, 0)] = values[:, 0]
    return shifted


def _compact(xs: np.ndarray, ys: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Move the kept vertices of every row [P, C] to the front, in order; returns xs, ys, counts [P].

    Columns past a row's count are zero."""
    counts = keep.sum(axis=1)
    width = max(int(counts.max(initial=0)), 1)
    flat = np.flatnonzero(keep)
    target = (flat // keep.shape[1]) * width + (np.cumsum(keep, axis=1) - 1).ravel()[flat]
    out_x = np.zeros((len(keep), width))
    out_y = np.zeros((len(keep), width))
    out_x.ravel()[target] = xs.ravel()[flat]
    out_y.ravel()[target] = ys.ravel()[flat]
    return out_x, out_y, counts


def _polygon_area(xs: np.ndarray, ys: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Signed shoelace areas [P] of polygons given by their first `counts` vertices of xs, ys [P, C],
    summed vertex by vertex from 0.0 as the devkit's `area` does."""
    next_x, next_y = _next_vertex(xs, counts), _next_vertex(ys, counts)
    total = np.zeros(xs.shape[0])
    for k in range(xs.shape[1]):
        term = xs[:, k] * next_y[:, k] - ys[:, k] * next_x[:, k]
        total = total + np.where(k < counts, term, 0.0)
    return total / 2.0


def _cut(xs: np.ndarray, ys: np.ndarray, counts: np.ndarray, a: tuple[np.ndarray, np.ndarray],
         b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The devkit's `polygon_cut` on every row: keep the part of polygon p strictly left of the
    directed line a[p] -> b[p] (a, b: (x [P], y [P])), adding crossing points, then dropping
    consecutive duplicates and trailing copies of the first vertex (both within 1e-8)."""
    rows, width = xs.shape
    valid = np.arange(width)[None, :] < counts[:, None]
    ax, ay = a[0][:, None], a[1][:, None]
    dx, dy = b[0][:, None] - ax, b[1][:, None] - ay
    raw = dx * (ys - ay) - (xs - ax) * dy
    raw_next = _next_vertex(raw, counts)
    side = _sig(raw)
    den = raw_next - raw
    crossing = _differs(den)
    cross_x = np.where(crossing, (xs * raw_next - _next_vertex(xs, counts) * raw) / den, xs)
    cross_y = np.where(crossing, (ys * raw_next - _next_vertex(ys, counts) * raw) / den, ys)
    keep = np.stack([valid & (side > 0), valid & (side != _next_vertex(side, counts))], axis=2)
    kept_x, kept_y, kept = _compact(np.stack([xs, cross_x], axis=2).reshape(rows, 2 * width),
                                    np.stack([ys, cross_y], axis=2).reshape(rows, 2 * width),
                                    keep.reshape(rows, 2 * width))
    distinct = np.ones(kept_x.shape, dtype=bool)
    distinct[:, 1:] = _differs(kept_x[:, 1:] - kept_x[:, :-1]) | _differs(kept_y[:, 1:] - kept_y[:, :-1])
    distinct &= np.arange(kept_x.shape[1])[None, :] < kept[:, None]
    out_x, out_y, counts = _compact(kept_x, kept_y, distinct)
    row_index = np.arange(rows)
    while True:
        last = np.maximum(counts - 1, 0)
        same_as_first = ~(_differs(out_x[row_index, last] - out_x[:, 0])
                          | _differs(out_y[row_index, last] - out_y[:, 0]))
        drop = (counts > 1) & same_as_first
        if not drop.any():
            return out_x, out_y, counts
        counts = counts - drop


def _oriented_quads(polygons: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quads [P, 8] -> vertex xs, ys [P, 4], each row reversed where its signed area is < 0."""
    xs, ys = polygons[:, 0:8:2].copy(), polygons[:, 1:8:2].copy()
    negative = _polygon_area(xs, ys, np.full(len(xs), 4)) < 0
    xs[negative], ys[negative] = xs[negative, ::-1], ys[negative, ::-1]
    return xs, ys


def _iou_rows(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """poly_iou_batch for one chunk of rows (slots past a polygon's vertex count hold junk that
    may overflow; the masks keep it out of every result)."""
    with np.errstate(all="ignore"):
        return _iou_rows_unchecked(first, second)


def _triangle_overlaps(a_x: np.ndarray, a_y: np.ndarray, b_x: np.ndarray, b_y: np.ndarray,
                       c_x: np.ndarray, c_y: np.ndarray, d_x: np.ndarray, d_y: np.ndarray) -> np.ndarray:
    """The devkit's edge-pair `intersectArea` for every row [R]: the area of triangle (0, a, b)
    clipped by triangle (0, c, d), negated when exactly one of them is clockwise, 0 when either
    is degenerate. Rows clipped down to fewer than 2 vertices have area exactly 0 and are
    dropped early (adding 0.0 instead of -0.0 leaves every sum unchanged)."""
    s1 = _sig(a_x * b_y - b_x * a_y)
    s2 = _sig(c_x * d_y - d_x * c_y)
    flip1, flip2 = s1 == -1, s2 == -1
    a_x, b_x = np.where(flip1, b_x, a_x), np.where(flip1, a_x, b_x)
    a_y, b_y = np.where(flip1, b_y, a_y), np.where(flip1, a_y, b_y)
    c_x, d_x = np.where(flip2, d_x, c_x), np.where(flip2, c_x, d_x)
    c_y, d_y = np.where(flip2, d_y, c_y), np.where(flip2, c_y, d_y)
    alive = np.flatnonzero((s1 != 0) & (s2 != 0))
    zero = np.zeros(len(alive))
    xs = np.stack([zero, a_x[alive], b_x[alive]], axis=1)
    ys = np.stack([zero, a_y[alive], b_y[alive]], axis=1)
    counts = np.full(len(alive), 3)
    origin = (np.zeros_like(c_x), np.zeros_like(c_y))
    for start, end in ((origin, (c_x, c_y)), ((c_x, c_y), (d_x, d_y)), ((d_x, d_y), origin)):
        xs, ys, counts = _cut(xs, ys, counts, (start[0][alive], start[1][alive]), (end[0][alive], end[1][alive]))
        live = counts >= 2
        alive, xs, ys, counts = alive[live], xs[live], ys[live], counts[live]
    area = np.abs(_polygon_area(xs, ys, counts))
    result = np.zeros(len(s1))
    result[alive] = np.where(s1[alive] * s2[alive] == -1, -area, area)
    return result


def _iou_rows_unchecked(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    count = len(first)
    p_x, p_y = _oriented_quads(first)
    q_x, q_y = _oriented_quads(second)
    edge_i = np.repeat(np.arange(4), 4)
    edge_j = np.tile(np.arange(4), 4)
    pieces = _triangle_overlaps(p_x[:, edge_i].ravel(), p_y[:, edge_i].ravel(),
                                p_x[:, (edge_i + 1) % 4].ravel(), p_y[:, (edge_i + 1) % 4].ravel(),
                                q_x[:, edge_j].ravel(), q_y[:, edge_j].ravel(),
                                q_x[:, (edge_j + 1) % 4].ravel(), q_y[:, (edge_j + 1) % 4].ravel())
    pieces = pieces.reshape(count, 16)
    inter = np.zeros(count)
    for k in range(16):
        inter = inter + pieces[:, k]
    union = (np.abs(_polygon_area(p_x, p_y, np.full(count, 4)))
             + np.abs(_polygon_area(q_x, q_y, np.full(count, 4))) - inter)
    return inter / union


def poly_iou_batch(first: np.ndarray, second: np.ndarray, chunk: int = 512) -> np.ndarray:
    """DOTA_devkit polygon IoU of row pairs: first, second float64 [P, 8] -> IoU float64 [P].

    Row p of `first` plays the devkit's GT role and row p of `second` the detection's (the
    summation order, and so the last bits, depend on it). Each row's result is computed with
    exactly the devkit's sequence of float64 operations; see the module docstring for
    self-intersecting quads.
    """
    first = np.asarray(first, dtype=np.float64).reshape(-1, 8)
    second = np.asarray(second, dtype=np.float64).reshape(-1, 8)
    if len(first) != len(second):
        raise ValueError(f"poly_iou_batch needs as many rows in both arrays, got {len(first)} and {len(second)}")
    parts = [_iou_rows(first[s:s + chunk], second[s:s + chunk]) for s in range(0, len(first), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0,), dtype=np.float64)


def poly_iou(first: Sequence[float], second: Sequence[float]) -> float:
    """DOTA_devkit polygon IoU of two quads given as 8 numbers (x1 y1 ... x4 y4), `first` as GT."""
    return float(poly_iou_batch(np.asarray(first, dtype=np.float64)[None, :8],
                                np.asarray(second, dtype=np.float64)[None, :8])[0])


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


def class_ap(labels: Mapping[str, DotaLabels], detections: Task1Detections, class_name: str,
             iou_threshold: float = IOU_THRESHOLD) -> float:
    """AP (a fraction) of one class's detections against the GT of every image in `labels`.

    labels: {image name: DotaLabels} for every image of the evaluated set.
    """
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
        return 0.0
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
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    with np.errstate(divide="ignore", invalid="ignore"):
        rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc07_ap(rec, prec)


def evaluate_task1(labels: Mapping[str, DotaLabels],
                   detections: Mapping[str, Task1Detections]) -> dict[str, float]:
    """mAP and the 15 per-class APs in percent, keys `METRIC_KEYS`.

    labels: {image name: DotaLabels} of every evaluated image; detections: {class: Task1Detections}
    (missing classes count as empty). mAP = the devkit's sum of class APs / 15, times 100.
    """
    aps = {}
    total = 0.0
    for name in DOTA_CLASSES:
        ap = class_ap(labels, detections.get(name, empty_detections()), name)
        log.debug("DOTA AP %s: %.4f", name, ap)
        aps[name] = ap
        total = total + ap
    result = {"mAP": total / len(DOTA_CLASSES) * 100.0}
    result.update({f"AP_{name}": aps[name] * 100.0 for name in DOTA_CLASSES})
    return result


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
