"""DOTA re-scoring with the devkit rule: the identity resample gives `evaluate_task1` bit for bit
(real DOTA slice, demo split, tied scores included), a duplicated image gives the devkit's
numbers on a split holding the image twice, a hand-computed case, storage round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ptqbench.tasks.bootstrap import bootstrap_intervals, paired_difference_intervals
from ptqbench.tasks.dota_bootstrap import DotaImageStats, evaluate_task1_with_statistics
from ptqbench.tasks.dota_eval import (
    METRIC_KEYS,
    DotaLabels,
    Task1Detections,
    evaluate_task1,
    list_split,
    read_split_labels,
)


def split_labels(root: Path) -> dict[str, DotaLabels]:
    return read_split_labels(list_split(root / "DOTA" / "val"))


def jittered_detections(labels: dict[str, DotaLabels], seed: int, decimals: int | None) -> dict[str, Task1Detections]:
    """Per class: every GT polygon shifted by up to 40% of its size (TPs, FPs, hits on difficult
    GT), a second copy of every fifth (duplicates: FP), scores rounded to `decimals` (ties)."""
    rng = np.random.default_rng(seed)
    lines: dict[str, list[tuple[str, float, np.ndarray]]] = {}
    for image, objects in labels.items():
        for k, (polygon, name) in enumerate(zip(objects.polygons, objects.names)):
            size = np.ptp(polygon[0::2]) + np.ptp(polygon[1::2])
            for _ in range(2 if k % 5 == 0 else 1):
                moved = polygon + np.repeat(rng.uniform(-0.2, 0.2, 2)[None], 4, axis=0).ravel() * size
                score = rng.random() if decimals is None else round(rng.random(), decimals)
                lines.setdefault(name, []).append((image, score, moved))
    return {name: Task1Detections(image_ids=tuple(line[0] for line in found),
                                  scores=np.array([line[1] for line in found]),
                                  polygons=np.array([line[2] for line in found]).reshape(-1, 8))
            for name, found in lines.items()}


def assert_identity_exact(labels, detections) -> DotaImageStats:
    metrics, stats = evaluate_task1_with_statistics(labels, detections)
    reference = evaluate_task1(labels, detections)
    assert metrics == reference
    rescored = stats.rescore(np.ones((1, len(labels)), dtype=np.int64))
    assert tuple(rescored) == METRIC_KEYS
    np.testing.assert_array_equal([rescored[key][0] for key in METRIC_KEYS], [reference[key] for key in METRIC_KEYS])
    return stats


@pytest.mark.parametrize("decimals", [None, 1])
def test_identity_on_the_real_slice(realdata, decimals):
    labels = split_labels(realdata)
    stats = assert_identity_exact(labels, jittered_detections(labels, 0, decimals))
    outcomes = np.bincount(stats.det_outcome, minlength=3)
    assert outcomes.min() > 0  # TPs, FPs and hits on difficult GT all present


def test_identity_on_the_demo_split(small_demo):
    labels = split_labels(small_demo)
    assert_identity_exact(labels, jittered_detections(labels, 1, 1))


def with_copies(labels, detections, copies: dict[str, str]):
    """The split and detections with image `old` also present as `new` (same objects and lines)."""
    labels = dict(labels)
    for new, old in copies.items():
        labels[new] = labels[old]
    out = {}
    for name, found in detections.items():
        extra = [(new, k) for new, old in copies.items() for k, image in enumerate(found.image_ids) if image == old]
        keep = [k for _, k in extra]
        out[name] = Task1Detections(image_ids=found.image_ids + tuple(new for new, _ in extra),
                                    scores=np.r_[found.scores, found.scores[keep]],
                                    polygons=np.vstack([found.polygons, found.polygons[keep]]))
    return labels, out


def test_duplicated_image_matches_the_devkit_on_a_split_holding_the_copy(realdata):
    labels = split_labels(realdata)
    detections = jittered_detections(labels, 2, None)  # distinct scores: the devkit's order is defined
    _, stats = evaluate_task1_with_statistics(labels, detections)
    names = list(labels)
    for counts, copies in (([2, 1], {"P0706_copy": names[0]}),
                           ([1, 3], {"P1888_a": names[1], "P1888_b": names[1]}),
                           ([0, 1], None)):
        rescored = stats.rescore(np.array([counts]))
        if copies is None:
            reference = evaluate_task1({names[1]: labels[names[1]]},
                                       {name: _only(found, names[1]) for name, found in detections.items()})
        else:
            reference = evaluate_task1(*with_copies(labels, detections, copies))
        np.testing.assert_array_equal([rescored[key][0] for key in METRIC_KEYS],
                                      [reference[key] for key in METRIC_KEYS])


def _only(found: Task1Detections, image: str) -> Task1Detections:
    keep = [k for k, name in enumerate(found.image_ids) if name == image]
    return Task1Detections(tuple(found.image_ids[k] for k in keep), found.scores[keep], found.polygons[keep])


def box(x0, y0, x1, y1):
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def test_hand_computed_duplicate():
    """Image A: one plane, found (0.9). Image B: one plane, a miss (0.8) then a hit (0.7).
    Identity: rec .5 @ prec 1, rec 1 @ prec 2/3 -> AP = (6 x 1 + 5 x 2/3) / 11.
    B twice: hit, miss, miss, hit, hit -> rec 1/3 @ 1, rec 1 @ 0.6 -> AP = (4 + 7 x 0.6) / 11."""
    labels = {"A": DotaLabels(np.array([box(0, 0, 10, 10)], float), ("plane",), np.zeros(1, bool)),
              "B": DotaLabels(np.array([box(50, 50, 60, 60)], float), ("plane",), np.zeros(1, bool))}
    detections = {"plane": Task1Detections(("A", "B", "B"), np.array([0.9, 0.8, 0.7]),
                                           np.array([box(0, 0, 10, 10), box(20, 20, 30, 30), box(50, 50, 60, 60)],
                                                    float))}
    _, stats = evaluate_task1_with_statistics(labels, detections)
    rescored = stats.rescore(np.array([[1, 1], [1, 2], [0, 0]]))
    assert rescored["AP_plane"][0] == pytest.approx(100 * (6 + 5 * 2 / 3) / 11)
    assert rescored["AP_plane"][1] == pytest.approx(100 * (4 + 7 * 0.6) / 11)
    assert rescored["AP_plane"][2] == 0.0  # no image: npos 0
    assert rescored["mAP"][1] == pytest.approx(rescored["AP_plane"][1] / 15)


def test_storage_round_trip_and_intervals(realdata):
    labels = split_labels(realdata)
    _, stats = evaluate_task1_with_statistics(labels, jittered_detections(labels, 3, 2))
    back = DotaImageStats.from_arrays({key: np.array(value) for key, value in stats.to_arrays().items()})
    counts = np.random.default_rng(0).integers(0, 3, size=(5, len(labels)))
    for key, values in stats.rescore(counts).items():
        np.testing.assert_array_equal(back.rescore(counts)[key], values)
    intervals = bootstrap_intervals(stats, resamples=100, metrics=("mAP",))
    assert set(intervals) == {"mAP"} and intervals["mAP"].low <= intervals["mAP"].high
    assert paired_difference_intervals(stats, back, resamples=100)["mAP"] == type(intervals["mAP"])(0.0, 0.0)
