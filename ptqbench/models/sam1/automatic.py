"""SAM's automatic mask generation (segment_anything's `SamAutomaticMaskGenerator`), as the ADE20K
task's SSA protocol uses it through `BoxPredictor.automatic_mask_generator`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import MaskData, generate_crop_boxes, rle_to_mask
from torch import nn
from torchvision.ops.boxes import batched_nms, box_area


class AutomaticMaskGenerator:
    """segment_anything's `SamAutomaticMaskGenerator` on `model` (a SAM or its quantizable twin),
    binary masks out; settings: its other constructor arguments (thresholds, crop layers, ...).
    SAM-1's `ptqbench.models.prediction.MaskGenerator`."""

    def __init__(self, model: nn.Module, points_per_side: int, points_per_batch: int,
                 settings: Mapping[str, Any]) -> None:
        self.generator = SamAutomaticMaskGenerator(model, points_per_side=points_per_side,
                                                   points_per_batch=points_per_batch,
                                                   output_mode="binary_mask", **settings)

    def masks(self, image: np.ndarray) -> list[np.ndarray]:
        """`automatic_masks` of image uint8 RGB [H, W, 3]: bool [H, W] each."""
        return automatic_masks(self.generator, image)


def automatic_masks(generator: Any, image: np.ndarray) -> list[np.ndarray]:
    """The masks of `generator.generate(image)`, bool [H, W] each, in the same order.

    generator: a segment_anything `SamAutomaticMaskGenerator`; image: uint8 RGB [H, W, 3].
    Same steps as `generate` (per-crop point batches and NMS via its `_process_crop`, NMS between
    crops preferring the smaller crop, small-region cleanup, RLE -> mask), except that an image
    where no mask survives gives an empty list: segment_anything 1.0 raises IndexError there
    whenever crop layers are on (`box_area` of an empty crop-box tensor), which a badly
    quantized model triggers.
    """
    image_hw = image.shape[:2]
    crop_boxes, layer_indices = generate_crop_boxes(
        image_hw, generator.crop_n_layers, generator.crop_overlap_ratio)
    data = MaskData()
    for crop_box, layer_index in zip(crop_boxes, layer_indices):
        data.cat(generator._process_crop(image, crop_box, layer_index, image_hw))
    if len(data["rles"]) == 0:
        return []
    if len(crop_boxes) > 1:
        boxes = data["boxes"].float()
        crop_scores = (1 / box_area(data["crop_boxes"])).to(boxes.device)
        categories = torch.zeros(len(boxes), device=boxes.device)
        data.filter(batched_nms(boxes, crop_scores, categories, generator.crop_nms_thresh))
    data.to_numpy()
    if generator.min_mask_region_area > 0:
        data = generator.postprocess_small_regions(
            data, generator.min_mask_region_area,
            max(generator.box_nms_thresh, generator.crop_nms_thresh))
    return [rle_to_mask(rle) for rle in data["rles"]]
