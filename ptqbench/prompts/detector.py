"""Running a torchvision detector over images: batched, read ahead in threads, with a progress bar.

Images are uint8 RGB arrays (decoded by `tasks.images.read_image`, OpenCV as the reference
reads); the detector gets them as float [3, H, W] in [0, 1] and applies its own transform
(ImageNet normalisation, resize to min_size / max_size, padding to a multiple of 32) and maps
its boxes back to image pixels.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

if TYPE_CHECKING:
    import torch
    from torch import nn

READ_AHEAD_THREADS = 4


@dataclass(frozen=True)
class ImageDetections:
    """A detector's output for one image, best first.

    boxes: float64 [N, 4] xyxy in image pixels; labels: int64 [N] (torchvision's 91-id COCO
    labels = COCO category ids); scores: float64 [N].
    """

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray


@dataclass
class DetectionTiming:
    """Images and seconds of a detection pass (reading included)."""

    images: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def torch_device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else the CPU; "cpu", "cuda", "cuda:N" as given (ConfigError
    for CUDA on a machine without it)."""
    import torch

    from ptqbench.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} was asked for but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}") from None


def _batches(loaders: Sequence[Callable[[], np.ndarray]], batch_size: int) -> Iterator[list[np.ndarray]]:
    """The loaders' images in batches of `batch_size`, decoded ahead in threads (at most two
    batches in flight)."""
    with ThreadPoolExecutor(max_workers=READ_AHEAD_THREADS) as pool:
        pending: deque[Future] = deque()
        upcoming = iter(loaders)
        for loader in upcoming:
            pending.append(pool.submit(loader))
            if len(pending) >= 2 * batch_size:
                break
        while pending:
            batch = [pending.popleft().result() for _ in range(min(batch_size, len(pending)))]
            for loader in upcoming:
                pending.append(pool.submit(loader))
                if len(pending) >= 2 * batch_size:
                    break
            yield batch


def _to_input(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 RGB [H, W, 3] -> float [3, H, W] in [0, 1] on `device` (converted there)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1).float().div_(255.0)


def detect(model: nn.Module, loaders: Sequence[Callable[[], np.ndarray]], device: torch.device, *,
           batch_size: int, progress: bool = True, desc: str = "detector",
           timing: DetectionTiming | None = None) -> list[ImageDetections]:
    """The detections of every loader's image, in loader order.

    model: a torchvision detector in eval mode (moved to `device` here); loaders: callables
    returning uint8 RGB [H, W, 3]; batch_size: images per forward. `timing`, when given, gets
    the images and seconds of the pass.
    """
    import torch

    model = model.to(device).eval()
    results: list[ImageDetections] = []
    start = time.perf_counter()
    with torch.inference_mode(), tqdm(total=len(loaders), desc=desc, unit="img", disable=not progress) as bar:
        for batch in _batches(loaders, batch_size):
            outputs = model([_to_input(image, device) for image in batch])
            for output in outputs:
                results.append(ImageDetections(boxes=output["boxes"].double().cpu().numpy().reshape(-1, 4),
                                               labels=output["labels"].cpu().numpy().astype(np.int64),
                                               scores=output["scores"].double().cpu().numpy()))
            bar.update(len(batch))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if timing is not None:
        timing.images, timing.seconds = len(loaders), time.perf_counter() - start
    return results


def coco_entries(image_id: int, found: ImageDetections, category_ids: set[int]) -> list[dict]:
    """COCO results-format entries of one image: {image_id, category_id, bbox [x, y, w, h], score},
    best first; boxes whose label is not a category of the annotation file (torchvision's label
    map has 11 unused ids, and random weights may predict them) are dropped."""
    entries = []
    for (x0, y0, x1, y1), label, score in zip(found.boxes.tolist(), found.labels.tolist(), found.scores.tolist()):
        if label in category_ids:
            entries.append({"image_id": int(image_id), "category_id": int(label),
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    return entries
