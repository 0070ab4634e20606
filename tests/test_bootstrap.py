"""The bootstrap core: seeded resampling, percentile and paired intervals, and the ranked-list
precision that COCO and DOTA re-score with (against a direct transcription of both references
on the expanded list)."""

from __future__ import annotations

import numpy as np
import pytest

from ptqbench.tasks.bootstrap import (
    CHUNK,
    Interval,
    bootstrap_intervals,
    image_counts,
    paired_difference_intervals,
    percentile_interval,
    resample_indices,
    resampled_metrics,
)
from ptqbench.tasks.ranked_precision import (
    COCO_RULE,
    VOC_RULE,
    image_weights,
    min_count_reaching,
    ranked_precision,
)

COCO_RECALLS = np.linspace(0.0, 1.00, 101, endpoint=True)
VOC_RECALLS = np.arange(0.0, 1.1, 0.1)


class MeanOfImages:
    """Toy statistics: the metric is the mean of per-image values, rounded to 1e-6 so that sums
    are exact whatever the chunk (integer micro-units)."""

    def __init__(self, values: np.ndarray) -> None:
        self.micro = np.round(values * 1e6).astype(np.int64)
        self.image_keys = np.arange(len(values))

    def rescore(self, counts, metrics=None):
        return {"mean": (counts @ self.micro) / counts.sum(axis=1) / 1e6}


def test_resample_indices_are_seeded_and_drawn_with_replacement():
    first, again = resample_indices(40, 300, seed=7), resample_indices(40, 300, seed=7)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (300, 40) and first.dtype == np.int64
    assert first.min() == 0 and first.max() == 39
    assert any(len(np.unique(row)) < 40 for row in first)  # with replacement
    assert not np.array_equal(first, resample_indices(40, 300, seed=8))
    np.testing.assert_array_equal(first, np.random.default_rng(7).integers(0, 40, size=(300, 40)))
    assert resample_indices(40, 0).shape == (0, 40)


def test_image_counts():
    counts = image_counts(np.array([[0, 0, 2], [1, 2, 2]]), 4)
    np.testing.assert_array_equal(counts, [[2, 0, 1, 0], [0, 1, 2, 0]])


def test_percentile_interval_and_nan_resamples():
    values = np.arange(1001, dtype=np.float64)
    assert percentile_interval(values) == Interval(25.0, 975.0)
    assert percentile_interval(np.r_[values, np.nan, np.nan]) == Interval(25.0, 975.0)
    nan_interval = percentile_interval(np.full(5, np.nan))
    assert np.isnan(nan_interval.low) and np.isnan(nan_interval.high)


def test_chunking_does_not_change_the_resamples():
    stats = MeanOfImages(np.random.default_rng(0).random(30))
    resamples = 2 * CHUNK + 3
    values = resampled_metrics(stats, resamples, seed=3)["mean"]
    counts = image_counts(resample_indices(30, resamples, seed=3), 30)
    np.testing.assert_array_equal(values, stats.rescore(counts)["mean"])


def test_bootstrap_off_and_deterministic():
    stats = MeanOfImages(np.random.default_rng(1).random(50))
    assert bootstrap_intervals(stats, resamples=0) == {}
    assert paired_difference_intervals(stats, stats, resamples=0) == {}
    assert bootstrap_intervals(stats, seed=4) == bootstrap_intervals(stats, seed=4)
    assert bootstrap_intervals(stats, seed=4) != bootstrap_intervals(stats, seed=5)


def test_paired_difference_of_a_cell_with_itself_is_exactly_zero():
    stats = MeanOfImages(np.random.default_rng(2).random(50))
    assert paired_difference_intervals(stats, stats) == {"mean": Interval(0.0, 0.0)}


def test_paired_interval_is_narrower_than_the_unpaired_spread():
    rng = np.random.default_rng(3)
    base = rng.random(200)
    cell, reference = MeanOfImages(base + 0.01 + 0.001 * rng.random(200)), MeanOfImages(base)
    paired = paired_difference_intervals(cell, reference)["mean"]
    assert 0.0 < paired.low < paired.high < 0.02  # the shift is clear only when paired
    single = bootstrap_intervals(reference)["mean"]
    assert single.high - single.low > 10 * (paired.high - paired.low)
    with pytest.raises(ValueError, match="same images"):
        paired_difference_intervals(MeanOfImages(base[:100]), reference)


# --- ranked precision against the references on the expanded list ---

def expanded(outcome: np.ndarray, det_image: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The ranked list of one resample: each detection repeated counts[image] times in place."""
    return np.repeat(outcome, counts[det_image])


def coco_reference(outcome: np.ndarray, npig: int) -> np.ndarray:
    """pycocotools' accumulate for one (t, k, a, m): outcome 1 TP / 0 FP / 2 ignored [D]."""
    tps, fps = outcome == 1, outcome == 0
    tp, fp = np.cumsum(tps).astype(float), np.cumsum(fps).astype(float)
    rc, pr = tp / npig, (tp / (fp + tp + np.spacing(1))).tolist()
    for i in range(len(tp) - 1, 0, -1):
        if pr[i] > pr[i - 1]:
            pr[i - 1] = pr[i]
    q = np.zeros(len(COCO_RECALLS))
    for ri, pi in enumerate(np.searchsorted(rc, COCO_RECALLS, side="left")):
        if pi >= len(pr):
            break
        q[ri] = pr[pi]
    return q


def voc_reference(outcome: np.ndarray, npos: int) -> np.ndarray:
    """The devkit's max(prec[rec >= t]) for each VOC07 threshold."""
    tp, fp = np.cumsum(outcome == 1).astype(float), np.cumsum(outcome == 0).astype(float)
    rec, prec = tp / float(npos), tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return np.array([np.max(prec[rec >= t]) if np.sum(rec >= t) else 0.0 for t in VOC_RECALLS])


@pytest.mark.parametrize("seed", range(6))
def test_ranked_precision_equals_the_references_on_the_expanded_list(seed):
    rng = np.random.default_rng(seed)
    n_images, n_dets = 7, 40
    det_image = rng.integers(0, n_images, n_dets)
    outcome = rng.choice([0, 1, 2], n_dets, p=[0.5, 0.4, 0.1])
    npos_per_image = np.bincount(det_image[outcome == 1], minlength=n_images) + rng.integers(0, 3, n_images)
    resampled = image_counts(resample_indices(n_images, 30, seed), n_images)
    counts = np.vstack([np.ones(n_images, dtype=np.int64), resampled])
    npos = counts @ npos_per_image
    weights, cumulative = image_weights(counts, det_image)
    for rule, recalls, reference in ((COCO_RULE, COCO_RECALLS, coco_reference), (VOC_RULE, VOC_RECALLS, voc_reference)):
        q, tp_total = ranked_precision(weights, cumulative, outcome == 1, outcome == 2,
                                       min_count_reaching(recalls, npos), rule)
        for b in range(len(counts)):
            if npos[b] == 0:
                continue
            ranked = expanded(outcome, det_image, counts[b])
            np.testing.assert_array_equal(q[b], reference(ranked, int(npos[b])))
            assert tp_total[b] == np.sum(ranked == 1)


def test_min_count_reaching_is_the_exact_float_test():
    npos = np.arange(1, 400)
    needed = min_count_reaching(COCO_RECALLS, npos)
    n = npos.astype(np.float64)[:, None]
    assert np.all(needed / n >= COCO_RECALLS)
    assert np.all((needed == 0) | ((needed - 1) / n < COCO_RECALLS))
    np.testing.assert_array_equal(min_count_reaching(VOC_RECALLS, np.array([0, 10]))[0], 0)
    assert min_count_reaching(VOC_RECALLS, np.array([10]))[0, 3] == 4  # 3/10 < 0.30000000000000004


def test_no_true_positive_gives_zero_precision():
    weights, cumulative = image_weights(np.ones((2, 2), dtype=np.int64), np.array([0, 1]))
    q, tp_total = ranked_precision(weights, cumulative, np.zeros(2, bool), np.zeros(2, bool),
                                   min_count_reaching(VOC_RECALLS, np.array([3, 3])), VOC_RULE)
    assert not q.any() and not tp_total.any()
    with pytest.raises(ValueError, match="unknown precision rule"):
        ranked_precision(weights, cumulative, np.ones(2, bool), np.zeros(2, bool),
                         min_count_reaching(VOC_RECALLS, np.array([3, 3])), "f1")
