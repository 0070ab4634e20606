"""BoxPredictor reproduces segment_anything's SamPredictor exactly (FP path)."""

from __future__ import annotations

import numpy as np
import torch
from segment_anything import SamPredictor

from ptqbench.sam.inference import BoxPredictor


def _image_and_boxes(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    xy = rng.uniform(0, [width * 0.6, height * 0.6], size=(7, 2))
    wh = rng.uniform(8, [width * 0.4, height * 0.4], size=(7, 2))
    return image, np.concatenate([xy, xy + wh], axis=1)


def test_box_predictor_equals_sam_predictor(sam_tiny):
    image, boxes = _image_and_boxes(300, 410)
    reference = SamPredictor(sam_tiny)
    reference.set_image(image)
    ref_boxes = reference.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float), image.shape[:2])
    ref_masks, ref_iou, _ = reference.predict_torch(None, None, boxes=ref_boxes, multimask_output=False)

    predictor = BoxPredictor(sam_tiny, "cpu")
    predictor.set_image(image)
    masks, iou = predictor.predict_boxes(boxes)

    assert masks.shape == (7, 300, 410) and masks.dtype == bool
    assert np.array_equal(masks, ref_masks[:, 0].numpy())
    assert np.array_equal(iou, ref_iou[:, 0].numpy())


def test_chunking_changes_nothing_beyond_float_rounding(sam_tiny):
    image, boxes = _image_and_boxes(300, 410)
    whole, chunked = BoxPredictor(sam_tiny, "cpu"), BoxPredictor(sam_tiny, "cpu", chunk_size=3)
    whole.set_image(image)
    chunked.set_image(image)
    masks, iou = whole.predict_boxes(boxes)
    chunk_masks, chunk_iou = chunked.predict_boxes(boxes)
    assert (masks != chunk_masks).mean() < 1e-4
    np.testing.assert_allclose(iou, chunk_iou, rtol=1e-5)


def test_no_boxes_gives_empty_arrays(sam_tiny):
    image, _ = _image_and_boxes(64, 80)
    predictor = BoxPredictor(sam_tiny)
    predictor.set_image(image)
    masks, iou = predictor.predict_boxes(np.zeros((0, 4)))
    assert masks.shape == (0, 64, 80) and iou.shape == (0,)
