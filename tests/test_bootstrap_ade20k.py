"""ADE20K re-scoring by re-summing per-image counts: the identity resample gives the
accumulator's summary bit for bit (real slice, demo split), a duplicated image equals adding it
twice, storage round trip, two bootstrap seeds agree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ptqbench.tasks.ade20k_bootstrap import AdeImageStats, score_prediction_folder_with_statistics
from ptqbench.tasks.ade20k_metric import (
    IoUAccumulator,
    annotation_files,
    read_annotation,
    score_prediction_folder,
)
from ptqbench.tasks.bootstrap import bootstrap_intervals, paired_difference_intervals


def noisy_predictions(data_root: Path, out: Path, seed: int) -> list[np.ndarray]:
    """Write `<stem>.png` per validation annotation: the labels with 30% of pixels replaced by
    random classes (and some 255); returns the labels in order."""
    rng = np.random.default_rng(seed)
    out.mkdir()
    labels = []
    for path in annotation_files(data_root, "validation"):
        label = read_annotation(path)
        pred = label.copy()
        noise = rng.random(label.shape) < 0.3
        pred[noise] = rng.choice([0, 1, 5, 17, 149, 255], int(noise.sum()))
        Image.fromarray(pred).save(out / path.name)
        labels.append(label)
    return labels


def assert_identity_exact(data_root: Path, pred_dir: Path) -> AdeImageStats:
    metrics, stats = score_prediction_folder_with_statistics(pred_dir, data_root)
    reference = score_prediction_folder(pred_dir, data_root)
    assert metrics == reference
    rescored = stats.rescore(np.ones((1, len(stats.image_names)), dtype=np.int64))
    assert {key: values[0] for key, values in rescored.items()} == reference
    return stats


def test_identity_on_the_real_slice(realdata, tmp_path):
    noisy_predictions(realdata, tmp_path / "pred", seed=1)
    stats = assert_identity_exact(realdata, tmp_path / "pred")
    assert list(stats.image_names) == ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"]


@pytest.fixture()
def demo_cell(small_demo, tmp_path):
    noisy_predictions(small_demo, tmp_path / "pred", seed=0)
    return small_demo, tmp_path / "pred"


def test_identity_on_the_demo_split(demo_cell):
    assert_identity_exact(*demo_cell)


def test_duplicated_image_equals_adding_it_twice(demo_cell):
    data_root, pred_dir = demo_cell
    _, stats = score_prediction_folder_with_statistics(pred_dir, data_root)
    files = annotation_files(data_root, "validation")
    accumulator = IoUAccumulator()
    for path, times in zip(files, (1, 2)):
        label = read_annotation(path)
        pred = np.array(Image.open(pred_dir / path.name))
        for _ in range(times):
            accumulator.add(pred, label)
    rescored = stats.rescore(np.array([[1, 2]]))
    assert {key: values[0] for key, values in rescored.items()} == accumulator.summary()
    assert np.isnan(stats.rescore(np.array([[0, 0]]))["mIoU"][0])  # no image: nothing defined


def test_storage_round_trip_and_limit(demo_cell):
    data_root, pred_dir = demo_cell
    metrics, stats = score_prediction_folder_with_statistics(pred_dir, data_root, limit=1)
    assert metrics == score_prediction_folder(pred_dir, data_root, limit=1) and len(stats.image_names) == 1
    back = AdeImageStats.from_arrays(dict(stats.to_arrays()))
    assert stats.to_arrays()["intersect"].dtype == np.int32
    counts = np.array([[3], [0], [1]])
    for key, values in stats.rescore(counts).items():
        np.testing.assert_array_equal(back.rescore(counts)[key], values)
    with pytest.raises(ValueError, match="keep_images=True"):
        AdeImageStats.from_accumulator(IoUAccumulator(), ["a"])


def test_two_seeds_agree_on_many_images():
    """60 synthetic images of uneven quality: the intervals of two seeds agree and hold the point."""
    rng = np.random.default_rng(0)
    accumulator = IoUAccumulator(keep_images=True)
    for _ in range(60):
        label = rng.integers(0, 12, size=(24, 24)).astype(np.uint8)
        pred = np.where(rng.random(label.shape) < rng.uniform(0.1, 0.9), label, rng.integers(0, 12, label.shape))
        accumulator.add(pred, label)
    stats = AdeImageStats.from_accumulator(accumulator, [f"img{i}" for i in range(60)])
    point = accumulator.summary()
    first, second = bootstrap_intervals(stats, seed=0), bootstrap_intervals(stats, seed=1)
    for key, interval in first.items():
        width = interval.high - interval.low
        assert abs(interval.low - second[key].low) < 0.1 * width
        assert abs(interval.high - second[key].high) < 0.1 * width
        assert interval.low < point[key] < interval.high and second[key].low < point[key] < second[key].high
    assert set(paired_difference_intervals(stats, stats, resamples=100).values()) == {type(first["mIoU"])(0.0, 0.0)}
