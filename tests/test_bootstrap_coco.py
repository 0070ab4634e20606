"""COCO re-scoring from pycocotools' per-image evaluation: the identity resample gives
`score_results` bit for bit (real COCO slice, demo split, pycocotools' default maxDets), a
duplicated image gives what pycocotools gives on a split holding the image twice (and the
hand-computed AP), storage round trip, and the issue's two-seed agreement test."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest

from ptqbench.tasks.bootstrap import bootstrap_intervals, paired_difference_intervals
from ptqbench.tasks.coco import load_split
from ptqbench.tasks.coco_bootstrap import CocoImageStats, score_results_with_statistics
from ptqbench.tasks.coco_eval import METRICS, mask_results, score_results, stat_percent

REALDATA = Path(__file__).parents[2] / "shared" / "realdata"
VAL_DETS = REALDATA / "coco" / "detections" / "yolov5n_val2017_bbox.json"

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def box_mask(height: int, width: int, box) -> np.ndarray:
    """bool [H, W], True inside the xywh box (outward-rounded)."""
    x, y, w, h = box
    mask = np.zeros((height, width), dtype=bool)
    mask[int(y):int(math.ceil(y + h)), int(x):int(math.ceil(x + w))] = True
    return mask


def box_results(coco, detections) -> list[dict]:
    """Segm results entries: each detection's box filled, with its category and score."""
    results = []
    for image_id in sorted({d["image_id"] for d in detections}):
        info = coco.imgs[image_id]
        ours = [d for d in detections if d["image_id"] == image_id]
        masks = np.stack([box_mask(info["height"], info["width"], d["bbox"]) for d in ours])
        results += mask_results(image_id, masks, np.array([d["category_id"] for d in ours]),
                                np.array([d["score"] for d in ours]))
    return results


def jittered_gt_results(coco, seed: int) -> list[dict]:
    """Each non-crowd GT box jittered (IoU spread over 0.5..1), plus one random box per image."""
    rng = np.random.default_rng(seed)
    detections = []
    for ann in coco.dataset["annotations"]:
        if not ann["iscrowd"]:
            x, y, w, h = ann["bbox"]
            shift = rng.uniform(-0.2, 0.2, 2) * [w, h]
            detections.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                               "bbox": [max(x + shift[0], 0), max(y + shift[1], 0), w, h], "score": rng.random()})
    for image_id, info in coco.imgs.items():
        detections.append({"image_id": image_id, "category_id": coco.dataset["categories"][0]["id"],
                           "bbox": [0, 0, info["width"] / 3, info["height"] / 3], "score": rng.random()})
    return box_results(coco, detections)


def identity(stats: CocoImageStats) -> np.ndarray:
    return np.ones((1, len(stats.image_ids)), dtype=np.int64)


def assert_identity_exact(coco, results, image_ids) -> CocoImageStats:
    metrics, stats = score_results_with_statistics(coco, results, image_ids)
    reference = score_results(coco, results, image_ids)
    assert metrics == pytest.approx(reference, nan_ok=True, rel=0, abs=0)
    rescored = stats.rescore(identity(stats), METRICS)
    np.testing.assert_array_equal([rescored[key][0] for key in METRICS], [reference[key] for key in METRICS])
    return stats


@pytest.fixture(scope="module")
def real_cell():
    """The real COCO slice scored with YOLOv5n's boxes as masks: (split, results, stats)."""
    if not VAL_DETS.is_file():
        pytest.skip("../shared/realdata is absent")
    import json

    split = load_split(REALDATA, "val2017")
    results = box_results(split.coco, json.loads(VAL_DETS.read_text()))
    return split, results, assert_identity_exact(split.coco, results, split.image_ids)


def test_identity_on_the_real_slice_is_bit_exact_for_all_twelve_metrics(real_cell):
    _, results, stats = real_cell
    assert len(stats.det_image) == len(results) and len(stats.image_ids) == 32


def test_identity_on_jittered_gt_masks_of_the_real_slice(realdata):
    split = load_split(realdata, "val2017")
    assert_identity_exact(split.coco, jittered_gt_results(split.coco, seed=0), split.image_ids)


def test_identity_on_the_demo_split(small_demo):
    split = load_split(small_demo, "val2017")
    assert_identity_exact(split.coco, jittered_gt_results(split.coco, seed=1), split.image_ids)


def test_identity_with_pycocotools_default_max_dets(real_cell):
    """maxDets [1, 10, 100]: the cut at 1 and 10 detections per image is re-done per resample."""
    from pycocotools.cocoeval import COCOeval

    split, results, _ = real_cell
    evaluator = COCOeval(split.coco, split.coco.loadRes([dict(r) for r in results]), iouType="segm")
    evaluator.params.imgIds = list(split.image_ids)
    evaluator.evaluate()
    stats = CocoImageStats.from_evaluator(evaluator)
    evaluator.accumulate()
    evaluator.summarize()
    rescored = stats.rescore(identity(stats), METRICS)
    np.testing.assert_array_equal([rescored[key][0] for key in METRICS], [stat_percent(s) for s in evaluator.stats])


def gt_annotation(ann_id: int, image_id: int, box) -> dict:
    """A non-crowd category-1 GT annotation whose mask is its box (RLE)."""
    rle = mask_results(image_id, box_mask(100, 100, box)[None], [1], [1.0])[0]["segmentation"]
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "iscrowd": 0, "bbox": list(box),
            "area": float(box[2] * box[3]), "segmentation": rle}


def tiny_coco(image_ids, copy_of=None):
    """Two 100x100 images, category 1: image 1 has one GT and a perfect detection (0.9); image 2
    one GT, a false positive (0.8) and a perfect detection (0.7). copy_of {new id: id} adds copies."""
    from pycocotools.coco import COCO

    gts = {1: [(10, 10, 40, 40)], 2: [(50, 50, 30, 30)]}
    dets = {1: [((10, 10, 40, 40), 0.9)], 2: [((0, 0, 20, 20), 0.8), ((50, 50, 30, 30), 0.7)]}
    for new, old in (copy_of or {}).items():
        gts[new], dets[new] = gts[old], dets[old]
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "height": 100, "width": 100} for i in gts],
                    "categories": [{"id": 1, "name": "thing"}],
                    "annotations": [gt_annotation(10 * i + j + 1, i, box)
                                    for i, boxes in gts.items() for j, box in enumerate(boxes)]}
    coco.createIndex()
    results = [entry for i, found in dets.items()
               for entry in mask_results(i, np.stack([box_mask(100, 100, b) for b, _ in found]), [1] * len(found),
                                         np.array([s for _, s in found]))]
    return coco, results, sorted(gts) if image_ids is None else image_ids


def test_duplicated_image_matches_pycocotools_on_a_split_with_the_copy():
    coco, results, image_ids = tiny_coco([1, 2])
    _, stats = score_results_with_statistics(coco, results, image_ids)
    for counts, copies, hand_ap in (([1, 1], {}, (51 + 50 * 2 / 3) / 101),
                                    ([1, 2], {3: 2}, (34 + 67 * 0.6) / 101),
                                    ([2, 1], {0: 1}, (67 + 34 * 0.75) / 101)):
        rescored = stats.rescore(np.array([counts]), METRICS)
        copy_coco, copy_results, copy_ids = tiny_coco(None, copies)
        reference = score_results(copy_coco, copy_results, copy_ids)
        np.testing.assert_array_equal([rescored[key][0] for key in METRICS], [reference[key] for key in METRICS])
        assert rescored["mask_AP"][0] == pytest.approx(100 * hand_ap)  # the same AP at every IoU threshold


def test_an_image_left_out_and_no_ground_truth_left():
    coco, results, image_ids = tiny_coco([1, 2])
    _, stats = score_results_with_statistics(coco, results, image_ids)
    only_second = stats.rescore(np.array([[0, 3]]), ("mask_AP", "APs", "APm"))
    copy_coco, copy_results, _ = tiny_coco(None, {3: 2, 4: 2})
    reference = score_results(copy_coco, copy_results, [2, 3, 4])
    assert only_second["mask_AP"][0] == reference["mask_AP"]
    assert only_second["APs"][0] == reference["APs"]
    assert math.isnan(only_second["APm"][0]) and math.isnan(reference["APm"])  # no medium GT left: -1 -> NaN


def test_storage_round_trip_and_no_results(real_cell, realdata):
    _, _, stats = real_cell
    arrays = stats.to_arrays()
    assert all(isinstance(value, np.ndarray) for value in arrays.values())
    assert arrays["det_bits"].dtype == np.uint8 and arrays["det_bits"].shape == (len(stats.det_image), 10)
    back = CocoImageStats.from_arrays(dict(np.load(saved(arrays), allow_pickle=False)))
    counts = np.random.default_rng(0).integers(0, 3, size=(4, len(stats.image_ids)))
    for key, values in stats.rescore(counts, METRICS).items():
        np.testing.assert_array_equal(back.rescore(counts, METRICS)[key], values)
    split = load_split(realdata, "val2017")
    metrics, empty = score_results_with_statistics(split.coco, [], split.image_ids)
    assert metrics == {key: 0.0 for key in METRICS}
    assert all(not values.any() for values in empty.rescore(counts).values())


def saved(arrays):
    """The arrays through np.savez_compressed (as the store may keep them), as a file-like object."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    buffer.seek(0)
    return buffer


def test_two_bootstrap_seeds_agree_and_contain_the_point_estimate(real_cell):
    split, results, stats = real_cell
    point = score_results(split.coco, results, split.image_ids)
    first, second = bootstrap_intervals(stats, seed=0), bootstrap_intervals(stats, seed=1)
    assert set(first) == {"mask_AP", "AP50", "AP75"}
    for key, interval in first.items():
        other = second[key]
        width = interval.high - interval.low
        assert width > 1.0  # 32 images: a real interval, not a point
        assert abs(interval.low - other.low) < 0.1 * width and abs(interval.high - other.high) < 0.1 * width
        for bounds in (interval, other):
            assert bounds.low < point[key] < bounds.high
    assert set(paired_difference_intervals(stats, stats, resamples=200).values()) == {type(first["mask_AP"])(0.0, 0.0)}
