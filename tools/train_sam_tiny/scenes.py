"""Training scenes: the three demo families generated on the fly, SAM's preprocessing, the DataLoader
stream and the device-side replay pool (`SceneFeeder`)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ptqbench.demo.ade20k_scenes import region_scene
from ptqbench.demo.aerial_scenes import aerial_scene
from ptqbench.demo.coco_scenes import object_scene
from tools.train_sam_tiny.config import (
    _TRAIN_STREAM,
    ADE_MIN_AREA,
    DOTA_CROPS,
    DOTA_MIN_AREA,
    FAMILIES,
    LOADER_BATCH,
    MIN_INPUT_AREA,
    TrainConfig,
)


@dataclass
class Scene:
    """One training scene in the model input frame (S = the model input side).

    image: uint8 [S, S, 3] RGB, the resized image at the top left, zero padding elsewhere.
    hw: (h, w) of the resized image. masks: bool [K, S, S], K >= 1 instances.
    boxes: float32 [K, 4] tight xyxy boxes in pixel-edge coordinates of the input frame.
    scale: input pixels per original pixel. family: index into FAMILIES.
    """

    image: torch.Tensor
    hw: tuple[int, int]
    masks: torch.Tensor
    boxes: torch.Tensor
    scale: float
    family: int




def coco_instances(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """One COCO-style scene -> [(image uint8 [H, W, 3], masks bool [K, H, W])]."""
    height, width = int(rng.integers(240, 321)), int(rng.integers(320, 401))
    if rng.random() < 0.2:
        height, width = width, height
    image, masks, _ = object_scene(rng, height, width)
    return [(image, masks)]


def ade_instances(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """One ADE-style scene -> [(image, masks of the 8-connected label components >= ADE_MIN_AREA)]."""
    import cv2

    height, width = int(rng.integers(240, 273)), int(rng.integers(304, 337))
    image, labels = region_scene(rng, height, width)
    masks = []
    for label in np.unique(labels):
        count, components, stats, _ = cv2.connectedComponentsWithStats(
            (labels == label).astype(np.uint8), connectivity=8)
        masks.extend(components == k for k in range(1, count) if stats[k, cv2.CC_STAT_AREA] >= ADE_MIN_AREA)
    return [(image, np.stack(masks))] if masks else []


def dota_instances(rng: np.random.Generator, side: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One aerial scene cut into DOTA_CROPS random side x side crops with their object parts."""
    height, width = int(rng.integers(480, 546)), int(rng.integers(480, 546))
    image, masks, _, _ = aerial_scene(rng, height, width)
    crops = []
    for _ in range(DOTA_CROPS):
        y0, x0 = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        window = masks[:, y0:y0 + side, x0:x0 + side]
        keep = window.sum(axis=(1, 2)) >= DOTA_MIN_AREA
        if keep.any():
            crops.append((np.ascontiguousarray(image[y0:y0 + side, x0:x0 + side]), window[keep]))
    return crops


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight boxes of masks bool [K, H, W] -> float32 [K, 4] xyxy, pixel edges (x0, y0, x1 + 1, y1 + 1)."""
    rows, cols = masks.any(axis=2), masks.any(axis=1)
    y0, x0 = rows.argmax(axis=1), cols.argmax(axis=1)
    y1 = masks.shape[1] - rows[:, ::-1].argmax(axis=1)
    x1 = masks.shape[2] - cols[:, ::-1].argmax(axis=1)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)


def to_input_frame(image: np.ndarray, masks: np.ndarray, side: int, family: int) -> Scene | None:
    """Resize (SAM's ResizeLongestSide) and zero-pad one scene; None when no instance survives."""
    import cv2

    resized = ResizeLongestSide(side).apply_image(image)
    h, w = resized.shape[:2]
    if (h, w) == masks.shape[1:]:
        small = masks
    else:
        small = np.stack([cv2.resize(m, (w, h), interpolation=cv2.INTER_AREA)
                          for m in masks.astype(np.uint8) * 255]) >= 128
    small = small[small.sum(axis=(1, 2)) >= MIN_INPUT_AREA]
    if len(small) == 0:
        return None
    padded = np.zeros((side, side, 3), dtype=np.uint8)
    padded[:h, :w] = resized
    padded_masks = np.zeros((len(small), side, side), dtype=bool)
    padded_masks[:, :h, :w] = small
    return Scene(image=torch.from_numpy(padded), hw=(h, w), masks=torch.from_numpy(padded_masks),
                 boxes=torch.from_numpy(mask_boxes(padded_masks)), scale=h / image.shape[0], family=family)


def family_instances(rng: np.random.Generator, family: int, side: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One draw of FAMILIES[family] at the original size: [(image, masks)] (DOTA: several crops)."""
    if FAMILIES[family] == "coco":
        return coco_instances(rng)
    if FAMILIES[family] == "dota":
        return dota_instances(rng, side)
    return ade_instances(rng)


def generate_scenes(rng: np.random.Generator, family: int, side: int) -> list[Scene]:
    """The training scenes of one draw of `family`, in the model input frame."""
    scenes = [to_input_frame(image, masks, side, family) for image, masks in family_instances(rng, family, side)]
    return [scene for scene in scenes if scene is not None]


class SceneStream(IterableDataset):
    """An endless stream of training scenes; each worker has its own seeded random stream.

    Families are drawn so that each gives about a third of the scenes (a DOTA draw yields
    DOTA_CROPS crops, so it is drawn DOTA_CROPS times less often).
    """

    def __init__(self, seed: int, side: int) -> None:
        self.seed, self.side = seed, side

    def __iter__(self) -> Iterator[Scene]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _TRAIN_STREAM, worker]))
        draws = np.array([1.0, 1.0 / DOTA_CROPS, 1.0])
        draws /= draws.sum()
        while True:
            yield from generate_scenes(rng, int(rng.choice(len(FAMILIES), p=draws)), self.side)


def _worker_init(_: int) -> None:
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def collate_scenes(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Scenes -> one dict of tensors (pinned and moved to the device in a few copies):
    images uint8 [n, S, S, 3], masks bool [sum K, S, S], boxes [sum K, 4], counts (K) [n],
    hw [n, 2], scale [n], family [n]."""
    return {
        "images": torch.stack([scene.image for scene in scenes]),
        "masks": torch.cat([scene.masks for scene in scenes]),
        "boxes": torch.cat([scene.boxes for scene in scenes]),
        "counts": torch.tensor([scene.masks.shape[0] for scene in scenes]),
        "hw": torch.tensor([scene.hw for scene in scenes]),
        "scale": torch.tensor([scene.scale for scene in scenes], dtype=torch.float32),
        "family": torch.tensor([scene.family for scene in scenes]),
    }


def split_scenes(parts: dict[str, torch.Tensor], device: torch.device) -> list[Scene]:
    """Undo `collate_scenes`, with the image, masks and boxes moved to `device` (asynchronously
    when `parts` is pinned)."""
    counts = parts["counts"].tolist()
    images = parts["images"].to(device, non_blocking=True)
    masks = parts["masks"].to(device, non_blocking=True).split(counts)
    boxes = parts["boxes"].to(device, non_blocking=True).split(counts)
    return [Scene(image=images[i], hw=(int(h), int(w)), masks=masks[i], boxes=boxes[i], scale=float(scale),
                  family=int(family))
            for i, ((h, w), scale, family) in enumerate(zip(parts["hw"].tolist(), parts["scale"].tolist(),
                                                            parts["family"].tolist()))]


class SceneFeeder:
    """Scenes from the DataLoader.

    With workers, a background thread moves the loader's output into a queue and `drain()`
    returns whatever is ready (the GPU never waits once the pool is full). Without workers
    (CPU tests), `drain()` generates one loader batch per call in the calling thread, so the
    run is deterministic.
    """

    def __init__(self, config: TrainConfig, side: int, device: torch.device) -> None:
        loader = DataLoader(SceneStream(config.seed, side), batch_size=min(LOADER_BATCH, config.batch),
                            collate_fn=collate_scenes,
                            num_workers=config.workers, worker_init_fn=_worker_init,
                            pin_memory=device.type == "cuda",
                            prefetch_factor=4 if config.workers > 0 else None)
        self.device = device
        self._iterator: Iterator[dict[str, torch.Tensor]] | None = iter(loader)
        self._queue: queue.Queue[dict[str, torch.Tensor]] = queue.Queue(maxsize=32)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if config.workers > 0:
            self._thread = threading.Thread(target=self._run, name="scene-feeder", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            for scenes in self._iterator:
                while not self._stop.is_set():
                    try:
                        self._queue.put(scenes, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the training thread by drain()
            self._error = exc

    def drain(self, at_least: int = 0) -> list[Scene]:
        """The scenes ready now, on the device (at least `at_least`; without workers: one loader
        batch or more)."""
        scenes: list[Scene] = []
        if self._thread is None:
            while not scenes or len(scenes) < at_least:
                scenes.extend(split_scenes(next(self._iterator), self.device))
            return scenes
        while True:
            try:
                parts = self._queue.get(block=len(scenes) < at_least, timeout=1.0)
                scenes.extend(split_scenes(parts, self.device))
            except queue.Empty:
                if self._error is not None:
                    raise RuntimeError("scene generation failed") from self._error
                if len(scenes) >= at_least:
                    return scenes

    def close(self) -> None:
        """Stop the thread and the workers (dropping the loader's iterator shuts them down);
        calling it again does nothing."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._iterator = None
