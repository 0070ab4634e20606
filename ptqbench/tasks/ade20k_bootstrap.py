"""ADE20K mIoU / aAcc / mAcc re-scored on resampled image multisets.

mmsegmentation's IoU metric sums per-image per-class pixel counts over the split before any
ratio, so a multiset of images is scored by summing each image's counts times its multiplicity.
`AdeImageStats` keeps the nonzero (image, class) rows of the counts (intersection, predicted
area, label area; union = predicted + label - intersection); `rescore(counts)` sums them per
resample (exact int64) and applies `ade20k_metric.summary_of_counts`, the accumulator's own
summary, so the identity resample reproduces `IoUAccumulator.summary` bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse

from ptqbench.tasks.ade20k_metric import (
    NUM_CLASSES,
    IoUAccumulator,
    accumulate_prediction_folder,
    annotation_files,
    summary_of_counts,
)

DEFAULT_METRICS = ("mIoU", "aAcc", "mAcc")


@dataclass(frozen=True)
class AdeImageStats:
    """Per-image per-class pixel counts of one ADE20K cell, sparse.

    image_names: str [I] evaluated images in evaluation order; row_image: int32 [P] and
    row_class: int16 [P] for every (image, class) with a nonzero predicted or label area;
    intersect, pred_area, label_area: int32 [P] that image's pixel counts of that class.
    """

    image_names: np.ndarray
    row_image: np.ndarray
    row_class: np.ndarray
    intersect: np.ndarray
    pred_area: np.ndarray
    label_area: np.ndarray

    @property
    def image_keys(self) -> np.ndarray:
        return self.image_names

    @classmethod
    def from_accumulator(cls, accumulator: IoUAccumulator, image_names: Sequence[str]) -> AdeImageStats:
        """From an IoUAccumulator(keep_images=True) and the names of the images it was given, in order."""
        if len(image_names) != len(accumulator.image_counts):
            raise ValueError(f"{len(image_names)} image names for {len(accumulator.image_counts)} kept images "
                             f"(was the accumulator made with keep_images=True?)")
        if accumulator.num_classes != NUM_CLASSES:
            raise ValueError(f"the accumulator has {accumulator.num_classes} classes, ADE20K {NUM_CLASSES}")
        dense = np.stack(accumulator.image_counts) if image_names else np.zeros((0, 4, NUM_CLASSES), np.int64)
        if dense.max(initial=0) > np.iinfo(np.int32).max:
            raise ValueError("an image of over 2**31 pixels: its counts do not fit int32")
        dense = dense.astype(np.int32)
        row_image, row_class = np.nonzero((dense[:, 2] > 0) | (dense[:, 3] > 0))
        return cls(image_names=np.array(list(image_names), dtype=str), row_image=row_image.astype(np.int32),
                   row_class=row_class.astype(np.int16), intersect=dense[row_image, 0, row_class],
                   pred_area=dense[row_image, 2, row_class], label_area=dense[row_image, 3, row_class])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """A plain dict of arrays for storage; `from_arrays` inverts it."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any]) -> AdeImageStats:
        return cls(**{name: np.asarray(arrays[name]) for name in cls.__dataclass_fields__})

    def rescore(self, counts: np.ndarray, metrics: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """{metric: float64 [B]} in percent for counts int64 [B, I] (keys DEFAULT_METRICS by default)."""
        keys = DEFAULT_METRICS if metrics is None else tuple(metrics)
        totals = [self._summed(counts, values) for values in (self.intersect, self.pred_area, self.label_area)]
        intersect, pred_area, label_area = totals
        union = pred_area + label_area - intersect
        out = {key: np.empty(len(counts)) for key in keys}
        for b in range(len(counts)):
            summary = summary_of_counts(intersect[b], union[b], label_area[b])
            for key in keys:
                out[key][b] = summary[key]
        return out

    def _summed(self, counts: np.ndarray, values: np.ndarray) -> np.ndarray:
        """sum_i counts[b, i] x values of image i, per class: int64 [B, NUM_CLASSES]."""
        table = sparse.csr_matrix((values.astype(np.int64), (self.row_image, self.row_class)),
                                  shape=(len(self.image_names), NUM_CLASSES))
        return np.asarray((table.T @ counts.T).T, dtype=np.int64)


def score_prediction_folder_with_statistics(pred_dir: Path, data_root: Path, split: str = "validation", *,
                                            limit: int | None = None) -> tuple[dict[str, float], AdeImageStats]:
    """`ade20k_metric.score_prediction_folder` and the cell's `AdeImageStats` from one pass."""
    accumulator = accumulate_prediction_folder(pred_dir, data_root, split, limit=limit, keep_images=True)
    files = annotation_files(data_root, split)
    names = [path.stem for path in (files if limit is None else files[:limit])]
    return accumulator.summary(), AdeImageStats.from_accumulator(accumulator, names)
