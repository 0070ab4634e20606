"""Batched box-prompt inference: preprocess once, encode once, decode all of an image's boxes.

`BoxPredictor` is SAM-1's `ptqbench.models.prediction.Predictor`. Its FP path reproduces
segment_anything's `SamPredictor.set_image` followed by `predict_torch(boxes=...,
multimask_output=False)` and `> mask_threshold` exactly: it uses the same `ResizeLongestSide`
transform and the model's own `preprocess` / `postprocess_masks`, and `BoxPredictor.stream`
encodes images in batches only where that is bit-identical (`BatchedImageEncoder`).

On a GPU nothing here makes the host wait for the device except `PendingMasks.result` (and the
one-time bit check of each encoder batch size). Host arrays go up from pinned memory without
blocking. Masks are decoded on a second stream, overlapping the next images' encoding, and come
down into pinned memory behind a CUDA event. So `BoxPredictor.stream` can launch the next batch
before the last one's masks are back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from ptqbench.models.prediction import PromptedImage
from ptqbench.models.sam1.automatic import AutomaticMaskGenerator
from ptqbench.models.sam1.batched_encoder import BatchedImageEncoder
from ptqbench.transfer import upload


@dataclass(frozen=True)
class EncodedImage:
    """One image as the mask decoder needs it: its embedding [1, 256, h, w] on the device (possibly
    still being computed), its resized (h, w) before padding and its original (H, W). On a GPU,
    `ready` is the CUDA event `encode_many` recorded after launching the encoding (None on the CPU)."""

    features: torch.Tensor
    input_hw: tuple[int, int]
    original_hw: tuple[int, int]
    ready: torch.cuda.Event | None = None


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
    encoder_batch: images per image-encoder call in `encode_many` (default 4 on a GPU, where it is
        faster, and 1 on the CPU, where it is not and a batch of SAM-H attention maps takes GBs).

    `set_image` + `predict_boxes` is the simple, blocking interface; `encode` + `launch_boxes`
    are its two halves with the image state passed explicitly, which let a caller launch the
    next image before collecting the last one's masks (`stream`). `automatic_mask_generator`
    is segment_anything's prompt-free generator on the same model.
    """

    def __init__(self, model: Sam, device: torch.device | str = "cpu", chunk_size: int = 64,
                 encoder_batch: int | None = None) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.input_size = model.image_encoder.img_size
        self.chunk_size = chunk_size
        if encoder_batch is None:
            encoder_batch = 4 if self.device.type == "cuda" else 1
        self.batched_encoder = BatchedImageEncoder(self.model.image_encoder, encoder_batch)
        self._decode_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.transform = ResizeLongestSide(self.input_size)
        self._image: EncodedImage | None = None

    @property
    def encoder_batch(self) -> int:
        """Images per image-encoder call in `encode_many` (drops to 1 if batching was not bit-identical)."""
        return self.batched_encoder.batch_size

    def _host_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """A CPU tensor in pinned memory on a GPU (so that its upload does not wait for the device:
        a copy from pageable memory blocks until all queued kernels finished), as it is otherwise."""
        return tensor.pin_memory() if self.device.type == "cuda" else tensor

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """uint8 RGB [H, W, 3] -> (normalised, padded input [1, 3, S, S], resized (h, w))."""
        return self._model_input(self.prepare(image)[0])

    def _model_input(self, resized: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = upload(resized, self.device).permute(2, 0, 1).contiguous()[None]
        return self.model.preprocess(x), (resized.shape[0], resized.shape[1])

    def prepare(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """The CPU part of `set_image`, thread-safe so that it can run ahead in a worker thread:
        (resized uint8 image [h, w, 3], pinned on a GPU; original (H, W))."""
        resized = torch.as_tensor(self.transform.apply_image(image))
        return self._host_tensor(resized), (image.shape[0], image.shape[1])

    def encode(self, prepared: tuple[torch.Tensor, tuple[int, int]]) -> EncodedImage:
        """Launch the image encoder on the output of `prepare` (on a GPU, returns before it ran)."""
        return self.encode_many([prepared])[0]

    @torch.no_grad()
    def encode_many(self, prepared: Sequence[tuple[torch.Tensor, tuple[int, int]]]) -> list[EncodedImage]:
        """`encode` for several outputs of `prepare`, `encoder_batch` images per encoder call."""
        inputs = [self._model_input(resized) for resized, _ in prepared]
        features = self.batched_encoder([x for x, _ in inputs])
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        return [EncodedImage(f, input_hw, original_hw, ready)
                for f, (_, input_hw), (_, original_hw) in zip(features, inputs, prepared)]

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

        On a GPU this returns before anything ran. The decoding runs on a stream of its own, after
        the image's encoding (`image.ready`), so it overlaps the encoding of images launched later.
        The host tensors are fresh for every call, so a caller may hold several `PendingMasks`
        (PyTorch's pinned-memory cache reuses a buffer only once its copy completed and nothing
        references it).
        """
        h, w = image.original_hw
        on_gpu = self._decode_stream is not None
        masks = torch.empty((len(boxes), h, w), dtype=torch.bool, pin_memory=on_gpu)
        ious = torch.empty((len(boxes),), dtype=torch.float32, pin_memory=on_gpu)
        if len(boxes) == 0:
            return PendingMasks(masks, ious)
        if not on_gpu:
            self._decode_into(image, boxes, masks, ious)
            return PendingMasks(masks, ious)
        self._decode_stream.wait_event(image.ready)
        with torch.cuda.stream(self._decode_stream):
            image.features.record_stream(self._decode_stream)
            self._decode_into(image, boxes, masks, ious)
            copied = torch.cuda.Event()
            copied.record(self._decode_stream)
        return PendingMasks(masks, ious, copied)

    def _decode_into(self, image: EncodedImage, boxes: np.ndarray, masks: torch.Tensor, ious: torch.Tensor) -> None:
        """Decode boxes [N, 4] on `image` into host tensors masks [N, H, W] and ious [N] (on a GPU,
        copies launched on the current stream)."""
        non_blocking = self.device.type == "cuda"
        boxes_t = upload(torch.as_tensor(np.asarray(boxes), dtype=torch.float), self.device)
        boxes_t = self.transform.apply_boxes_torch(boxes_t, image.original_hw)
        for start in range(0, len(boxes_t), self.chunk_size):
            chunk = slice(start, start + self.chunk_size)
            logits, iou = sam_decode(self.model, image.features, boxes_t[chunk])
            upscaled = self.model.postprocess_masks(logits, image.input_hw, image.original_hw)
            masks[chunk].copy_(upscaled[:, 0] > self.model.mask_threshold, non_blocking=non_blocking)
            ious[chunk].copy_(iou[:, 0], non_blocking=non_blocking)

    def stream(self, loaders: Iterable[Callable[[], PromptedImage]], *,
               workers: int = 4) -> Iterator[tuple[PromptedImage, np.ndarray, np.ndarray]]:
        """Segment many images in order: read, resize and pin the next ones in background threads,
        encode them `encoder_batch` at a time, and decode one batch behind the encoding.

        loaders: one callable per image that reads it and its prompts (run in a worker thread,
        followed by `prepare`), taken from the iterable as the workers need them. Yields (item,
        masks bool [N, H, W], iou float32 [N]) in the order of `loaders`; the predictions are
        exactly `set_image(item.image)` + `predict_boxes(item.boxes)`.
        Each step launches the encoding of batch k+1, then the decoding of batch k (which overlaps
        it on the GPU), then collects the masks of batch k-1. On the CPU each launch computes at
        once: the same results, yielded two batches later.
        """

        def load_and_prepare(loader: Callable[[], PromptedImage]) -> tuple[PromptedImage, Any]:
            item = loader()
            return item, self.prepare(item.image)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            pending: deque = deque()
            queue = iter(loaders)

            def refill() -> None:
                for loader in queue:
                    pending.append(pool.submit(load_and_prepare, loader))
                    if len(pending) >= 2 * max(workers, self.encoder_batch):
                        return

            refill()
            encoded: list[tuple[PromptedImage, EncodedImage]] = []
            decoding: list[tuple[PromptedImage, PendingMasks]] = []
            while pending or encoded:
                next_encoded = []
                if pending:
                    batch = [pending.popleft().result() for _ in range(min(self.encoder_batch, len(pending)))]
                    refill()
                    images = self.encode_many([prepared for _, prepared in batch])
                    next_encoded = [(item, image) for (item, _), image in zip(batch, images)]
                launched = [(item, self.launch_boxes(image, item.boxes)) for item, image in encoded]
                for item, masks in decoding:
                    yield item, *masks.result()
                encoded, decoding = next_encoded, launched
            for item, masks in decoding:
                yield item, *masks.result()

    def automatic_mask_generator(self, points_per_side: int, points_per_batch: int,
                                 settings: Mapping[str, Any]) -> AutomaticMaskGenerator:
        """segment_anything's `SamAutomaticMaskGenerator` on this predictor's model (a SAM or its
        quantizable twin), behind `AutomaticMaskGenerator.masks`; settings: its other constructor
        arguments (thresholds, crop layers, ...)."""
        return AutomaticMaskGenerator(self.model, points_per_side, points_per_batch, settings)


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
