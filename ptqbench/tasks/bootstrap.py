"""Seeded bootstrap over evaluation images: percentile intervals of a cell's metrics and paired
intervals of the difference of two cells scored on the same images.

Resampling. A cell evaluated on n images keeps per-image statistics (`coco_bootstrap`,
`dota_bootstrap`, `ade20k_bootstrap`) that re-score any multiset of its images exactly as the
task's metric scores the whole set; each gives `rescore(counts)`, counts int64 [B, n] = how often
each image (in evaluation order) is in each of B resamples, and re-scoring the identity (every
count 1) gives the cell's own metrics bit for bit. No model output is recomputed.

Seed rule. The B resamples are the rows of one draw
`numpy.random.default_rng(seed).integers(0, n, size=(B, n))` (PCG64, int64): row b holds the
image indices of resample b, drawn with replacement. They depend on (seed, n, B) only, never on
the cell, so two cells evaluated on the same n images with the same seed see the same index sets:
their difference is paired by construction. The default seed is 0 and B = 1,000; B = 0 turns the
bootstrap off (no intervals).

Interval. The percentile method: the 95% interval of a metric is the 2.5th and 97.5th
percentiles (numpy's default linear interpolation) of its B re-scored values; the paired
interval of a difference is the same percentiles of the B per-resample differences
(cell - reference). Resamples where a metric is undefined (NaN, e.g. COCO's APs without a small
object) are left out; with none left the interval is (NaN, NaN).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
CONFIDENCE = 0.95
CHUNK = 100  # resamples re-scored at once: bounds memory (COCO: 65 MB of precision per chunk)


class ImageStatistics(Protocol):
    """Per-image statistics of one cell that re-score resampled image multisets."""

    @property
    def image_keys(self) -> np.ndarray:
        """The evaluated images in evaluation order [n] (ids or names): equal keys = same images."""

    def rescore(self, counts: np.ndarray, metrics: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """{metric: float64 [B]} for counts int64 [B, n]; `metrics` None = the task's default set."""


@dataclass(frozen=True)
class Interval:
    """A percentile bootstrap interval (same unit as the metric, percent)."""

    low: float
    high: float


def resample_indices(n_images: int, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """The image indices of each resample: int64 [resamples, n_images] (see the seed rule)."""
    if n_images < 0 or resamples < 0:
        raise ValueError(f"need n_images >= 0 and resamples >= 0, got {n_images} and {resamples}")
    return np.random.default_rng(seed).integers(0, max(n_images, 1), size=(resamples, n_images), dtype=np.int64)


def image_counts(indices: np.ndarray, n_images: int) -> np.ndarray:
    """How often each image is in each resample: indices int [B, n] -> counts int64 [B, n_images]."""
    rows = indices.shape[0]
    flat = (indices + np.arange(rows, dtype=np.int64)[:, None] * n_images).ravel()
    return np.bincount(flat, minlength=rows * n_images).reshape(rows, n_images)


def resampled_metrics(stats: ImageStatistics, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                      metrics: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """{metric: float64 [resamples]}: the cell's metrics on each resample, in draw order."""
    n_images = len(stats.image_keys)
    indices = resample_indices(n_images, resamples, seed)
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, resamples, CHUNK):
        counts = image_counts(indices[start:start + CHUNK], n_images)
        for key, values in stats.rescore(counts, metrics).items():
            parts.setdefault(key, []).append(values)
    return {key: np.concatenate(values) for key, values in parts.items()}


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> Interval:
    """The percentile interval of resampled values float [B] (NaNs left out)."""
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return Interval(math.nan, math.nan)
    tail = round((1.0 - confidence) * 50.0, 9)  # 2.5 (percent) for 95%, without 1 - 0.95's rounding
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return Interval(float(low), float(high))


@dataclass(frozen=True)
class Resampled:
    """One cell's metrics on every resample: image_keys [n] (the images resampled, in evaluation
    order) and values {metric: float64 [B]} in draw order (`resampled_metrics`)."""

    image_keys: np.ndarray
    values: dict[str, np.ndarray]

    def intervals(self, confidence: float = CONFIDENCE) -> dict[str, Interval]:
        """{metric: Interval} of the cell."""
        return {key: percentile_interval(column, confidence) for key, column in self.values.items()}

    def difference_intervals(self, reference: Resampled, confidence: float = CONFIDENCE) -> dict[str, Interval]:
        """{metric: Interval} of (cell - reference) per resample, for the metrics both have.
        Raises ValueError unless both cells were evaluated on the same images (the same seed and
        resample count then make the index sets the same: the difference is paired)."""
        if not np.array_equal(self.image_keys, reference.image_keys):
            raise ValueError("a paired interval needs two cells evaluated on the same images in the same order")
        return {key: percentile_interval(column - reference.values[key], confidence)
                for key, column in self.values.items() if key in reference.values}


def resample(stats: ImageStatistics, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
             metrics: Sequence[str] | None = None) -> Resampled:
    """The cell's `Resampled` metrics (`resampled_metrics`), to draw intervals from."""
    return Resampled(np.asarray(stats.image_keys), resampled_metrics(stats, resamples, seed, metrics))


def bootstrap_intervals(stats: ImageStatistics, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                        confidence: float = CONFIDENCE, metrics: Sequence[str] | None = None) -> dict[str, Interval]:
    """{metric: Interval} of one cell; {} when resamples is 0 (bootstrap off)."""
    return resample(stats, resamples, seed, metrics).intervals(confidence)


def paired_difference_intervals(stats: ImageStatistics, reference: ImageStatistics,
                                resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                                confidence: float = CONFIDENCE,
                                metrics: Sequence[str] | None = None) -> dict[str, Interval]:
    """{metric: Interval} of (cell - reference) over the same resampled index sets; {} when
    resamples is 0. Raises ValueError unless both cells were evaluated on the same images."""
    if not np.array_equal(stats.image_keys, reference.image_keys):
        raise ValueError("a paired interval needs two cells evaluated on the same images in the same order")
    cell = resample(stats, resamples, seed, metrics)
    return cell.difference_intervals(resample(reference, resamples, seed, metrics), confidence)
