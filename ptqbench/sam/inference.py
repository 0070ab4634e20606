"""Batched box-prompt inference: preprocess once, encode once, decode all of an image's boxes.

The FP path reproduces segment_anything's `SamPredictor.set_image` followed by
`predict_torch(boxes=..., multimask_output=False)` and `> mask_threshold` exactly: it uses
the same `ResizeLongestSide` transform and the model's own `preprocess` / `postprocess_masks`.

On a GPU nothing here makes the host wait for the device except `PendingMasks.result`: host
arrays go up from pinned memory without blocking and the masks come down into pinned memory
behind a CUDA event, so `predict_stream` can launch the next image before the last one's masks
are back.
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


@dataclass(frozen=True)
class EncodedImage:
    """One image as the mask decoder needs it: its embedding [1, 256, h, w] on the device (possibly
    still being computed), its resized (h, w) before padding and its original (H, W)."""

    features: torch.Tensor
    input_hw: tuple[int, int]
    original_hw: tuple[int, int]


@dataclass(frozen=True)
class PendingMasks:
    """One image's predictions on their way to the host: masks bool [N, H, W] and IoUs float32 [N],
    CPU tensors (pinned on a GPU) that hold them once `copied` has completed (a CUDA event
    recorded after their copies; None when they were computed on the CPU)."""

    masks: torch.Tensor
    ious: torch.Tensor
    copied: torch.cuda.Event | None = None

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Wait for the copies; (masks bool [N, H, W], IoU float32 [N]) sharing the host tensors' memory."""
        if self.copied is not None:
            self.copied.synchronize()
        return self.masks.numpy(), self.ious.numpy()


class BoxPredictor:
    """Predicts one mask per box prompt with a (possibly quantized) SAM.

    model: a `Sam` (its quantizable twin is still a `Sam`); it is moved to `device`.
    chunk_size: boxes decoded per mask-decoder call (bounds memory for images with many boxes).

    `set_image` + `predict_boxes` is the simple, blocking interface; `encode` + `launch_boxes`
    are its two halves with the image state passed explicitly, which let a caller launch the
    next image before collecting the last one's masks (`predict_stream`).
    """

    def __init__(self, model: Sam, device: torch.device | str = "cpu", chunk_size: int = 64) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.input_size = model.image_encoder.img_size
        self.chunk_size = chunk_size
        self.transform = ResizeLongestSide(self.input_size)
        self._image: EncodedImage | None = None

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU tensor on the device; on a GPU through pinned memory, without waiting for the
        device (a copy from pageable memory would block until all queued kernels finished)."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 RGB [H, W, 3] -> (normalised, padded input [1, 3, S, S], resized (h, w))."""
        return self._model_input(self.transform.apply_image(image))

    def _model_input(self, resized: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self._to_device(torch.as_tensor(resized)).permute(2, 0, 1).contiguous()[None]
        return self.model.preprocess(x), (resized.shape[0], resized.shape[1])

    def prepare(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """The CPU part of `set_image` (thread-safe): (resized uint8 image, original (H, W))."""
        return self.transform.apply_image(image), (image.shape[0], image.shape[1])

    @torch.no_grad()
    def encode(self, prepared: tuple[np.ndarray, tuple[int, int]]) -> EncodedImage:
        """Launch the image encoder on the output of `prepare` (on a GPU, returns before it ran)."""
        resized, original_hw = prepared
        x, input_hw = self._model_input(resized)
        return EncodedImage(self.model.image_encoder(x), input_hw, original_hw)

    def set_image(self, image: np.ndarray) -> None:
        """Encode one uint8 RGB image [H, W, 3]; later `predict_boxes` calls reuse the embedding."""
        self._image = self.encode(self.prepare(image))

    def predict_boxes(self, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Masks for box prompts on the last image (boxes scaled as `apply_boxes_torch` does in float32).

        boxes: [N, 4] xyxy in original image pixels.
        Returns masks bool [N, H, W] at the original size and predicted IoU float32 [N].
        """
        if self._image is None:
            raise RuntimeError("set_image must be called before predict_boxes")
        return self.launch_boxes(self._image, boxes).result()

    @torch.no_grad()
    def launch_boxes(self, image: EncodedImage, boxes: np.ndarray) -> PendingMasks:
        """Launch the decoder on `image` for box prompts [N, 4] (xyxy, original pixels), `chunk_size`
        boxes per call, and the copies of the thresholded masks [N, H, W] and IoUs [N] to the host.

        On a GPU this returns before anything ran; the host tensors are fresh for every call, so a
        caller may hold several `PendingMasks` (PyTorch's pinned-memory cache reuses a buffer only
        once its copy completed and nothing references it).
        """
        h, w = image.original_hw
        pinned = self.device.type == "cuda"
        masks = torch.empty((len(boxes), h, w), dtype=torch.bool, pin_memory=pinned)
        ious = torch.empty((len(boxes),), dtype=torch.float32, pin_memory=pinned)
        if len(boxes) == 0:
            return PendingMasks(masks, ious)
        boxes_t = self._to_device(torch.as_tensor(np.asarray(boxes), dtype=torch.float))
        boxes_t = self.transform.apply_boxes_torch(boxes_t, image.original_hw)
        for start in range(0, len(boxes_t), self.chunk_size):
            chunk = slice(start, start + self.chunk_size)
            logits, iou = sam_decode(self.model, image.features, boxes_t[chunk])
            upscaled = self.model.postprocess_masks(logits, image.input_hw, image.original_hw)
            masks[chunk].copy_(upscaled[:, 0] > self.model.mask_threshold, non_blocking=pinned)
            ious[chunk].copy_(iou[:, 0], non_blocking=pinned)
        if not pinned:
            return PendingMasks(masks, ious)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(self.device))
        return PendingMasks(masks, ious, copied)


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
    """Segment many images in order, reading and resizing the next ones in background threads
    and keeping one image in flight on the device.

    loaders: one callable per image that reads it and its prompts (run in a worker thread,
    followed by `predictor.prepare`). Yields (item, masks bool [N, H, W], iou float32 [N]) in the
    order of `loaders`; the predictions are exactly `set_image(item.image)` + `predict_boxes(item.boxes)`.
    Image i+1's encoder and decoder are launched before waiting for image i's masks, so on a GPU
    the device computes i+1 while the host collects i (on the CPU each launch computes at once:
    the same results, yielded one image later).
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
        in_flight: tuple[PromptedImage, PendingMasks] | None = None
        while pending:
            item, prepared = pending.popleft().result()
            next_loader = next(queue, None)
            if next_loader is not None:
                pending.append(pool.submit(load_and_prepare, next_loader))
            launched = item, predictor.launch_boxes(predictor.encode(prepared), item.boxes)
            if in_flight is not None:
                yield in_flight[0], *in_flight[1].result()
            in_flight = launched
        if in_flight is not None:
            yield in_flight[0], *in_flight[1].result()
