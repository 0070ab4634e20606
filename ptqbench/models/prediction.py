"""What a task calls on the predictor it is given: the `Predictor` protocol, and `PromptedImage`,
one image with its box prompts for `Predictor.stream`.

This module is the tasks' side of the model boundary: it imports no model family, so a task
typed against it runs with any family's predictor (SAM-1: `ptqbench.models.sam1.inference.BoxPredictor`,
which a family's adapter hands to the harness, `ModelAdapter.predictor`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class PromptedImage:
    """One image to segment: `key` identifies it for the task, image uint8 RGB [H, W, 3],
    boxes float [N, 4] xyxy in image pixels, `extra` anything the task wants back."""

    key: Any
    image: np.ndarray
    boxes: np.ndarray
    extra: Any = None


class MaskGenerator(Protocol):
    """Automatic (prompt-free) mask generation on one image."""

    def masks(self, image: np.ndarray) -> list[np.ndarray]:
        """The masks of image uint8 RGB [H, W, 3]: bool [H, W] each (an empty list when none survives)."""
        ...


class Predictor(Protocol):
    """A (possibly quantized) promptable segmentation model, as the tasks use it.

    Every mask is at the image's own resolution and thresholded; one mask per box prompt.
    """

    device: torch.device
    """Where the model runs (a task may size its batches by it)."""

    def set_image(self, image: np.ndarray) -> None:
        """Encode one uint8 RGB image [H, W, 3]; later `predict_boxes` calls reuse the embedding."""
        ...

    def predict_boxes(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Masks for box prompts [N, 4] (xyxy, image pixels) on the last `set_image` image:
        masks bool [N, H, W] and predicted IoU float32 [N]."""
        ...

    def stream(self, loaders: Iterable[Callable[[], PromptedImage]]
               ) -> Iterator[tuple[PromptedImage, np.ndarray, np.ndarray]]:
        """Segment many images: one callable per image, which reads it and its prompts (run in a
        worker thread, a few images ahead of the model). Yields (item, masks bool [N, H, W], IoU
        float32 [N]) in the order of `loaders`, exactly `set_image(item.image)` +
        `predict_boxes(item.boxes)` for each item; the fast path for many images."""
        ...

    def automatic_mask_generator(self, points_per_side: int, points_per_batch: int,
                                 settings: Mapping[str, Any]) -> MaskGenerator:
        """The model's automatic mask generator: a grid of `points_per_side` x `points_per_side`
        point prompts, `points_per_batch` per decoder call; settings: the family's other
        generator settings (thresholds, crop layers, ...)."""
        ...
