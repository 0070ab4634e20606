"""The coco task on the real COCO slice: results writer, pycocotools scoring, prompts, calibration."""

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ptqbench.errors import DataError
from ptqbench.sam.inference import PendingMasks
from ptqbench.tasks.base import TASKS, TaskConfig
from ptqbench.tasks.coco import (METRICS, RESULTS_FILE, load_split, make_coco_task, mask_encoder, mask_results,
                                 score_results, score_results_file, write_results)

REALDATA = Path(__file__).parents[2] / "shared" / "realdata"
COCO_DIR = REALDATA / "coco"
VAL_DETS = COCO_DIR / "detections" / "yolov5n_val2017_bbox.json"
TRAIN_DETS = COCO_DIR / "detections" / "yolov5n_train2017_bbox.json"

pytestmark = [
    pytest.mark.skipif(not COCO_DIR.is_dir(), reason="../shared/realdata is absent"),
    # pycocotools' annToMask (used by the tests' oracle) trips a numpy 2 deprecation warning.
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def val():
    return load_split(REALDATA, "val2017")


def gt_results(split, image_ids=None):
    """Results entries made of the GT masks of every non-crowd annotation, score 1."""
    results = []
    for image_id in image_ids or split.image_ids:
        anns = [a for a in split.coco.imgToAnns[image_id] if not a["iscrowd"]]
        if anns:
            masks = np.stack([split.coco.annToMask(a).astype(bool) for a in anns])
            results += mask_results(image_id, masks, [a["category_id"] for a in anns], np.ones(len(anns)))
    return results


class StreamedFake:
    """`predict_stream`'s side of BoxPredictor (prepare, encode_many, launch_boxes) over a fake's
    set_image + predict_boxes, on the CPU."""

    device = torch.device("cpu")
    encoder_batch = 2

    def prepare(self, image):
        return image

    def encode_many(self, images):
        return list(images)

    def launch_boxes(self, image, boxes):
        self.set_image(image)
        masks, ious = self.predict_boxes(boxes)
        return PendingMasks(torch.from_numpy(masks), torch.from_numpy(ious))


class OraclePredictor(StreamedFake):
    """Returns the GT mask of the annotation whose box is the prompt, with predicted IoU 0.5."""

    def __init__(self, split):
        self.split = split
        self.images = []

    def set_image(self, image):
        self.shape = image.shape
        self.images.append(image)

    def predict_boxes(self, boxes):
        masks = []
        for box in boxes:
            hits = [a for a in self.split.coco.dataset["annotations"] if not a["iscrowd"]
                    and np.array_equal([a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                        a["bbox"][1] + a["bbox"][3]], box)]
            masks.append(self.split.coco.annToMask(hits[0]).astype(bool))
        return np.stack(masks), np.full(len(boxes), 0.5, dtype=np.float32)


class BoxFillPredictor(StreamedFake):
    """Each mask is its (rounded) box filled; predicted IoU 0.25."""

    def set_image(self, image):
        self.shape = image.shape[:2]

    def predict_boxes(self, boxes):
        masks = np.zeros((len(boxes), *self.shape), dtype=bool)
        for mask, (x0, y0, x1, y1) in zip(masks, np.round(boxes).astype(int)):
            mask[y0:y1, x0:x1] = True
        return masks, np.full(len(boxes), 0.25, dtype=np.float32)


def test_registered_and_names():
    assert TASKS.get("coco") is make_coco_task
    task = make_coco_task(TaskConfig(data_root=REALDATA))
    assert (task.name, task.metric, task.metrics) == ("coco", "mask_AP", METRICS)
    assert METRICS == ("mask_AP", "AP50", "AP75", "APs", "APm", "APl")


def test_gt_masks_score_100(val, tmp_path):
    results = gt_results(val)
    assert len(results) == 284  # 288 annotations minus 4 crowd
    assert all(set(r) == {"image_id", "category_id", "segmentation", "score"} for r in results)
    assert isinstance(results[0]["segmentation"]["counts"], str)
    path = tmp_path / "gt.json"
    write_results(results, path)
    assert score_results_file(path, REALDATA) == {key: 100.0 for key in METRICS}


def test_bbox_key_is_dropped_with_warning(val, tmp_path, caplog):
    """One false-positive small mask carrying an image-sized bbox: pycocotools would take the
    area from the box (large) and ignore the FP in APs; with the key dropped it counts."""
    image_id = 17627
    info = val.coco.imgs[image_id]
    small = next(a for a in val.coco.imgToAnns[image_id] if a["area"] < 32 ** 2 and not a["iscrowd"])
    same_cat = sum(val.coco.annToMask(a) for a in val.coco.imgToAnns[image_id]
                   if a["category_id"] == small["category_id"])
    mask = np.zeros((info["height"], info["width"]), dtype=bool)
    ys, xs = np.nonzero(same_cat == 0)
    mask[ys[0], xs[0]:xs[0] + 10] = True  # a 1x10 sliver where no GT of that category lies
    assert not (mask & (same_cat > 0)).any()
    fp = mask_results(image_id, mask[None], [small["category_id"]], [2.0])[0]
    results = gt_results(val) + [{**fp, "bbox": [0, 0, info["width"], info["height"]]}]
    path = tmp_path / "with_bbox.json"
    path.write_text(json.dumps(results))
    with caplog.at_level(logging.WARNING, logger="ptqbench.tasks.coco"):
        scores = score_results_file(path, REALDATA)
    assert "dropped the 'bbox' key of 1 entries" in caplog.text
    assert scores["APs"] < 100.0 and scores["mask_AP"] < 100.0
    assert scores["APm"] == 100.0 and scores["APl"] == 100.0
    assert scores == score_results(val.coco, gt_results(val) + [fp], sorted(val.image_ids))


def test_empty_results_score_zero(val, tmp_path):
    assert score_results(val.coco, [], val.image_ids) == {key: 0.0 for key in METRICS}
    path = tmp_path / "empty.json"
    path.write_text("[]")
    assert score_results_file(path, REALDATA) == {key: 0.0 for key in METRICS}


def test_results_file_errors(val, tmp_path):
    entry = gt_results(val, [6818])[0]
    bad_image = tmp_path / "bad_image.json"
    bad_image.write_text(json.dumps([entry, {**entry, "image_id": 12345}]))
    with pytest.raises(DataError, match=r"entry 1: unknown image_id 12345"):
        score_results_file(bad_image, REALDATA)
    bad_size = tmp_path / "bad_size.json"
    bad_size.write_text(json.dumps([{**entry, "segmentation": {"size": [1, 1], "counts": "01"}}]))
    with pytest.raises(DataError, match="RLE size"):
        score_results_file(bad_size, REALDATA)


def test_missing_layout_errors(tmp_path):
    with pytest.raises(DataError, match=r"data root .*missing-root does not exist.*instances_<split>.json"):
        make_coco_task(TaskConfig(data_root=tmp_path / "missing-root"))
    with pytest.raises(DataError, match=r"instances_val2017.json does not exist"):
        make_coco_task(TaskConfig(data_root=tmp_path))


def test_missing_image_is_a_data_error(tmp_path):
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "val2017").mkdir()
    (tmp_path / "coco" / "annotations" / "instances_val2017.json").symlink_to(
        COCO_DIR / "annotations" / "instances_val2017.json")
    task = make_coco_task(TaskConfig(data_root=tmp_path))
    with pytest.raises(DataError, match=r"val2017/000000006818.jpg .*does not exist"):
        task.evaluate(BoxFillPredictor(), limit=1, progress=False, out_dir=tmp_path / "out")


def test_evaluate_gt_prompts_with_oracle_masks(val, tmp_path):
    """Oracle masks on the first 3 images by id score 100: the limit restricts COCOeval too;
    the score of each result is 1.0 x predicted IoU."""
    task = make_coco_task(TaskConfig(data_root=REALDATA))
    predictor = OraclePredictor(val)
    metrics = task.evaluate(predictor, limit=3, progress=False, out_dir=tmp_path)
    assert metrics == pytest.approx({key: 100.0 for key in METRICS}, abs=1e-9)
    written = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert [r["image_id"] for r in written] == [6818] + [17627] * 16 + [37777] * 14
    assert {r["score"] for r in written} == {0.5}
    assert predictor.images[0].shape == (val.coco.imgs[6818]["height"], val.coco.imgs[6818]["width"], 3)
    assert predictor.images[0].dtype == np.uint8
    assert score_results_file(tmp_path / RESULTS_FILE, REALDATA, limit=3) == metrics
    assert score_results_file(tmp_path / RESULTS_FILE, REALDATA)["mask_AP"] < 100.0


def test_evaluate_detection_prompts(tmp_path):
    task = make_coco_task(TaskConfig(data_root=REALDATA, prompts=str(VAL_DETS)))
    metrics = task.evaluate(BoxFillPredictor(), limit=2, progress=False, out_dir=tmp_path)
    assert set(metrics) == set(METRICS)
    assert all(0.0 <= value <= 100.0 for value in metrics.values())
    written = json.loads((tmp_path / RESULTS_FILE).read_text())
    dets = [d for d in json.loads(VAL_DETS.read_text()) if d["image_id"] in (6818, 17627)]
    assert len(written) == len(dets)
    expected = sorted((d["image_id"], d["category_id"], d["score"] * 0.25) for d in dets)
    assert sorted((r["image_id"], r["category_id"], r["score"]) for r in written) == expected
    # The same numbers as plain pycocotools on the written file.
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(COCO_DIR / "annotations" / "instances_val2017.json"))
    evaluator = COCOeval(gt, gt.loadRes(str(tmp_path / RESULTS_FILE)), iouType="segm")
    evaluator.params.imgIds = [6818, 17627]
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert list(metrics.values()) == [stat * 100 for stat in evaluator.stats[:6]]
    assert metrics["mask_AP"] > 0.0


def test_malformed_detection_prompts(tmp_path):
    bad = tmp_path / "dets.json"
    bad.write_text('[{"image_id": 397133, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5},\n'
                   ' {"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]')
    task = make_coco_task(TaskConfig(data_root=REALDATA, prompts=str(bad)))
    with pytest.raises(DataError, match=r"dets.json, entry 1: unknown image_id 1 "):
        task.evaluate(BoxFillPredictor(), limit=1, progress=False, out_dir=tmp_path)
    bad.write_text('[{"image_id": 397133,')
    with pytest.raises(DataError, match=r"dets.json is not valid JSON"):
        task.evaluate(BoxFillPredictor(), limit=1, progress=False, out_dir=tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        make_coco_task(TaskConfig(data_root=REALDATA, prompts=str(tmp_path / "none.json")))


def test_calibration_items_gt_and_detections(caplog):
    train = json.loads((COCO_DIR / "annotations" / "instances_train2017.json").read_text())
    first = train["images"][0]
    task = make_coco_task(TaskConfig(data_root=REALDATA))
    items = task.calibration_items(2, seed=0)
    assert len(items) == 2
    assert items[0].image.shape == (first["height"], first["width"], 3) and items[0].image.dtype == np.uint8
    anns = [a for a in train["annotations"] if a["image_id"] == first["id"] and not a["iscrowd"]]
    x, y, w, h = anns[0]["bbox"]
    assert items[0].boxes.shape == (len(anns), 4)
    np.testing.assert_array_equal(items[0].boxes[0], [x, y, x + w, y + h])

    det_task = make_coco_task(TaskConfig(data_root=REALDATA, calib_prompts=str(TRAIN_DETS)))
    with caplog.at_level(logging.WARNING, logger="ptqbench.tasks.coco"):
        det_items = det_task.calibration_items(10, seed=0)
    assert "only 6 images" in caplog.text
    assert len(det_items) == 6 and sum(len(item.boxes) for item in det_items) == 600
    first_dets = [d for d in json.loads(TRAIN_DETS.read_text()) if d["image_id"] == first["id"]]
    assert len(det_items[0].boxes) == len(first_dets)


def test_fingerprint():
    gt = make_coco_task(TaskConfig(data_root=REALDATA))
    fp = gt.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert make_coco_task(TaskConfig(data_root=REALDATA)).fingerprint() == fp
    assert make_coco_task(TaskConfig(data_root=REALDATA, prompts=str(VAL_DETS))).fingerprint() != fp
    assert make_coco_task(TaskConfig(data_root=REALDATA, calib_split="val2017")).fingerprint() != fp
    assert "val2017" in gt.describe() and "GT boxes" in gt.describe()


def test_evaluate_with_tiny_sam(tmp_path):
    from ptqbench.sam.inference import BoxPredictor
    from ptqbench.sam.models import build_sam_tiny

    task = make_coco_task(TaskConfig(data_root=REALDATA, model_input_size=256))
    metrics = task.evaluate(BoxPredictor(build_sam_tiny()), limit=2, progress=False, out_dir=tmp_path)
    assert tuple(metrics) == METRICS
    assert all(0.0 <= value <= 100.0 and not math.isnan(value) for value in metrics.values())
    written = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert len(written) == 17 and all(math.isfinite(r["score"]) for r in written)


@pytest.mark.parametrize("in_processes", [False, True])
def test_mask_encoder_pools_give_the_same_entries(in_processes):
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 37, 53), dtype=bool)
    masks[0, 5:20, 7:40] = True
    masks[1] = rng.random((37, 53)) < 0.3
    args = (7, masks, np.array([1, 2, 3]), np.array([0.9, 0.5, 0.25]))
    entries = mask_encoder(in_processes).submit(mask_results, *args).result(timeout=120)
    assert entries == mask_results(*args)
    assert [entry["category_id"] for entry in entries] == [1, 2, 3]
