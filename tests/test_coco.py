"""The coco task on the real COCO slice: results writer, pycocotools scoring (mmdetection's
maxDets), prompts (the placeholder box of an image without detections), image decoding,
calibration."""

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ptqbench.errors import DataError
from ptqbench.models.sam1.inference import BoxPredictor, PendingMasks
from ptqbench.tasks.base import TASKS, TaskConfig
from ptqbench.tasks.coco import RESULTS_FILE, CocoTask, load_split, score_results_file
from ptqbench.tasks.coco_eval import METRICS, mask_encoder, mask_results, score_results, write_results

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


def pycocotools_metrics(results, image_ids, max_dets=(100, 300, 1000)):
    """Plain pycocotools on results entries (a list, or a results file): a fresh COCO of the val
    annotation file, COCOeval(segm) on `image_ids` with `max_dets`; the twelve stats x 100, -1 as NaN."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(COCO_DIR / "annotations" / "instances_val2017.json"))
    detections = gt.loadRes(str(results) if isinstance(results, Path) else [dict(r) for r in results])
    evaluator = COCOeval(gt, detections, iouType="segm")
    evaluator.params.imgIds = list(image_ids)
    evaluator.params.maxDets = list(max_dets)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return [stat * 100 if stat >= 0 else math.nan for stat in evaluator.stats]


def assert_metrics_equal(metrics, expected):
    """Exact equality in METRICS order (NaN equals NaN)."""
    assert tuple(metrics) == METRICS
    np.testing.assert_array_equal([metrics[key] for key in METRICS], expected)


class StreamedFake:
    """BoxPredictor's `stream` over a fake's set_image + predict_boxes, on the CPU: the side of
    BoxPredictor that `stream` uses (prepare, encode_many, launch_boxes)."""

    device = torch.device("cpu")
    encoder_batch = 2
    stream = BoxPredictor.stream

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
    """Each mask is its (rounded) box filled; predicted IoU 0.25. Records the boxes of each image."""

    def __init__(self):
        self.boxes = []

    def set_image(self, image):
        self.shape = image.shape[:2]

    def predict_boxes(self, boxes):
        self.boxes.append(np.array(boxes))
        masks = np.zeros((len(boxes), *self.shape), dtype=bool)
        for mask, (x0, y0, x1, y1) in zip(masks, np.round(boxes).astype(int)):
            mask[y0:y1, x0:x1] = True
        return masks, np.full(len(boxes), 0.25, dtype=np.float32)


def test_registered_and_names():
    assert TASKS.get("coco") is CocoTask
    task = CocoTask(TaskConfig(data_root=REALDATA))
    assert (task.name, task.metric, task.metrics) == ("coco", "mask_AP", METRICS)
    assert METRICS == ("mask_AP", "AP50", "AP75", "APs", "APm", "APl",
                       "AR100", "AR300", "AR1000", "ARs", "ARm", "ARl")


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


def test_max_dets_as_mmdetection(val):
    """120 false positives scored above the true positives of one image and category push those
    past the 100th detection: mask_AP and AR100 (maxDets 100) miss them, AP50..APl and AR1000
    (pycocotools' summarize takes maxDets[2] = 1000 for them) count them. Every metric equals
    plain pycocotools with mmdetection's maxDets (100, 300, 1000)."""
    image_id = 17627
    category = next(a for a in val.coco.imgToAnns[image_id] if not a["iscrowd"])["category_id"]
    info = val.coco.imgs[image_id]
    same_cat = sum(val.coco.annToMask(a) for a in val.coco.imgToAnns[image_id] if a["category_id"] == category)
    ys, xs = np.nonzero(same_cat == 0)
    false_positives = np.zeros((120, info["height"], info["width"]), dtype=bool)
    for index, mask in enumerate(false_positives):
        mask[ys[index * 97], xs[index * 97]] = True  # one pixel where no GT of that category lies
    results = gt_results(val, [image_id]) + mask_results(image_id, false_positives, [category] * 120,
                                                         np.full(120, 2.0))
    metrics = score_results(val.coco, results, [image_id])
    assert_metrics_equal(metrics, pycocotools_metrics(results, [image_id]))
    defaults = pycocotools_metrics(results, [image_id], max_dets=(1, 10, 100))  # COCOeval's own
    assert metrics["mask_AP"] == defaults[0]      # maxDets 100 both
    assert metrics["AP50"] > defaults[1]          # maxDets 1000 against 100
    assert metrics["AR1000"] > metrics["AR100"] == defaults[8]


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
        CocoTask(TaskConfig(data_root=tmp_path / "missing-root"))
    with pytest.raises(DataError, match=r"instances_val2017.json does not exist"):
        CocoTask(TaskConfig(data_root=tmp_path))


def test_annotation_file_without_categories(tmp_path):
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(DataError, match=r"instances_val2017.json has an empty 'categories' list"):
        load_split(tmp_path, "val2017")


def test_missing_image_is_a_data_error(tmp_path):
    (tmp_path / "coco" / "annotations").mkdir(parents=True)
    (tmp_path / "coco" / "val2017").mkdir()
    (tmp_path / "coco" / "annotations" / "instances_val2017.json").symlink_to(
        COCO_DIR / "annotations" / "instances_val2017.json")
    task = CocoTask(TaskConfig(data_root=tmp_path))
    with pytest.raises(DataError, match=r"val2017/000000006818.jpg .*does not exist"):
        task.evaluate(BoxFillPredictor(), limit=1, progress=False, out_dir=tmp_path / "out")


def test_evaluate_gt_prompts_with_oracle_masks(val, tmp_path):
    """Oracle masks on the first 3 images by id score 100: the limit restricts COCOeval too;
    the score of each result is 1.0 x predicted IoU."""
    task = CocoTask(TaskConfig(data_root=REALDATA))
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
    task = CocoTask(TaskConfig(data_root=REALDATA, prompts=str(VAL_DETS)))
    metrics = task.evaluate(BoxFillPredictor(), limit=2, progress=False, out_dir=tmp_path)
    assert all(0.0 <= value <= 100.0 for value in metrics.values())
    written = json.loads((tmp_path / RESULTS_FILE).read_text())
    dets = [d for d in json.loads(VAL_DETS.read_text()) if d["image_id"] in (6818, 17627)]
    assert len(written) == len(dets)
    expected = sorted((d["image_id"], d["category_id"], d["score"] * 0.25) for d in dets)
    assert sorted((r["image_id"], r["category_id"], r["score"]) for r in written) == expected
    assert_metrics_equal(metrics, pycocotools_metrics(tmp_path / RESULTS_FILE, [6818, 17627]))
    assert metrics["mask_AP"] > 0.0


def test_placeholder_prompt_for_an_image_without_detections(val, tmp_path):
    """17627 dropped from the detection file: SAM gets the box [0, 0, 0, 0] for it and the
    entry has the first category (person, 1) and score 0.1 x SAM's IoU; the other images keep
    their detections."""
    dets = json.loads(VAL_DETS.read_text())
    path = tmp_path / "dets.json"
    path.write_text(json.dumps([d for d in dets if d["image_id"] != 17627]))
    task = CocoTask(TaskConfig(data_root=REALDATA, prompts=str(path)))
    predictor = BoxFillPredictor()
    metrics = task.evaluate(predictor, limit=3, progress=False, out_dir=tmp_path)
    np.testing.assert_array_equal(predictor.boxes[1], [[0.0, 0.0, 0.0, 0.0]])
    assert [len(boxes) for boxes in predictor.boxes] == [sum(d["image_id"] == i for d in dets) if i != 17627 else 1
                                                         for i in (6818, 17627, 37777)]
    written = json.loads((tmp_path / RESULTS_FILE).read_text())
    placeholder = [r for r in written if r["image_id"] == 17627]
    assert [(r["category_id"], r["score"]) for r in placeholder] == [(1, 0.1 * 0.25)]
    assert_metrics_equal(metrics, pycocotools_metrics(tmp_path / RESULTS_FILE, [6818, 17627, 37777]))


def test_gt_prompts_give_no_placeholder(val, tmp_path):
    """58636 (5th by id) has no annotation: with GT prompts it gets no prompt and no entry (the
    reference's placeholder belongs to its detector wrapper; here it would only add a false positive)."""
    predictor = OraclePredictor(val)
    metrics = CocoTask(TaskConfig(data_root=REALDATA)).evaluate(predictor, limit=5, progress=False,
                                                                       out_dir=tmp_path)
    written = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert sorted({r["image_id"] for r in written}) == [6818, 17627, 37777, 41888]
    assert len(predictor.images) == 4
    assert_metrics_equal(metrics, pycocotools_metrics(tmp_path / RESULTS_FILE, [6818, 17627, 37777, 41888, 58636]))


def test_malformed_detection_prompts(tmp_path):
    bad = tmp_path / "dets.json"
    bad.write_text('[{"image_id": 397133, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5},\n'
                   ' {"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]')
    task = CocoTask(TaskConfig(data_root=REALDATA, prompts=str(bad)))
    with pytest.raises(DataError, match=r"dets.json, entry 1: unknown image_id 1 "):
        task.evaluate(BoxFillPredictor(), limit=1, progress=False, out_dir=tmp_path)
    bad.write_text('[{"image_id": 397133,')
    with pytest.raises(DataError, match=r"dets.json is not valid JSON"):
        task.evaluate(BoxFillPredictor(), limit=1, progress=False, out_dir=tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        CocoTask(TaskConfig(data_root=REALDATA, prompts=str(tmp_path / "none.json")))


def test_calibration_items_gt_and_detections():
    train = json.loads((COCO_DIR / "annotations" / "instances_train2017.json").read_text())
    first = train["images"][0]
    task = CocoTask(TaskConfig(data_root=REALDATA))
    items = task.calibration_items(2, seed=0)
    assert len(items) == 2
    assert items[0].image.shape == (first["height"], first["width"], 3) and items[0].image.dtype == np.uint8
    anns = [a for a in train["annotations"] if a["image_id"] == first["id"] and not a["iscrowd"]]
    x, y, w, h = anns[0]["bbox"]
    assert items[0].boxes.shape == (len(anns), 4)
    np.testing.assert_array_equal(items[0].boxes[0], [x, y, x + w, y + h])

    det_task = CocoTask(TaskConfig(data_root=REALDATA, calib_prompts=str(TRAIN_DETS)))
    det_items = det_task.calibration_items(10, seed=0)   # all 6 images of the split
    assert len(det_items) == 6 and sum(len(item.boxes) for item in det_items) == 600
    first_dets = [d for d in json.loads(TRAIN_DETS.read_text()) if d["image_id"] == first["id"]]
    assert len(det_items[0].boxes) == len(first_dets)


def test_calibration_placeholder_prompt(tmp_path):
    """A calibration image without detections is calibrated on with the placeholder box."""
    train = json.loads((COCO_DIR / "annotations" / "instances_train2017.json").read_text())
    first, second = (image["id"] for image in train["images"][:2])
    dets = json.loads(TRAIN_DETS.read_text())
    path = tmp_path / "train_dets.json"
    path.write_text(json.dumps([d for d in dets if d["image_id"] != first]))
    items = CocoTask(TaskConfig(data_root=REALDATA, calib_prompts=str(path))).calibration_items(2, seed=0)
    np.testing.assert_array_equal(items[0].boxes, [[0.0, 0.0, 0.0, 0.0]])
    assert len(items[1].boxes) == sum(d["image_id"] == second for d in dets)


def _one_image_split(root, file_name, width, height):
    """A val2017 split below `root` whose only image is `file_name`, said to be width x height."""
    (root / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "coco" / "val2017").mkdir(exist_ok=True)
    dataset = {"images": [{"id": 1, "file_name": file_name, "width": width, "height": height}],
               "annotations": [], "categories": [{"id": 1, "name": "person"}]}
    (root / "coco" / "annotations" / "instances_val2017.json").write_text(json.dumps(dataset))
    return load_split(root, "val2017")


def test_images_decoded_as_the_reference(tmp_path):
    """OpenCV, then BGR -> RGB: a 60x40 JPEG tagged EXIF orientation 6 comes out rotated to
    40x60, as cv2.imread gives it (Pillow keeps it 60x40); an annotation giving the stored size
    then gets a DataError, and so does a file OpenCV cannot decode."""
    import cv2
    from PIL import Image

    path = tmp_path / "coco" / "val2017" / "rotated.jpg"
    path.parent.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as stored:
        assert stored.size == (60, 40)
    image = _one_image_split(tmp_path, "rotated.jpg", width=40, height=60).read_image(1)
    assert image.shape == (60, 40, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, cv2.imread(str(path))[:, :, ::-1])
    with pytest.raises(DataError, match=r"rotated.jpg is 40x60 but .* says 60x40"):
        _one_image_split(tmp_path, "rotated.jpg", width=60, height=40).read_image(1)
    (tmp_path / "coco" / "val2017" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"broken.jpg cannot be read"):
        _one_image_split(tmp_path, "broken.jpg", width=60, height=40).read_image(1)


def test_fingerprint():
    gt = CocoTask(TaskConfig(data_root=REALDATA))
    fp = gt.fingerprint()
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert CocoTask(TaskConfig(data_root=REALDATA)).fingerprint() == fp
    assert CocoTask(TaskConfig(data_root=REALDATA, prompts=str(VAL_DETS))).fingerprint() != fp
    assert CocoTask(TaskConfig(data_root=REALDATA, calib_split="val2017")).fingerprint() != fp
    assert "val2017" in gt.describe() and "GT boxes" in gt.describe()


def test_evaluate_with_tiny_sam(tmp_path):
    from ptqbench.models.sam1.inference import BoxPredictor
    from ptqbench.models.sam1.models import build_sam_tiny

    task = CocoTask(TaskConfig(data_root=REALDATA, model_input_size=256))
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


def _worker_signal_handlers() -> tuple[object, object]:
    import signal

    return signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)


def test_encoder_workers_do_not_inherit_the_cli_signal_handlers(monkeypatch):
    """A forked RLE worker must die silently on SIGTERM (a `timeout` or a scheduler signals the
    whole process group): the CLI's SIGTERM handler, inherited through the fork, printed one
    traceback per worker."""
    import signal

    from ptqbench.tasks import coco_eval

    monkeypatch.setattr(coco_eval, "_MASK_ENCODERS", {})
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        pool = mask_encoder(in_processes=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        assert pool.submit(_worker_signal_handlers).result() == (signal.SIG_DFL, signal.SIG_IGN)
    finally:
        pool.shutdown()
