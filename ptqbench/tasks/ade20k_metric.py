"""ADE20K label files and mmsegmentation's IoU metric (mIoU, aAcc, mAcc).

Labels: annotation PNGs hold 0 = "other" and 1..150; `reduce_zero_label` maps 0 -> 255
(ignored) and v -> v - 1, giving training ids 0..149. Prediction PNGs hold training ids
0..149 and 255 for "no prediction".

The metric is mmsegmentation's `IoUMetric`: per image, pixels whose label is 255 are dropped;
intersection, predicted area and label area are histograms over the classes 0..149 (values
outside that range fall out of the histograms, so a prediction outside 0..149 never matches and
adds nothing to any class); they are summed over the whole split (not averaged per image), then

    IoU_c = I_c / (P_c + L_c - I_c),  Acc_c = I_c / L_c,  aAcc = sum_c I_c / sum_c L_c,
    mIoU = nanmean_c IoU_c,  mAcc = nanmean_c Acc_c,

where a class with zero union (IoU) or zero label area (Acc) is NaN and left out of the mean,
and a class predicted but absent from the labels has IoU 0. Values are percentages (x100).
Deviations, both invisible at mmsegmentation's printed precision of two decimals: counts are
exact int64 here (mmsegmentation sums float32 histograms), and the values are not rounded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ptqbench.errors import DataError

log = logging.getLogger(__name__)

NUM_CLASSES = 150
IGNORE_INDEX = 255
DATASET_DIRNAME = "ADEChallengeData2016"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SINGLE_CHANNEL_MODES = ("L", "P")


def dataset_dir(data_root: Path) -> Path:
    """The `ADEChallengeData2016` folder below `data_root` (or `data_root` itself if it is one).

    Raises DataError when neither `data_root/ADEChallengeData2016/annotations` nor
    `data_root/annotations` exists.
    """
    data_root = Path(data_root)
    for candidate in (data_root / DATASET_DIRNAME, data_root):
        if (candidate / "annotations").is_dir():
            return candidate
    raise DataError(
        f"ADE20K not found: expected {data_root / DATASET_DIRNAME}/annotations/<split>/*.png "
        f"and images/<split>/*.jpg (the official ADEChallengeData2016 layout)"
    )


def annotation_files(data_root: Path, split: str) -> list[Path]:
    """The annotation PNGs of `split`, sorted by file name (raises DataError if none)."""
    folder = dataset_dir(data_root) / "annotations" / split
    files = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not files:
        raise DataError(f"no ADE20K annotation PNGs in {folder}")
    return files


def read_label_png(path: Path, *, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read a single-channel (mode L or P) PNG as uint8 [H, W].

    Raises DataError naming `path` if it cannot be read, is not single-channel, or its size
    differs from `expected_hw` (H, W).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.mode not in SINGLE_CHANNEL_MODES:
                raise DataError(
                    f"{path}: PNG mode {image.mode!r}, expected a single-channel class map "
                    f"(mode L or P)"
                )
            array = np.array(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(f"{path}: cannot read PNG ({error})") from error
    if expected_hw is not None and array.shape != tuple(expected_hw):
        raise DataError(
            f"{path}: size {array.shape[1]}x{array.shape[0]} (WxH), expected "
            f"{expected_hw[1]}x{expected_hw[0]}"
        )
    return array


def reduce_zero_label(raw: np.ndarray) -> np.ndarray:
    """ADE annotation values uint8 [H, W] in 0..150 -> training ids (0 -> 255, v -> v - 1)."""
    reduced = raw.astype(np.int64) - 1
    reduced[raw == 0] = IGNORE_INDEX
    return reduced.astype(np.uint8)


def read_annotation(path: Path, *, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Read an ADE20K annotation PNG and return training ids uint8 [H, W] (0..149, 255 ignore).

    Raises DataError naming the file for a bad mode or size, or a value above 150.
    """
    raw = read_label_png(path, expected_hw=expected_hw)
    top = int(raw.max()) if raw.size else 0
    if top > NUM_CLASSES:
        raise DataError(
            f"{path}: label value {top} above {NUM_CLASSES} (ADE20K annotations hold 0 = other "
            f"and 1..{NUM_CLASSES})"
        )
    return reduce_zero_label(raw)


def intersect_and_union(pred: np.ndarray, label: np.ndarray, num_classes: int = NUM_CLASSES,
                        ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, ...]:
    """Per-class pixel counts of one image.

    pred, label: integer arrays of the same shape [H, W].
    Returns int64 arrays [num_classes]: (intersection, union, predicted area, label area).
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {label.shape}")
    keep = label != ignore_index
    pred_kept = pred[keep].astype(np.int64)
    label_kept = label[keep].astype(np.int64)

    def histogram(values: np.ndarray) -> np.ndarray:
        inside = values[(values >= 0) & (values < num_classes)]
        return np.bincount(inside, minlength=num_classes)

    area_intersect = histogram(pred_kept[pred_kept == label_kept])
    area_pred = histogram(pred_kept)
    area_label = histogram(label_kept)
    return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label


def _percent_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator x 100 elementwise, NaN where the denominator is 0."""
    out = np.full(numerator.shape, np.nan, dtype=np.float64)
    nonzero = denominator > 0
    out[nonzero] = numerator[nonzero] / denominator[nonzero] * 100.0
    return out


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def summary_of_counts(intersect: np.ndarray, union: np.ndarray, label_area: np.ndarray) -> dict[str, float]:
    """{"mIoU", "aAcc", "mAcc"} in percent from split-summed per-class counts int64 [num_classes]
    (NaN where undefined, e.g. every pixel ignored)."""
    total_label = label_area.sum()
    all_acc = intersect.sum() / total_label * 100.0 if total_label > 0 else float("nan")
    return {
        "mIoU": _nanmean(_percent_ratio(intersect, union)),
        "aAcc": float(all_acc),
        "mAcc": _nanmean(_percent_ratio(intersect, label_area)),
    }


@dataclass
class IoUAccumulator:
    """Accumulates mmsegmentation's per-class counts over a split; `summary` gives the metrics.

    keep_images: also keep each added image's counts in `image_counts` (int64 [4, num_classes]
    each: intersection, union, predicted area, label area), for the bootstrap.
    """

    num_classes: int = NUM_CLASSES
    ignore_index: int = IGNORE_INDEX
    keep_images: bool = False
    intersect: np.ndarray = field(init=False)
    union: np.ndarray = field(init=False)
    pred_area: np.ndarray = field(init=False)
    label_area: np.ndarray = field(init=False)
    images: int = field(init=False, default=0)
    image_counts: list[np.ndarray] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        for name in ("intersect", "union", "pred_area", "label_area"):
            setattr(self, name, np.zeros(self.num_classes, dtype=np.int64))

    def add(self, pred: np.ndarray, label: np.ndarray) -> None:
        """Add one image: pred, label integer arrays [H, W] (label 255 = ignored)."""
        intersect, union, pred_area, label_area = intersect_and_union(
            pred, label, self.num_classes, self.ignore_index)
        self.intersect += intersect
        self.union += union
        self.pred_area += pred_area
        self.label_area += label_area
        self.images += 1
        if self.keep_images:
            self.image_counts.append(np.stack([intersect, union, pred_area, label_area]))

    def class_iou(self) -> np.ndarray:
        """IoU per class in percent [num_classes], NaN for classes with zero union."""
        return _percent_ratio(self.intersect, self.union)

    def class_accuracy(self) -> np.ndarray:
        """Accuracy per class in percent [num_classes], NaN for classes absent from the labels."""
        return _percent_ratio(self.intersect, self.label_area)

    def summary(self) -> dict[str, float]:
        """{"mIoU", "aAcc", "mAcc"} in percent (NaN where undefined, e.g. every pixel ignored)."""
        return summary_of_counts(self.intersect, self.union, self.label_area)


def accumulate_prediction_folder(pred_dir: Path, data_root: Path, split: str = "validation", *,
                                 limit: int | None = None, keep_images: bool = False) -> IoUAccumulator:
    """The IoUAccumulator of a folder of prediction PNGs against the ADE20K annotations of
    `split` (see `score_prediction_folder`); keep_images as IoUAccumulator's."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DataError(f"prediction folder {pred_dir} does not exist")
    files = annotation_files(data_root, split)
    if limit is not None:
        files = files[:limit]
    accumulator = IoUAccumulator(keep_images=keep_images)
    for annotation_path in files:
        label = read_annotation(annotation_path)
        pred_path = pred_dir / annotation_path.name
        if not pred_path.is_file():
            raise DataError(f"missing prediction {pred_path} for annotation {annotation_path}")
        accumulator.add(read_label_png(pred_path, expected_hw=label.shape), label)
    log.info("scored %d ADE20K %s predictions from %s", accumulator.images, split, pred_dir)
    return accumulator


def score_prediction_folder(pred_dir: Path, data_root: Path, split: str = "validation", *,
                            limit: int | None = None) -> dict[str, float]:
    """Score a folder of prediction PNGs against the ADE20K annotations of `split`.

    pred_dir holds `<stem>.png` per annotation `<stem>.png`: uint8 single-channel [H, W] with
    training ids 0..149 (255 = no prediction; any value outside 0..149 never matches).
    limit: score only the first `limit` annotations in sorted order (None = all).
    Returns {"mIoU", "aAcc", "mAcc"} in percent. Raises DataError naming a missing or malformed
    prediction or annotation file.
    """
    return accumulate_prediction_folder(pred_dir, data_root, split, limit=limit).summary()
