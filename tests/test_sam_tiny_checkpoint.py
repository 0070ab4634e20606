"""The shipped sam_tiny checkpoint: hash-verified, trained, and good on held-out demo scenes."""

from __future__ import annotations

import numpy as np
import pytest

from ptqbench.demo.install import ensure_demo_data
from ptqbench.demo.writers import DemoSizes
from ptqbench.models.checkpoints import load_model
from ptqbench.models.sam1.inference import BoxPredictor
from ptqbench.models.sam1.models import SAM_TINY_PACKAGED


@pytest.fixture(scope="module")
def demo_coco(tmp_path_factory):
    root = ensure_demo_data(tmp_path_factory.mktemp("demo") / "demo",
                            DemoSizes(coco_val=4, coco_train=1, dota_val=0, dota_train=0, ade_val=0, ade_train=0))
    from pycocotools.coco import COCO

    return root, COCO(str(root / "coco" / "annotations" / "instances_val2017.json"))


def test_shipped_checkpoint_is_trained_and_verified():
    if not SAM_TINY_PACKAGED.is_file():
        pytest.fail("ptqbench/data/sam_tiny.pt is missing from the package")
    loaded = load_model("sam_tiny")
    assert loaded.trained
    assert loaded.checkpoint_sha256 == "f9be84099403a92581b8fe80e2741423146de42a4418fb5fcc039f7caacfc1ce"
    assert SAM_TINY_PACKAGED.stat().st_size <= 16 * 2**20


def test_box_prompted_masks_match_ground_truth_on_demo_scenes(demo_coco):
    from PIL import Image

    root, coco = demo_coco
    predictor = BoxPredictor(load_model("sam_tiny").model)
    ious = []
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        image = np.array(Image.open(root / "coco" / "val2017" / info["file_name"]).convert("RGB"))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=False))
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns])
        predictor.set_image(image)
        masks, _ = predictor.predict_boxes(boxes)
        for mask, ann in zip(masks, anns):
            truth = coco.annToMask(ann).astype(bool)
            ious.append((mask & truth).sum() / max((mask | truth).sum(), 1))
    assert len(ious) >= 8
    assert np.mean(ious) > 0.7
