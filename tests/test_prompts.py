"""COCO results-format detection files: parsing, grouping, xywh -> xyxy, validation errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from ptqbench.errors import DataError
from ptqbench.tasks.prompts import no_detection_prompt, read_coco_detections, xywh_to_xyxy

REALDATA = Path(__file__).parents[2] / "shared" / "realdata"
IMAGES = {1, 2, 3}
CATEGORIES = {1, 18}


def write(tmp_path: Path, payload, name: str = "dets.json") -> Path:
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def test_xywh_to_xyxy():
    out = xywh_to_xyxy(np.array([[10.0, 20.0, 5.0, 7.5], [0.0, 0.0, 0.0, 0.0]]))
    np.testing.assert_array_equal(out, [[10.0, 20.0, 15.0, 27.5], [0.0, 0.0, 0.0, 0.0]])
    assert out.dtype == np.float64


def test_no_detection_prompt_is_the_reference_placeholder():
    """One box [0, 0, 0, 0] with detector score 0.1, in the category it is given."""
    prompt = no_detection_prompt(7)
    assert len(prompt) == 1
    np.testing.assert_array_equal(prompt.boxes, [[0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(prompt.category_ids, [7])
    np.testing.assert_array_equal(prompt.scores, [0.1])
    assert (prompt.boxes.dtype, prompt.category_ids.dtype, prompt.scores.dtype) == (np.float64, np.int64, np.float64)


def test_groups_per_image_in_file_order(tmp_path):
    path = write(tmp_path, [
        {"image_id": 2, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.9},
        {"image_id": 1, "category_id": 18, "bbox": [0.5, 0, 10, 10], "score": 0.25},
        {"image_id": 2.0, "category_id": 18.0, "bbox": [5, 5, 1, 1], "score": 1, "segmentation": "ignored"},
    ])
    dets = read_coco_detections(path, IMAGES, CATEGORIES)
    assert sorted(dets) == [1, 2]
    np.testing.assert_array_equal(dets[2].boxes, [[1, 2, 4, 6], [5, 5, 6, 6]])
    np.testing.assert_array_equal(dets[2].category_ids, [1, 18])
    np.testing.assert_array_equal(dets[2].scores, [0.9, 1.0])
    np.testing.assert_array_equal(dets[1].boxes, [[0.5, 0, 10.5, 10]])
    assert len(dets[1]) == 1 and dets[2].category_ids.dtype == np.int64


GOOD = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}


@pytest.mark.parametrize("bad, message", [
    ({"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}, "missing key(s) score"),
    ({**GOOD, "image_id": 99}, "unknown image_id 99"),
    ({**GOOD, "category_id": 7}, "unknown category_id 7"),
    ({**GOOD, "image_id": "1"}, "image_id '1' is not an integer"),
    ({**GOOD, "image_id": 1.5}, "not an integer"),
    ({**GOOD, "bbox": [0, 0, "1", 1]}, "bbox"),
    ({**GOOD, "bbox": [0, 0, 1]}, "bbox"),
    ({**GOOD, "bbox": [0, 0, -1, 1]}, "negative width"),
    ({**GOOD, "score": None}, "score None"),
    ({**GOOD, "score": True}, "score True"),
    ({**GOOD, "score": float("nan")}, "score nan"),
    ([1, 2], "expected an object"),
])
def test_bad_entry_names_file_and_index(tmp_path, bad, message):
    path = write(tmp_path, [GOOD, bad])
    with pytest.raises(DataError) as err:
        read_coco_detections(path, IMAGES, CATEGORIES)
    assert str(path) in str(err.value)
    assert "entry 1" in str(err.value)
    assert message in str(err.value)


def test_malformed_json_names_file_and_line(tmp_path):
    path = write(tmp_path, '[\n{"image_id": 1,\n "score": ]\n')
    with pytest.raises(DataError, match=r"not valid JSON.*line 3") as err:
        read_coco_detections(path, IMAGES, CATEGORIES)
    assert str(path) in str(err.value)


def test_top_level_must_be_a_list(tmp_path):
    path = write(tmp_path, {"annotations": []})
    with pytest.raises(DataError, match="expected a JSON list"):
        read_coco_detections(path, IMAGES, CATEGORIES)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_coco_detections(tmp_path / "nope.json", IMAGES, CATEGORIES)


def test_real_yolov5n_detections():
    coco = REALDATA / "coco"
    if not coco.is_dir():
        pytest.skip("../shared/realdata is absent")
    annotations = json.loads((coco / "annotations" / "instances_val2017.json").read_text())
    dets = read_coco_detections(coco / "detections" / "yolov5n_val2017_bbox.json",
                                [image["id"] for image in annotations["images"]],
                                [category["id"] for category in annotations["categories"]])
    assert len(dets) == 32
    assert sum(len(d) for d in dets.values()) == 2782
    # The file's first entry: image 397133, category 1, bbox [382.27, 73.76, 117.97, 274.34], score 0.83246.
    first = dets[397133]
    np.testing.assert_allclose(first.boxes[0], [382.27, 73.76, 500.24, 348.1], rtol=0, atol=1e-12)
    assert first.category_ids[0] == 1 and first.scores[0] == 0.83246
    assert all(len(d) <= 100 for d in dets.values())
