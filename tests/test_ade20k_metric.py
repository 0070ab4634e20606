"""mmsegmentation's IoU metric on ADE20K: hand-computed cases, label files, folder scoring."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ptqbench.errors import DataError
from ptqbench.tasks.ade20k_metric import (
    IoUAccumulator,
    intersect_and_union,
    read_annotation,
    reduce_zero_label,
    score_prediction_folder,
)

REAL_ADE = Path(__file__).parents[2] / "shared" / "realdata" / "ADEChallengeData2016"


def test_accumulates_over_the_split_not_per_image():
    # Image A (3 classes, 255 = ignore). Valid pixels: l0p0 ok, l0p1, l1p1 ok, l1p1 ok, l2p255.
    acc = IoUAccumulator(num_classes=3)
    acc.add(np.array([[0, 1, 1], [1, 0, 255]]), np.array([[0, 0, 1], [1, 255, 2]]))
    # Image B: l2p2 ok, l2p0; the ignored row's predictions count nowhere.
    acc.add(np.array([[2, 0], [2, 2]]), np.array([[2, 2], [255, 255]]))
    np.testing.assert_array_equal(acc.intersect, [1, 2, 1])
    np.testing.assert_array_equal(acc.pred_area, [2, 3, 1])
    np.testing.assert_array_equal(acc.label_area, [2, 2, 3])
    np.testing.assert_array_equal(acc.union, [3, 3, 3])
    summary = acc.summary()
    assert summary["mIoU"] == pytest.approx(100 * 4 / 9)            # mean(1/3, 2/3, 1/3)
    assert summary["mAcc"] == pytest.approx(100 * 11 / 18)          # mean(1/2, 1, 1/3)
    assert summary["aAcc"] == pytest.approx(100 * 4 / 7)
    # A per-image mean would give (mean(1/2, 2/3, 0) + mean(0, 1/2)) / 2 = 0.319..., not 0.444.


def test_absent_and_never_predicted_classes():
    label = np.full((2, 4), 5)
    pred = np.array([[5, 5, 7, 7], [5, 5, 7, 7]])
    acc = IoUAccumulator()
    acc.add(pred, label)
    # class 5: I 4, U 8 -> 0.5; class 7 predicted but absent: IoU 0 (counts), Acc NaN (skipped);
    # the other 148 classes have union 0: NaN, left out of the mean.
    assert np.count_nonzero(~np.isnan(acc.class_iou())) == 2
    summary = acc.summary()
    assert summary == pytest.approx({"mIoU": 25.0, "aAcc": 50.0, "mAcc": 50.0})


def test_class_in_gt_never_predicted_scores_zero():
    acc = IoUAccumulator()
    acc.add(np.array([[1, 1, 1, 255]]), np.array([[1, 1, 1, 2]]))
    # class 1: IoU 1; class 2: label 1 px, never predicted: IoU 0, Acc 0.
    assert acc.summary() == pytest.approx({"mIoU": 50.0, "aAcc": 75.0, "mAcc": 50.0})


def test_predictions_outside_the_classes_never_match():
    acc = IoUAccumulator()
    acc.add(np.array([[3, 150, 200, 255]]), np.array([[3, 3, 3, 3]]))
    np.testing.assert_array_equal(acc.pred_area.nonzero()[0], [3])
    assert acc.summary() == pytest.approx({"mIoU": 25.0, "aAcc": 25.0, "mAcc": 25.0})


def test_all_ignore_images_add_nothing():
    acc = IoUAccumulator()
    acc.add(np.array([[4, 9], [0, 255]]), np.full((2, 2), 255))
    assert acc.union.sum() == 0 and acc.images == 1
    summary = acc.summary()
    assert all(np.isnan(summary[key]) for key in ("mIoU", "aAcc", "mAcc"))
    acc.add(np.array([[1, 2]]), np.array([[1, 1]]))
    assert acc.summary() == pytest.approx({"mIoU": 25.0, "aAcc": 50.0, "mAcc": 50.0})


def test_matches_a_histc_reference():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    label = rng.integers(0, 150, size=(40, 50))
    label[rng.random(label.shape) < 0.2] = 255
    pred = np.where(rng.random(label.shape) < 0.5, label, rng.integers(0, 256, size=label.shape))
    # mmsegmentation's recipe: drop ignored pixels, torch.histc over [0, 149] with 150 bins.
    keep = label != 255
    p = torch.from_numpy(pred[keep]).float()
    t = torch.from_numpy(label[keep]).float()

    def histc(values):
        return torch.histc(values, bins=150, min=0, max=149).long().numpy()

    expected_i, expected_p, expected_l = histc(p[p == t]), histc(p), histc(t)
    intersect, union, pred_area, label_area = intersect_and_union(pred, label)
    np.testing.assert_array_equal(intersect, expected_i)
    np.testing.assert_array_equal(pred_area, expected_p)
    np.testing.assert_array_equal(label_area, expected_l)
    np.testing.assert_array_equal(union, expected_p + expected_l - expected_i)


def test_reduce_zero_label():
    raw = np.array([[0, 1, 2], [149, 150, 0]], dtype=np.uint8)
    np.testing.assert_array_equal(reduce_zero_label(raw), [[255, 0, 1], [148, 149, 255]])


def _write_split(root: Path, labels: dict[str, np.ndarray], split: str = "validation") -> Path:
    folder = root / "ADEChallengeData2016" / "annotations" / split
    folder.mkdir(parents=True)
    for stem, raw in labels.items():
        Image.fromarray(raw.astype(np.uint8)).save(folder / f"{stem}.png")
    return folder


def test_score_prediction_folder(tmp_path):
    # Raw ADE values: 0 = other (ignored), v = class v - 1.
    _write_split(tmp_path, {"a": np.array([[1, 1, 2], [2, 0, 3]]), "b": np.array([[3, 3], [0, 0]])})
    preds = tmp_path / "preds"
    preds.mkdir()
    Image.fromarray(np.array([[0, 1, 1], [1, 0, 255]], dtype=np.uint8)).save(preds / "a.png")
    Image.fromarray(np.array([[2, 0], [2, 2]], dtype=np.uint8)).save(preds / "b.png")
    scores = score_prediction_folder(preds, tmp_path)
    # The same counts as test_accumulates_over_the_split_not_per_image, classes 0..2.
    assert scores == pytest.approx({"mIoU": 100 * 4 / 9, "aAcc": 100 * 4 / 7,
                                    "mAcc": 100 * 11 / 18})
    only_a = score_prediction_folder(preds, tmp_path, limit=1)
    assert only_a == pytest.approx({"mIoU": 100 * (1 / 2 + 2 / 3 + 0) / 3, "aAcc": 60.0,
                                    "mAcc": 100 * (1 / 2 + 1 + 0) / 3})


def test_score_prediction_folder_errors(tmp_path):
    _write_split(tmp_path, {"a": np.ones((4, 5))})
    preds = tmp_path / "preds"
    preds.mkdir()
    with pytest.raises(DataError, match=r"missing prediction .*a\.png"):
        score_prediction_folder(preds, tmp_path)
    Image.fromarray(np.zeros((5, 4), dtype=np.uint8)).save(preds / "a.png")
    with pytest.raises(DataError, match=r"a\.png: size 4x5"):
        score_prediction_folder(preds, tmp_path)
    Image.fromarray(np.zeros((4, 5, 3), dtype=np.uint8)).save(preds / "a.png")
    with pytest.raises(DataError, match=r"a\.png: PNG mode 'RGB'"):
        score_prediction_folder(preds, tmp_path)
    with pytest.raises(DataError, match="no ADE20K annotation PNGs"):
        score_prediction_folder(preds, tmp_path, split="training")
    with pytest.raises(DataError, match="ADE20K not found"):
        score_prediction_folder(preds, tmp_path / "nowhere")


def test_bad_annotations(tmp_path):
    folder = _write_split(tmp_path, {"high": np.array([[1, 151]]), "rgb": np.zeros((2, 2))})
    Image.fromarray(np.zeros((2, 2, 3), dtype=np.uint8)).save(folder / "rgb.png")
    with pytest.raises(DataError, match=r"high\.png: label value 151 above 150"):
        read_annotation(folder / "high.png")
    with pytest.raises(DataError, match=r"rgb\.png: PNG mode 'RGB'"):
        read_annotation(folder / "rgb.png")
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png: cannot read PNG"):
        read_annotation(folder / "broken.png")


def test_real_ground_truth_as_prediction_scores_100(tmp_path):
    if not REAL_ADE.is_dir():
        pytest.skip("../shared/realdata is absent")
    preds = tmp_path / "preds"
    preds.mkdir()
    for path in sorted((REAL_ADE / "annotations" / "validation").glob("*.png")):
        Image.fromarray(read_annotation(path)).save(preds / path.name)
    scores = score_prediction_folder(preds, REAL_ADE.parent)
    assert scores == {"mIoU": 100.0, "aAcc": 100.0, "mAcc": 100.0}
    # The dataset folder itself is accepted as the data root too.
    assert score_prediction_folder(preds, REAL_ADE)["mIoU"] == 100.0
