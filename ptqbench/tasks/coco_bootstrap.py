"""COCO mask AP re-scored on resampled image multisets from pycocotools' per-image evaluation.

`COCOeval.evaluate()` leaves one `evalImgs` entry per (category, area range, image): the image's
detections of that category (score-sorted, at most maxDets[-1]) with, per IoU threshold, their
match (`dtMatches`) and ignore flag (`dtIgnore`), and the GT ignore flags (`gtIgnore`). Matching
is per image, so a resample never re-runs it: `CocoImageStats` keeps, per category, the
detections in the order `accumulate` ranks them (the entries concatenated in image-id order,
then `argsort(-score, kind="mergesort")`) with two bits per (area range, IoU threshold) -
matched, ignored - and, per (category, image), the count of non-ignored GT per area range.

`rescore(counts)` is pycocotools' `accumulate` + `summarize` on the multiset (image i counted
`counts[b, i]` times): per (category, area range, maxDets) the ranked list keeps each image's
first maxDets detections, npig = sum of counts x non-ignored GT, the category is left out (-1)
when npig is 0, precision at the 101 recall thresholds follows `ranked_precision` (bit for bit
`accumulate`'s, copies of a detection adjacent in the ranking), recall = tp / npig, and each stat
is `summarize`'s `np.mean(s[s > -1])` over the same [T, R, K] (or [T, K]) layout, so the identity
resample gives `coco_eval.score_results` exactly. A resampled list only differs from what
pycocotools would rank for a split with an image literally duplicated in how copies of one
image's detections of equal score interleave (adjacent per detection here, per image there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

from ptqbench.tasks.coco_eval import MAX_DETS, METRICS, evaluate_segm, stat_percent, summarize_metrics
from ptqbench.tasks.ranked_precision import COCO_RULE, image_weights, min_count_reaching, ranked_precision

if TYPE_CHECKING:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

AREA_LABELS = ("all", "small", "medium", "large")  # pycocotools' detection area ranges, in order
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)  # Params'
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
DEFAULT_METRICS = ("mask_AP", "AP50", "AP75")  # the headline and the two single-threshold APs (area "all")


@dataclass(frozen=True)
class _Stat:
    """One line of pycocotools' `_summarizeDets`: AP or AR, IoU (None = all), area label, maxDets."""

    ap: bool
    iou: float | None
    area: str
    max_dets: int


def summary_stats(max_dets: Sequence[int]) -> dict[str, _Stat]:
    """METRICS -> the `_summarizeDets` line that computes it, for the evaluator's maxDets."""
    last = max_dets[2]
    lines = [_Stat(True, None, "all", 100), _Stat(True, 0.5, "all", last), _Stat(True, 0.75, "all", last)]
    lines += [_Stat(True, None, area, last) for area in AREA_LABELS[1:]]
    lines += [_Stat(False, None, "all", count) for count in max_dets[:3]]
    lines += [_Stat(False, None, area, last) for area in AREA_LABELS[1:]]
    return dict(zip(METRICS, lines, strict=True))


@dataclass(frozen=True)
class CocoImageStats:
    """What `rescore` needs of one COCO cell (see the module docstring).

    image_ids: int64 [I] evaluated image ids (sorted, pycocotools' order); category_ids: int64 [K];
    iou_thresholds: float64 [T]; max_dets: int64 [M];
    det_offsets: int64 [K + 1]: category k's detections are rows det_offsets[k]:det_offsets[k+1],
    in accumulate's ranking; det_image: int32 [N] image index; det_bits: bool [N, A, T, 2]
    (matched, ignored) per area range and IoU threshold;
    gt_category, gt_image: int32 [P], gt_npig: int32 [P, A] non-ignored GT of (category, image)
    per area range, for the pairs with any.
    """

    image_ids: np.ndarray
    category_ids: np.ndarray
    iou_thresholds: np.ndarray
    max_dets: np.ndarray
    det_offsets: np.ndarray
    det_image: np.ndarray
    det_bits: np.ndarray
    gt_category: np.ndarray
    gt_image: np.ndarray
    gt_npig: np.ndarray

    @property
    def image_keys(self) -> np.ndarray:
        return self.image_ids

    @classmethod
    def from_evaluator(cls, evaluator: COCOeval) -> CocoImageStats:
        """Read the per-image evaluation of a COCOeval after `evaluate()`."""
        params = evaluator.params
        n_images, n_areas = len(params.imgIds), len(params.areaRng)
        offsets, images, bits, gt_rows = [0], [], [], []
        for k in range(len(params.catIds)):
            scores, cat_images, cat_bits = [], [], []
            for i in range(n_images):
                entries = [evaluator.evalImgs[(k * n_areas + a) * n_images + i] for a in range(n_areas)]
                if entries[0] is None:
                    continue
                npig = [int(np.count_nonzero(entry["gtIgnore"] == 0)) for entry in entries]
                if any(npig):
                    gt_rows.append([k, i, *npig])
                if entries[0]["dtScores"]:
                    scores.append(np.asarray(entries[0]["dtScores"], dtype=np.float64))
                    cat_images.append(np.full(len(scores[-1]), i, dtype=np.int32))
                    cat_bits.append(np.stack([np.stack([entry["dtMatches"] != 0, entry["dtIgnore"] != 0], axis=-1)
                                              for entry in entries], axis=0).transpose(2, 0, 1, 3))
            if scores:
                order = np.argsort(-np.concatenate(scores), kind="mergesort")
                images.append(np.concatenate(cat_images)[order])
                bits.append(np.concatenate(cat_bits)[order])
            offsets.append(offsets[-1] + sum(len(part) for part in scores))
        n_thresholds = len(params.iouThrs)
        gt = np.array(gt_rows, dtype=np.int32).reshape(-1, 2 + n_areas)
        return cls(image_ids=np.asarray(params.imgIds, dtype=np.int64),
                   category_ids=np.asarray(params.catIds, dtype=np.int64),
                   iou_thresholds=np.asarray(params.iouThrs, dtype=np.float64),
                   max_dets=np.asarray(params.maxDets, dtype=np.int64),
                   det_offsets=np.asarray(offsets, dtype=np.int64),
                   det_image=np.concatenate(images) if images else np.zeros(0, dtype=np.int32),
                   det_bits=np.concatenate(bits) if bits else np.zeros((0, n_areas, n_thresholds, 2), dtype=bool),
                   gt_category=gt[:, 0].copy(), gt_image=gt[:, 1].copy(), gt_npig=gt[:, 2:].copy())

    def to_arrays(self) -> dict[str, np.ndarray]:
        """A plain dict of arrays (det_bits packed 8 to a byte) for storage; `from_arrays` inverts it."""
        arrays = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "det_bits"}
        arrays["det_bits"] = np.packbits(self.det_bits.reshape(len(self.det_bits), -1), axis=1)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any]) -> CocoImageStats:
        n_areas, n_thresholds = arrays["gt_npig"].shape[1], len(arrays["iou_thresholds"])
        width = n_areas * n_thresholds * 2
        bits = np.unpackbits(np.asarray(arrays["det_bits"], dtype=np.uint8), axis=1, count=width).astype(bool)
        fields = {name: np.asarray(arrays[name]) for name in cls.__dataclass_fields__ if name != "det_bits"}
        return cls(det_bits=bits.reshape(-1, n_areas, n_thresholds, 2), **fields)

    def rescore(self, counts: np.ndarray, metrics: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """{metric: float64 [B]} in percent (NaN where pycocotools gives -1) for counts int64 [B, I]."""
        metrics = tuple(DEFAULT_METRICS if metrics is None else metrics)
        lines = summary_stats(self.max_dets.tolist())
        if len(self.det_image) == 0:  # as score_results: no results at all scores 0
            return {key: np.zeros(len(counts)) for key in metrics}
        npig = self._npig(counts)
        out: dict[str, np.ndarray] = {}
        curves: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for key in metrics:
            line = lines[key]
            area, max_det = AREA_LABELS.index(line.area), self._effective_max_det(line.max_dets)
            if (area, max_det) not in curves:
                curves[area, max_det] = self._curves(counts, npig[:, :, area], area, max_det)
            out[key] = self._summarize(*curves[area, max_det], line)
        return out

    def _npig(self, counts: np.ndarray) -> np.ndarray:
        """Non-ignored GT per resample, category and area range: int64 [B, K, A]."""
        n_categories, n_areas = len(self.category_ids), self.gt_npig.shape[1]
        columns = (self.gt_category[:, None] * n_areas + np.arange(n_areas)[None, :]).ravel()
        table = sparse.csr_matrix((self.gt_npig.ravel().astype(np.int64), (np.repeat(self.gt_image, n_areas), columns)),
                                  shape=(len(self.image_ids), n_categories * n_areas))
        return np.asarray((table.T @ counts.T).T).reshape(len(counts), n_categories, n_areas)

    def _effective_max_det(self, max_det: int) -> int:
        """maxDets value -> the smallest cut that keeps the same detections (so equal cuts share
        their curves); -1 when the evaluator has no such maxDets (summarize then gives -1)."""
        if max_det not in self.max_dets.tolist():
            return -1
        category = np.repeat(np.arange(len(self.category_ids)), np.diff(self.det_offsets))
        per_image = np.bincount(category * len(self.image_ids) + self.det_image)
        return min(max_det, int(per_image.max(initial=0)))

    def _curves(self, counts: np.ndarray, npig: np.ndarray, area: int, max_det: int) -> tuple[np.ndarray, np.ndarray]:
        """accumulate's precision [B, T, R, K] and recall [B, T, K] for one area range and
        maxDets, -1 where npig [B, K] is 0 (views of arrays filled category-major, [B, K, T, R]
        and [B, K, T], so that each category's rows are written contiguously)."""
        rows, n_thresholds, n_categories = len(counts), len(self.iou_thresholds), len(self.category_ids)
        precision = np.full((rows, n_categories, n_thresholds, len(RECALL_THRESHOLDS)), -1.0)
        recall = np.full((rows, n_categories, n_thresholds), -1.0)
        if max_det < 0:
            return precision.transpose(0, 2, 3, 1), recall.transpose(0, 2, 1)
        for k in range(n_categories):
            present = npig[:, k] > 0
            if not present.any():
                continue
            rank_ok = self._ranks(k) < max_det
            det_image = self.det_image[self.det_offsets[k]:self.det_offsets[k + 1]][rank_ok]
            bits = self.det_bits[self.det_offsets[k]:self.det_offsets[k + 1]][rank_ok, area]
            weights, cumulative = image_weights(counts, det_image)
            needed = min_count_reaching(RECALL_THRESHOLDS, npig[:, k])
            for t in range(n_thresholds):
                matched, ignored = bits[:, t, 0], bits[:, t, 1]
                q, tp_total = ranked_precision(weights, cumulative, matched & ~ignored, ignored, needed, COCO_RULE)
                precision[:, k, t] = np.where(present[:, None], q, -1.0)
                with np.errstate(divide="ignore", invalid="ignore"):
                    recall[:, k, t] = np.where(present, tp_total / npig[:, k], -1.0)
        return precision.transpose(0, 2, 3, 1), recall.transpose(0, 2, 1)

    def _ranks(self, k: int) -> np.ndarray:
        """Each detection of category k's rank among its image's detections: int64 [N_k]."""
        det_image = self.det_image[self.det_offsets[k]:self.det_offsets[k + 1]]
        order = np.argsort(det_image, kind="stable")
        grouped = det_image[order]
        starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
        rank_sorted = np.arange(len(grouped)) - np.repeat(starts, np.diff(np.r_[starts, len(grouped)]))
        ranks = np.empty(len(grouped), dtype=np.int64)
        ranks[order] = rank_sorted
        return ranks

    def _summarize(self, precision: np.ndarray, recall: np.ndarray, line: _Stat) -> np.ndarray:
        """summarize's `np.mean(s[s > -1])` per resample, in percent: float64 [B]."""
        values = precision if line.ap else recall
        if line.iou is not None:
            values = values[:, np.where(line.iou == self.iou_thresholds)[0]]
        out = np.empty(len(values))
        for b, s in enumerate(values):
            kept = s[s > -1]
            out[b] = stat_percent(np.mean(kept)) if len(kept) else math.nan
        return out


def score_results_with_statistics(coco_gt: COCO, results: list[dict[str, Any]],
                                  image_ids: Sequence[int]) -> tuple[dict[str, float], CocoImageStats]:
    """`coco_eval.score_results` and the cell's `CocoImageStats` from one per-image evaluation.

    With no results at all the metrics are 0 (as score_results) and the statistics hold the
    image ids and no detection (every resample then scores 0).
    """
    if not results:
        metrics = {key: 0.0 for key in METRICS}
        return metrics, _empty_statistics(coco_gt, image_ids)
    evaluator = evaluate_segm(coco_gt, results, image_ids)
    stats = CocoImageStats.from_evaluator(evaluator)
    return summarize_metrics(evaluator), stats


def _empty_statistics(coco_gt: COCO, image_ids: Sequence[int]) -> CocoImageStats:
    """The statistics of a cell without any result (their rescore is all 0)."""
    n_areas, n_thresholds, n_categories = len(AREA_LABELS), len(IOU_THRESHOLDS), len(coco_gt.getCatIds())
    return CocoImageStats(image_ids=np.unique(np.asarray(image_ids, dtype=np.int64)),
                          category_ids=np.unique(np.asarray(coco_gt.getCatIds(), dtype=np.int64)),
                          iou_thresholds=IOU_THRESHOLDS, max_dets=np.asarray(sorted(MAX_DETS), dtype=np.int64),
                          det_offsets=np.zeros(n_categories + 1, dtype=np.int64),
                          det_image=np.zeros(0, dtype=np.int32),
                          det_bits=np.zeros((0, n_areas, n_thresholds, 2), dtype=bool),
                          gt_category=np.zeros(0, dtype=np.int32), gt_image=np.zeros(0, dtype=np.int32),
                          gt_npig=np.zeros((0, n_areas), dtype=np.int32))
