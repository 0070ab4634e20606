"""Batched box-prompt inference: preprocess once, encode once, decode all of an image's boxes.

The FP path reproduces segment_anything's `SamPredictor.set_image` followed by
`predict_torch(boxes=..., multimask_output=False)` and `> mask_threshold` exactly: it uses
the same `ResizeLongestSide` transform and the model's own `preprocess` / `postprocess_masks`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide


@dataclass(frozen=True)
class PromptedImage:
    """One image to segment: `key` identifies it for the task, image uint8 RGB [H, W, 3],
    boxes float [N, 4] xyxy in image pixels, `extra` anything the task wants back."""

    key: Any
    image: np.ndarray
    boxes: np.ndarray
    extra: Any = None


class BoxPredictor:
    """Predicts one mask per box prompt with a (possibly quantized) SAM.

    model: a `Sam` (its quantizable twin is still a `Sam`); it is moved to `device`.
    chunk_size: boxes decoded per mask-decoder call (bounds memory for images with many boxes).
    """

    def __init__(self, model: Sam, device: torch.device | str = "cpu", chunk_size: int = 64) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.input_size = model.image_encoder.img_size
        self.chunk_size = chunk_size
        self.transform = ResizeLongestSide(self.input_size)
        self._features: torch.Tensor | None = None
        self._input_hw: tuple[int, int] = (0, 0)
        self._original_hw: tuple[int, int] = (0, 0)

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 RGB [H, W, 3] -> (normalised, padded input [1, 3, S, S], resized (h, w))."""
        return self._model_input(self.transform.apply_image(image))

    def _model_input(self, resized: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1).contiguous()[None]
        return self.model.preprocess(x), (resized.shape[0], resized.shape[1])

    def prepare(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """The CPU part of `set_image` (thread-safe): (resized uint8 image, original (H, W))."""
        return self.transform.apply_image(image), (image.shape[0], image.shape[1])

    @torch.no_grad()
    def set_image(self, image: np.ndarray) -> None:
        """Encode one uint8 RGB image [H, W, 3]; later `predict_boxes` calls reuse the embedding."""
        self.set_prepared(self.prepare(image))

    @torch.no_grad()
    def set_prepared(self, prepared: tuple[np.ndarray, tuple[int, int]]) -> None:
        """`set_image` for the output of `prepare`."""
        resized, self._original_hw = prepared
        x, self._input_hw = self._model_input(resized)
        self._features = self.model.image_encoder(x)

    @torch.no_grad()
    def predict_boxes(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Masks for box prompts on the last image (boxes scaled as `apply_boxes_torch` does in float32).

        boxes: [N, 4] xyxy in original image pixels.
        Returns masks bool [N, H, W] at the original size and predicted IoU float32 [N].
        """
        if self._features is None:
            raise RuntimeError("set_image must be called before predict_boxes")
        h, w = self._original_hw
        if len(boxes) == 0:
            return np.zeros((0, h, w), dtype=bool), np.zeros((0,), dtype=np.float32)
        boxes_t = self.transform.apply_boxes_torch(
            torch.as_tensor(np.asarray(boxes), dtype=torch.float, device=self.device), self._original_hw)
        masks, ious = [], []
        for start in range(0, len(boxes_t), self.chunk_size):
            logits, iou = sam_decode(self.model, self._features, boxes_t[start : start + self.chunk_size])
            upscaled = self.model.postprocess_masks(logits, self._input_hw, self._original_hw)
            masks.append((upscaled[:, 0] > self.model.mask_threshold).cpu().numpy())
            ious.append(iou[:, 0].float().cpu().numpy())
        return np.concatenate(masks), np.concatenate(ious)



def sam_decode(model: Sam, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt encoder + single-mask decoder on an image embedding [1, 256, h, w] for boxes [N, 4]
    in model input coordinates -> (low-res mask logits [N, 1, 4h, 4w], predicted IoU [N, 1])."""
    sparse, dense = model.prompt_encoder(points=None, boxes=boxes, masks=None)
    return decode_single_mask(model, embedding, sparse, dense)


def decode_single_mask(model: Sam, embedding: torch.Tensor, sparse: torch.Tensor,
                       dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask decoder with `multimask_output=False` on given prompt embeddings."""
    return model.mask_decoder(
        image_embeddings=embedding,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )


def predict_stream(predictor: BoxPredictor, loaders: Sequence[Callable[[], PromptedImage]], *,
                   workers: int = 4) -> Iterator[tuple[PromptedImage, np.ndarray, np.ndarray]]:
    """Segment many images in order, reading and resizing the next ones in background threads.

    loaders: one callable per image that reads it and its prompts (run in a worker thread,
    followed by `predictor.prepare`). Yields (item, masks bool [N, H, W], iou float32 [N]) in the
    order of `loaders`; the predictions are exactly `set_image(item.image)` + `predict_boxes(item.boxes)`.
    """

    def load_and_prepare(loader: Callable[[], PromptedImage]) -> tuple[PromptedImage, Any]:
        item = loader()
        return item, predictor.prepare(item.image)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque = deque()
        queue = iter(loaders)
        for loader in queue:
            pending.append(pool.submit(load_and_prepare, loader))
            if len(pending) >= 2 * workers:
                break
        while pending:
            item, prepared = pending.popleft().result()
            next_loader = next(queue, None)
            if next_loader is not None:
                pending.append(pool.submit(load_and_prepare, next_loader))
            predictor.set_prepared(prepared)
            masks, ious = predictor.predict_boxes(item.boxes)
            yield item, masks, ious
