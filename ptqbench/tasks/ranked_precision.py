"""Interpolated precision at recall thresholds of one ranked detection list whose images are
counted with multiplicity: the core that re-scores a bootstrap resample for COCO (pycocotools'
`accumulate`) and DOTA (the devkit's VOC07 AP) without re-running any matching.

A ranked list is the detections of one category in the order the reference evaluator ranks them
(scores descending, its own tie order), each flagged true positive, ignored, or false positive
(neither). A resample counts image i `c_i` times; the list it stands for repeats each detection
of image i `c_i` times in place (the copies of one detection adjacent), so the identity resample
(every `c_i` = 1) is the reference list itself. Both references then compute, at every position
j of the list, tp_j / fp_j (cumulative counts), rc_j = tp_j / npos and a precision pr_j, and for
each recall threshold r take

    q(r) = max { pr_j : rc_j >= r },  0 when no position reaches r

(pycocotools: the running maximum from the right at `searchsorted(rc, r, "left")`, 0 past the
end; the devkit: `max(prec[rec >= r])`, 0 when empty). Only positions right after a true positive
can attain that maximum: a false positive or ignored position has the recall of the last
true-positive position before it and no higher precision (or precision 0 when none came before),
and of the c copies of one true positive the last has both the highest recall and the highest
precision. So q(r) is evaluated on the true positives alone, with weighted cumulative counts,
and every precision is the same float operation on the same integer counts as in the reference:
the identity resample reproduces it bit for bit.
"""

from __future__ import annotations

import numpy as np

COCO_RULE = "coco"  # pr = tp / (fp + tp + spacing(1))          (pycocotools' accumulate)
VOC_RULE = "voc"    # pr = tp / max(tp + fp, eps(float64))      (DOTA_devkit's voc_eval)


def image_weights(counts: np.ndarray, det_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-detection multiplicities of a ranked list and their running sums.

    counts: int64 [B, I] (how often each image is in each resample); det_image: int [D] (the
    image index of each detection, in ranked order). Returns (weights, cumulative) int64 [B, D].
    """
    weights = counts[:, det_image]
    return weights, np.cumsum(weights, axis=1)


def min_count_reaching(thresholds: np.ndarray, npos: np.ndarray) -> np.ndarray:
    """The least integer v >= 0 with float64(v) / float64(n) >= r, for each resample's n and
    each threshold r (the exact float test both references make on recall).

    thresholds: float64 [R]; npos: int64 [B], > 0 (rows with npos 0 get 0). Returns int64 [B, R].
    """
    n = np.maximum(npos, 1).astype(np.float64)[:, None]
    count = np.maximum(np.ceil(thresholds[None, :] * n) - 2.0, 0.0)
    while True:
        short = count / n < thresholds[None, :]
        if not short.any():
            break
        count = count + short
    count[npos <= 0] = 0.0
    return count.astype(np.int64)


def _first_at_least(cumulative: np.ndarray, needed: np.ndarray) -> np.ndarray:
    """Row-wise `searchsorted(cumulative[b], needed[b], "left")`, exact on integers.

    cumulative: int64 [B, n] nondecreasing per row; needed: int64 [B, R]. Returns int64 [B, R]
    (n where no entry of the row reaches the value).
    """
    rows, width = cumulative.shape
    stride = int(max(cumulative.max(initial=0), needed.max(initial=0))) + 1
    offsets = np.arange(rows, dtype=np.int64)[:, None] * stride
    flat = (cumulative + offsets).ravel()
    found = np.searchsorted(flat, (needed + offsets).ravel(), side="left").reshape(needed.shape)
    return found - np.arange(rows, dtype=np.int64)[:, None] * width


def ranked_precision(weights: np.ndarray, cumulative: np.ndarray, tp: np.ndarray, ignored: np.ndarray,
                     needed: np.ndarray, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """q(r) (see the module docstring) of one ranked list for every resample, and its true positives.

    weights, cumulative: int64 [B, D] from `image_weights`; tp, ignored: bool [D] (disjoint; the
    rest are false positives); needed: int64 [B, R] `min_count_reaching(thresholds, npos)` of
    the resamples' positives npos [B] (rows with npos 0 are left to the caller: the references
    give -1 or 0 there); rule: COCO_RULE or VOC_RULE.
    Returns (precision float64 [B, R], total true positives int64 [B]).
    """
    rows = weights.shape[0]
    tp_pos = np.flatnonzero(tp)
    if tp_pos.size == 0:
        return np.zeros(needed.shape), np.zeros(rows, dtype=np.int64)
    tp_cum = np.cumsum(weights[:, tp_pos], axis=1)
    not_fp = tp_cum
    ig_pos = np.flatnonzero(ignored)
    if ig_pos.size:
        ig_cum = np.concatenate([np.zeros((rows, 1), dtype=np.int64), np.cumsum(weights[:, ig_pos], axis=1)], axis=1)
        not_fp = tp_cum + ig_cum[:, np.searchsorted(ig_pos, tp_pos)]
    tp_f = tp_cum.astype(np.float64)
    fp_f = (cumulative[:, tp_pos] - not_fp).astype(np.float64)
    if rule == COCO_RULE:
        precision = tp_f / (fp_f + tp_f + np.spacing(1))
    elif rule == VOC_RULE:
        precision = tp_f / np.maximum(tp_f + fp_f, np.finfo(np.float64).eps)
    else:
        raise ValueError(f"unknown precision rule {rule!r}")
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    first = _first_at_least(tp_cum, needed)
    inside = first < tp_pos.size
    at = np.take_along_axis(envelope, np.minimum(first, tp_pos.size - 1), axis=1)
    return np.where(inside, at, 0.0), tp_cum[:, -1]
