"""BoxPredictor and its stream reproduce segment_anything's SamPredictor exactly (FP path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from ptqbench.models.prediction import PromptedImage
from ptqbench.models.sam1.inference import BoxPredictor
from ptqbench.models.sam1.quantized import fp_twin
from ptqbench.tasks.base import TaskConfig


def _image_and_boxes(height: int, width: int, count: int = 7, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    xy = rng.uniform(0, [width * 0.6, height * 0.6], size=(count, 2))
    wh = rng.uniform(8, [width * 0.4, height * 0.4], size=(count, 2))
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


def _sam_predictor_loop(model, items, chunk_size):
    """The reference: segment_anything's SamPredictor image by image, `predict_torch` on the boxes
    in chunks of `chunk_size` (the batch size of a decoder call changes its float rounding)."""
    predictor = SamPredictor(model)
    out = []
    for item in items:
        predictor.set_image(item.image)
        boxes = torch.as_tensor(item.boxes, dtype=torch.float, device=predictor.device)
        boxes = predictor.transform.apply_boxes_torch(boxes, item.image.shape[:2])
        masks, ious = [], []
        for start in range(0, len(boxes), chunk_size):
            chunk_masks, chunk_ious, _ = predictor.predict_torch(None, None, boxes=boxes[start:start + chunk_size],
                                                                 multimask_output=False)
            masks.append(chunk_masks[:, 0].cpu().numpy())
            ious.append(chunk_ious[:, 0].cpu().numpy())
        out.append((np.concatenate(masks), np.concatenate(ious)))
    return out


ON_GPU = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))


@pytest.mark.parametrize("device", ["cpu", ON_GPU])
@pytest.mark.parametrize("encoder_batch", [1, 3])
def test_fp_stream_over_the_twin_equals_the_sam_predictor_loop(sam_tiny, encoder_batch, device):
    """The FP evaluation path (BoxPredictor.stream over fp_twin, one batch in flight, images encoded
    `encoder_batch` at a time with a short last batch; on a GPU with the fused relative-position
    add and decoding on a second stream) yields, in order, exactly the masks and IoUs of a
    SamPredictor loop over the plain model."""
    sizes_and_counts = [((300, 410), 7), ((97, 256), 2), ((256, 180), 1), ((640, 480), 12)]
    items = []
    for key, ((height, width), count) in enumerate(sizes_and_counts):
        image, boxes = _image_and_boxes(height, width, count, seed=key)
        items.append(PromptedImage(key=key, image=image, boxes=boxes))
    chunk_size = 5
    sam_tiny = sam_tiny.to(device)
    reference = _sam_predictor_loop(sam_tiny, items, chunk_size)

    predictor = BoxPredictor(fp_twin(sam_tiny), device, chunk_size=chunk_size, encoder_batch=encoder_batch)
    streamed = list(predictor.stream([lambda item=item: item for item in items], workers=2))

    assert [item.key for item, _, _ in streamed] == [0, 1, 2, 3]
    for (item, masks, ious), (ref_masks, ref_ious) in zip(streamed, reference):
        assert masks.shape == (len(item.boxes), *item.image.shape[:2]) and masks.dtype == bool
        assert ious.dtype == np.float32
        assert np.array_equal(masks, ref_masks)
        assert np.array_equal(ious, ref_ious)


def test_launch_boxes_equals_predict_boxes_and_keeps_images_apart(sam_tiny):
    """Two images launched before either is collected give each its own predictions."""
    first, first_boxes = _image_and_boxes(200, 150, 4, seed=1)
    second, second_boxes = _image_and_boxes(120, 260, 3, seed=2)
    predictor = BoxPredictor(sam_tiny, chunk_size=3)
    pending = [predictor.launch_boxes(predictor.encode(predictor.prepare(image)), boxes)
               for image, boxes in ((first, first_boxes), (second, second_boxes))]
    for (image, boxes), launched in zip(((first, first_boxes), (second, second_boxes)), pending):
        predictor.set_image(image)
        masks, ious = launched.result()
        expected_masks, expected_ious = predictor.predict_boxes(boxes)
        assert np.array_equal(masks, expected_masks) and np.array_equal(ious, expected_ious)


def test_coco_prediction_through_the_twin_equals_the_plain_model(sam_tiny, realdata):
    """A run's FP row (coco `predict` through fp_twin) writes the same RLE entries as the plain model."""
    from ptqbench.tasks.coco import CocoTask

    task = CocoTask(TaskConfig(data_root=realdata, model_input_size=sam_tiny.image_encoder.img_size))
    indices = [0, 1, 2]
    plain = task.predict(BoxPredictor(sam_tiny, chunk_size=4), indices)
    twin = task.predict(BoxPredictor(fp_twin(sam_tiny), chunk_size=4), indices)
    assert sum(len(result.entries) for result in plain) > 4
    assert twin == plain


def test_coco_metric_through_ptqbench_equals_a_sam_predictor_loop(tmp_path):
    """(b) against (a) of benchmarks/eval_speed.py, with the shipped sam_tiny on demo COCO scenes:
    the coco task's prediction phase over fp_twin (images encoded two at a time) writes the same
    results entries, and so gets the same COCOeval metrics, as a SamPredictor loop over the plain
    model with the GT boxes."""
    from ptqbench.demo.install import ensure_demo_data
    from ptqbench.demo.writers import DemoSizes
    from ptqbench.models.checkpoints import load_model
    from ptqbench.tasks.coco import CocoTask, evaluation_image_ids, mask_results, score_results

    root = ensure_demo_data(tmp_path / "demo", DemoSizes(coco_val=3, coco_train=1, dota_val=0, dota_train=0,
                                                         ade_val=0, ade_train=0))
    model = load_model("sam_tiny").model
    task = CocoTask(TaskConfig(data_root=root, model_input_size=model.image_encoder.img_size))
    results = task.predict(BoxPredictor(fp_twin(model), encoder_batch=2), [0, 1, 2])
    metrics = task.score(results, 3, tmp_path)

    split = task._split(task.eval_split)
    image_ids = evaluation_image_ids(split, 3)
    items = []
    for image_id in image_ids:
        prompts = split.gt_prompts(image_id)
        items.append(PromptedImage(key=image_id, image=split.read_image(image_id), boxes=prompts.boxes, extra=prompts))
    reference = []
    for item, (masks, ious) in zip(items, _sam_predictor_loop(model, items, chunk_size=64)):
        scores = item.extra.scores * ious.astype(np.float64)
        reference += mask_results(item.key, masks, item.extra.category_ids, scores)

    assert [entry for result in results for entry in result.entries] == reference
    assert metrics == score_results(split.coco, reference, image_ids)
    assert metrics["mask_AP"] > 30
