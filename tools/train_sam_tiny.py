"""Train `sam_tiny` from scratch on freshly generated synthetic scenes, SAM-style.

Data: DataLoader workers draw endless scenes of the three demo families from
`ptqbench.demo`, at the sizes the demo evaluation uses:

- coco: `object_scene`, 240-320 x 320-400 (20% portrait); instances = the visible masks;
- dota: `aerial_scene`, 480-545 square-ish, cut into `DOTA_CROPS` random crops of the model
  input size (the DOTA task runs SAM on windows of that side); instances = the objects' parts
  inside the crop (at least `DOTA_MIN_AREA` pixels);
- ade: `region_scene`, 240-272 x 304-336; instances = the 8-connected components of every label
  (clutter `0` included) with at least `ADE_MIN_AREA` pixels, as the ADE20K task's box prompts.

Each scene goes through SAM's own preprocessing: `ResizeLongestSide(input)` for the image,
masks resized alike (pixel area, kept where covered >= 1/2), then `Sam.preprocess` (normalise,
pad) on the device.

Generated scenes enter a replay pool on the device (FIFO, `--pool` scenes); every step samples
`--batch` scenes of the pool, and `--prompts` instances per scene with fresh prompts, so the GPU
never waits for the CPU and each scene is reused with new prompts about (GPU rate / CPU rate)
times.

Prompts per scene (fixed shares, random instances): half are boxes (the tight box plus noise of
std 10% of the side per coordinate, at most 20 original pixels; `EXACT_BOX_SHARE` of the boxes
are left tight, as the evaluation's GT boxes are), 3/8 single foreground points, 1/8 three
points (one foreground, each other one foreground or background at random). As in SAM, a
single point is ambiguous: the decoder's three multimask outputs are trained with the
minimum-loss one only; boxes and several points train the single-mask output.

Loss: 20 * focal + dice per mask (on the low-res logits upsampled to the input size, the way
`Sam.postprocess_masks` does first), plus the MSE between the IoU head and the actual IoU of
each predicted mask (all produced outputs). AdamW, linear warm-up, cosine decay over the
training progress (the larger of steps / `--max-steps` and time / budget, so the schedule
ends when the time budget does), gradient clipping, bf16 autocast on the GPU (the prompt and
positional encodings stay float32, as at inference).

Two pieces re-express segment_anything code for batching, each tested equal to the original:
`decode` (`MaskDecoder.predict_masks` for prompts of many images in one call; the original
takes one image) and `embed_points` (the prompt encoder's point embedding without its
boolean-mask assignments, which would each stall the GPU queue).

Logs into `--log-dir`: `train_log.csv` (step, time, lr, losses, throughput), `val_log.csv`
(box-prompted mIoU per family on held-out generated scenes, through `BoxPredictor`: the
evaluation's own inference path) and `metrics.json` (final validation, steps, sha256). The
weights go to `--out` as a float16 state dict (at most `MAX_CHECKPOINT_BYTES`); the last line
printed is its sha256, for `SAM_TINY_SHA256`.

Seeded: the init, the data stream of every worker, the replay and prompt sampling and the
validation scenes derive from `--seed`; with workers the mix of fresh and replayed scenes
depends on timing, so two runs are not bit-identical.

Usage (see tools/README.md; the weights then go to ptqbench/data/sam_tiny.pt):
    PYTHONPATH=. python3 tools/train_sam_tiny.py --out $OUT/sam_tiny.pt --log-dir $OUT \
        --minutes 8 --device cuda
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam
from segment_anything.utils.transforms import ResizeLongestSide
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ptqbench.demo.ade20k_scenes import region_scene
from ptqbench.demo.aerial_scenes import aerial_scene
from ptqbench.demo.coco_scenes import object_scene
from ptqbench.errors import ConfigError
from ptqbench.sam.inference import BoxPredictor
from ptqbench.sam.models import build_sam_tiny
from ptqbench.tasks.ade20k import MIN_COMPONENT_AREA

log = logging.getLogger("train_sam_tiny")

FAMILIES = ("coco", "dota", "ade")
DOTA_CROPS = 4
LOADER_BATCH = 8
DOTA_MIN_AREA = 12
ADE_MIN_AREA = MIN_COMPONENT_AREA
MIN_INPUT_AREA = 4
BOX_SHARE, POINT_SHARE = 0.5, 0.375
MULTI_POINTS = 3
BOX_NOISE, BOX_NOISE_MAX_PX = 0.1, 20.0
EXACT_BOX_SHARE = 0.25
FOCAL_WEIGHT, DICE_WEIGHT = 20.0, 1.0
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
MAX_CHECKPOINT_BYTES = 16_000_000
_TRAIN_STREAM, _VAL_STREAM, _SAMPLING_STREAM = 7, 8, 9


@dataclass(frozen=True)
class TrainConfig:
    """All settings of one training run (the command-line flags)."""

    out: Path
    log_dir: Path
    device: str = "cuda"
    minutes: float = 8.0
    max_steps: int = 12000
    batch: int = 64
    prompts: int = 16
    workers: int = 12
    pool: int = 2048
    lr: float = 1e-3
    min_lr_ratio: float = 0.02
    weight_decay: float = 0.1
    warmup_steps: int = 250
    grad_clip: float = 1.0
    seed: int = 0
    val_scenes: int = 16
    val_every: int = 500
    log_every: int = 50
    reserve_s: float = 15.0


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


# ----------------------------------------------------------------------------- data


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


# ----------------------------------------------------------------------------- prompts


@dataclass
class Batch:
    """One step's inputs on the device (B scenes, P prompts each, S the input side).

    images: float [B, 3, S, S] preprocessed. targets: bool [B, P, S, S].
    boxes: float [B, Pb, 4] jittered boxes for the first Pb prompts of each scene.
    points: float [B, Pp, 2] one foreground point for the next Pp prompts.
    multi_points: float [B, Pm, MULTI_POINTS, 2], multi_labels: int [B, Pm, MULTI_POINTS] for the last Pm.
    """

    images: torch.Tensor
    targets: torch.Tensor
    boxes: torch.Tensor
    points: torch.Tensor
    multi_points: torch.Tensor
    multi_labels: torch.Tensor


def prompt_counts(prompts: int) -> tuple[int, int, int]:
    """(boxes, single points, multi-point prompts) per scene: shares BOX_SHARE, POINT_SHARE and
    the rest, at least one of each kind from 3 prompts on (16 -> 8, 6, 2)."""
    if prompts < 1:
        raise ConfigError(f"--prompts must be at least 1, got {prompts}")
    n_multi = max(1, round(prompts * (1 - BOX_SHARE - POINT_SHARE))) if prompts >= 3 else 0
    n_point = max(1, round(prompts * POINT_SHARE)) if prompts >= 2 else 0
    return prompts - n_point - n_multi, n_point, n_multi


def jitter_boxes(boxes: torch.Tensor, scale: torch.Tensor, hw: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    """SAM's box noise: per coordinate std 10% of the box side, at most 20 original pixels.

    boxes: [N, 4] tight xyxy (input frame); scale: [N] input px per original px; hw: [N, 2]
    resized image size. EXACT_BOX_SHARE of the boxes stay tight. Returns [N, 4], clipped to
    the image, at least 1 pixel wide and high.
    """
    side = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], dim=1).repeat(1, 2)
    noise = torch.randn(boxes.shape, generator=generator, device=boxes.device) * BOX_NOISE * side
    limit = (BOX_NOISE_MAX_PX * scale)[:, None]
    noise = torch.maximum(torch.minimum(noise, limit), -limit)
    exact = torch.rand(boxes.shape[0], generator=generator, device=boxes.device) < EXACT_BOX_SHARE
    noisy = boxes + noise.masked_fill(exact[:, None], 0.0)
    upper = hw.flip(1).repeat(1, 2).to(boxes.dtype)
    noisy = torch.minimum(torch.clamp(noisy, min=0.0), upper)
    x0 = torch.minimum(noisy[:, 0], noisy[:, 2] - 1.0)
    y0 = torch.minimum(noisy[:, 1], noisy[:, 3] - 1.0)
    return torch.stack([x0, y0, noisy[:, 2], noisy[:, 3]], dim=1)


def sample_pixels(weights: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` pixels per row of weights [N, S, S] (non-negative, some row sums may be 0)
    -> (x, y) float [N, count, 2]; a row of zeros samples uniformly."""
    flat = weights.flatten(1).float()
    flat = flat + (flat.sum(dim=1, keepdim=True) == 0).float()
    index = torch.multinomial(flat, count, replacement=True, generator=generator)
    side = weights.shape[-1]
    return torch.stack([index % side, index // side], dim=-1).float()


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on `device` without a device sync (through pinned memory on CUDA;
    a plain copy from pageable memory waits for the device to finish its queued work)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def make_batch(model: Sam, pool: list[Scene], config: TrainConfig, rng: np.random.Generator,
               generator: torch.Generator) -> Batch:
    """Sample `config.batch` scenes of the pool and `config.prompts` prompts for each: distinct
    instances while the scene has enough, then repeats (with other prompts)."""
    device = model.pixel_mean.device
    b, p = config.batch, config.prompts
    n_box, n_point, n_multi = prompt_counts(p)
    chosen = [pool[i] for i in rng.integers(0, len(pool), b)]
    orders = []
    for scene in chosen:
        k = scene.masks.shape[0]
        order = rng.permutation(k)[:p]
        orders.append(np.concatenate([order, rng.integers(0, k, p - len(order))]))
    index = to_device(np.stack(orders), device)
    scale = to_device(np.array([scene.scale for scene in chosen], dtype=np.float32), device)
    hw = to_device(np.array([scene.hw for scene in chosen], dtype=np.int64), device)
    images = torch.cat([model.preprocess(scene.image[:scene.hw[0], :scene.hw[1]].permute(2, 0, 1)[None].float())
                        for scene in chosen])
    targets = torch.stack([scene.masks[index[i]] for i, scene in enumerate(chosen)])
    tight = torch.stack([scene.boxes[index[i]] for i, scene in enumerate(chosen)])
    boxes = jitter_boxes(tight[:, :n_box].reshape(-1, 4), scale.repeat_interleave(n_box),
                         hw.repeat_interleave(n_box, dim=0), generator).view(b, n_box, 4)
    point_masks = targets[:, n_box:n_box + n_point].flatten(0, 1)
    points = sample_pixels(point_masks, 1, generator).view(b, n_point, 2)
    multi_points, multi_labels = sample_multi_points(targets[:, n_box + n_point:].flatten(0, 1),
                                                     tight[:, n_box + n_point:].reshape(-1, 4), generator)
    return Batch(images=images, targets=targets, boxes=boxes, points=points,
                 multi_points=multi_points.view(b, n_multi, MULTI_POINTS, 2),
                 multi_labels=multi_labels.view(b, n_multi, MULTI_POINTS))


def sample_multi_points(masks: torch.Tensor, boxes: torch.Tensor, generator: torch.Generator
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """MULTI_POINTS points per mask [N, S, S]: the first foreground, each other one foreground
    or background (from the tight box [N, 4] grown by half its side, outside the mask).

    Returns coordinates float [N, MULTI_POINTS, 2] (x, y) and labels int [N, MULTI_POINTS].
    """
    n, side = masks.shape[0], masks.shape[-1]
    if n == 0:
        return masks.new_zeros((0, MULTI_POINTS, 2), dtype=torch.float), masks.new_zeros((0, MULTI_POINTS),
                                                                                        dtype=torch.long)
    foreground = sample_pixels(masks, MULTI_POINTS, generator)
    grid = torch.arange(side, device=masks.device, dtype=torch.float)
    half_w = (boxes[:, 2] - boxes[:, 0])[:, None] / 2
    half_h = (boxes[:, 3] - boxes[:, 1])[:, None] / 2
    in_x = (grid[None] >= boxes[:, :1] - half_w) & (grid[None] < boxes[:, 2:3] + half_w)
    in_y = (grid[None] >= boxes[:, 1:2] - half_h) & (grid[None] < boxes[:, 3:4] + half_h)
    background = sample_pixels(in_y[:, :, None] & in_x[:, None, :] & ~masks, MULTI_POINTS, generator)
    labels = (torch.rand((n, MULTI_POINTS), generator=generator, device=masks.device) < 0.5).long()
    labels[:, 0] = 1
    coords = torch.where(labels[..., None] == 1, foreground, background)
    return coords, labels


# ----------------------------------------------------------------------------- model


def embed_points(prompt_encoder: PromptEncoder, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`PromptEncoder` sparse embeddings of point prompts (no box: one padding point appended),
    without its boolean-mask assignments (each one a device sync).

    points: float [N, M, 2] (x, y) input-frame pixels; labels: int [N, M] of 0 and 1 only.
    Returns [N, M + 1, C], equal to `prompt_encoder(points=(points, labels), boxes=None, masks=None)[0]`.
    """
    encoded = prompt_encoder.pe_layer.forward_with_coords(points + 0.5, prompt_encoder.input_image_size)
    label_embedding = torch.where(labels[..., None] == 1, prompt_encoder.point_embeddings[1].weight,
                                  prompt_encoder.point_embeddings[0].weight)
    padding = prompt_encoder.not_a_point_embed.weight.expand(points.shape[0], 1, -1)
    return torch.cat([encoded + label_embedding, padding], dim=1)


def decode(decoder: MaskDecoder, embeddings: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
           dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`MaskDecoder.predict_masks` for prompts of different images in one call.

    embeddings: [N, C, h, w], the image embedding of each prompt's image (predict_masks takes
    one image and repeats it); image_pe: [1, C, h, w]; sparse: [N, T, C]; dense: [N, C, h, w]
    or broadcastable to it (the no-mask embedding [1, C, 1, 1]).
    Returns all mask logits [N, 4, 4h, 4w] and IoU predictions [N, 4] (before output selection).
    """
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens[None].expand(sparse.shape[0], -1, -1).to(sparse.dtype), sparse), dim=1)
    src = embeddings + dense
    pos_src = image_pe.expand(src.shape[0], -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1:1 + decoder.num_mask_tokens, :]
    upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :])
                            for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    return masks, decoder.iou_prediction_head(iou_token_out)


def forward(model: Sam, batch: Batch, autocast: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Encode the images and decode all prompts (bf16 autocast when `autocast`, except the
    prompt and positional encodings, which stay float32 as at inference).

    Returns per prompt kind ("box", "point", "multi") (mask logits [N, 4, S/4, S/4], IoU [N, 4]),
    rows in scene-major order (scene 0's prompts first).
    """
    encoder = model.prompt_encoder
    b = batch.images.shape[0]
    n_box, n_point, n_multi = batch.boxes.shape[1], batch.points.shape[1], batch.multi_points.shape[1]
    image_pe = encoder.get_dense_pe()
    dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    box_sparse, _ = encoder(points=None, boxes=batch.boxes.reshape(-1, 4), masks=None)
    point_labels = torch.ones((b * n_point, 1), dtype=torch.long, device=batch.images.device)
    point_sparse = embed_points(encoder, batch.points.reshape(-1, 1, 2), point_labels)
    multi_sparse = embed_points(encoder, batch.multi_points.reshape(-1, MULTI_POINTS, 2),
                                batch.multi_labels.reshape(-1, MULTI_POINTS))
    image_index = torch.arange(b, device=batch.images.device)
    with torch.autocast(batch.images.device.type, dtype=torch.bfloat16, enabled=autocast):
        embeddings = model.image_encoder(batch.images)
        # Boxes and single points both give 2 sparse tokens: one decoder call.
        index = torch.cat([image_index.repeat_interleave(n_box), image_index.repeat_interleave(n_point)])
        masks, iou = decode(model.mask_decoder, embeddings[index], image_pe,
                            torch.cat([box_sparse, point_sparse]), dense)
        out = {"box": (masks[: b * n_box], iou[: b * n_box]), "point": (masks[b * n_box:], iou[b * n_box:])}
        if n_multi:
            multi_index = image_index.repeat_interleave(n_multi)
            out["multi"] = decode(model.mask_decoder, embeddings[multi_index], image_pe, multi_sparse, dense)
    return out


def mask_terms(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-mask focal loss, dice loss and actual IoU.

    logits: float [N, C, S, S] (C candidate masks per prompt); target: bool [N, S, S].
    Returns focal [N, C] (mean over pixels), dice [N, C], IoU of `logits > 0` [N, C] (no grad).
    """
    t = target[:, None].expand_as(logits).float()
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p_t = prob * t + (1 - prob) * (1 - t)
    alpha = FOCAL_ALPHA * t + (1 - FOCAL_ALPHA) * (1 - t)
    focal = (alpha * (1 - p_t) ** FOCAL_GAMMA * ce).flatten(2).mean(-1)
    inter = (prob * t).flatten(2).sum(-1)
    dice = 1 - (2 * inter + 1) / (prob.flatten(2).sum(-1) + t.flatten(2).sum(-1) + 1)
    with torch.no_grad():
        pred = logits > 0
        hard = target[:, None]
        iou = (pred & hard).flatten(2).sum(-1).float() / (pred | hard).flatten(2).sum(-1).clamp(min=1).float()
    return focal, dice, iou


def compute_loss(outputs: dict[str, tuple[torch.Tensor, torch.Tensor]], batch: Batch, side: int
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SAM's loss: 20 focal + 1 dice per prompt (min over the 3 outputs for single points, the
    single-mask output otherwise) averaged over prompts, plus the IoU head's MSE.

    Returns the loss (scalar) and its parts (detached scalars, kept on the device: no sync)."""
    n_box, n_point = batch.boxes.shape[1], batch.points.shape[1]
    targets = {
        "box": batch.targets[:, :n_box],
        "point": batch.targets[:, n_box:n_box + n_point],
        "multi": batch.targets[:, n_box + n_point:],
    }
    mask_losses, focal_sel, dice_sel, iou_errors = [], [], [], []
    for kind, (low_res, iou_pred) in outputs.items():
        channels = slice(1, None) if kind == "point" else slice(0, 1)
        logits = F.interpolate(low_res[:, channels].float(), (side, side), mode="bilinear", align_corners=False)
        focal, dice, iou = mask_terms(logits, targets[kind].reshape(-1, side, side))
        combined = FOCAL_WEIGHT * focal + DICE_WEIGHT * dice
        best = combined.argmin(dim=1, keepdim=True)
        mask_losses.append(combined.gather(1, best)[:, 0])
        focal_sel.append(focal.gather(1, best)[:, 0])
        dice_sel.append(dice.gather(1, best)[:, 0])
        iou_errors.append(((iou_pred[:, channels].float() - iou) ** 2).flatten())
    mask_loss = torch.cat(mask_losses).mean()
    iou_loss = torch.cat(iou_errors).mean()
    parts = {"focal": torch.cat(focal_sel).mean().detach(), "dice": torch.cat(dice_sel).mean().detach(),
             "iou_mse": iou_loss.detach()}
    return mask_loss + iou_loss, parts


def train_step(model: Sam, optimizer: torch.optim.Optimizer, batch: Batch, grad_clip: float, autocast: bool
               ) -> dict[str, torch.Tensor]:
    """One optimisation step; returns the loss, its parts and the gradient norm (device scalars)."""
    loss, parts = compute_loss(forward(model, batch, autocast), batch, batch.images.shape[-1])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parts["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return {"loss": loss.detach(), **parts}


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_lr_ratio` over progress in [0, 1]."""
    warm = min(1.0, (step + 1) / max(1, config.warmup_steps))
    cosine = config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * warm * cosine


def make_optimizer(model: Sam, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW (fused on CUDA); weight decay on the parameters of 2+ dimensions only (weights,
    kernels, embeddings), none on biases and norm scales."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), fused=fused)


# ----------------------------------------------------------------------------- validation


@dataclass
class ValScene:
    """A held-out scene at its original size: image uint8 [H, W, 3], masks bool [K, H, W],
    boxes float [K, 4] tight pixel-edge xyxy (the prompts the evaluation gives)."""

    image: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    family: int


def validation_scenes(seed: int, per_family: int, side: int) -> list[ValScene]:
    """`per_family` held-out scenes of each family from their own seeded streams."""
    scenes = []
    for family in range(len(FAMILIES)):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _VAL_STREAM, family]))
        found: list[ValScene] = []
        while len(found) < per_family:
            found.extend(ValScene(image, masks, mask_boxes(masks), family)
                         for image, masks in family_instances(rng, family, side))
        scenes.extend(found[:per_family])
    return scenes


@torch.no_grad()
def validate(model: Sam, scenes: list[ValScene], device: torch.device) -> dict[str, float]:
    """Box-prompted mIoU (x100) per family and their mean, through `BoxPredictor`."""
    predictor = BoxPredictor(model, device=device)
    ious: dict[int, list[float]] = {family: [] for family in range(len(FAMILIES))}
    for scene in scenes:
        predictor.set_image(scene.image)
        masks, _ = predictor.predict_boxes(scene.boxes)
        inter = (masks & scene.masks).sum(axis=(1, 2))
        union = (masks | scene.masks).sum(axis=(1, 2))
        ious[scene.family].extend((inter / np.maximum(union, 1)).tolist())
    metrics = {f"miou_{name}": 100.0 * float(np.mean(ious[f])) if ious[f] else float("nan")
               for f, name in enumerate(FAMILIES)}
    metrics["miou_mean"] = float(np.nanmean(list(metrics.values())))
    return metrics


# ----------------------------------------------------------------------------- output


def save_fp16(model: Sam, path: Path) -> str:
    """Write the float16 state dict to `path` (at most MAX_CHECKPOINT_BYTES); returns its sha256."""
    state = {key: (value.detach().to("cpu", torch.float16) if value.is_floating_point() else value.detach().cpu())
             for key, value in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise RuntimeError(f"{path} is {size} bytes, over the {MAX_CHECKPOINT_BYTES} allowed for a "
                           f"packaged checkpoint")
    return hashlib.sha256(path.read_bytes()).hexdigest()


class CsvLog:
    """A CSV file written row by row (flushed, so a killed run keeps its log)."""

    def __init__(self, path: Path, fields: list[str]) -> None:
        self._file = open(path, "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=fields)
        self._writer.writeheader()

    def write(self, row: dict[str, float | int]) -> None:
        self._writer.writerow({key: f"{value:.6g}" if isinstance(value, float) else value
                               for key, value in row.items()})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# ----------------------------------------------------------------------------- main


def interval_means(sums: dict[str, torch.Tensor], steps: int, step: int) -> dict[str, float]:
    """Means of the summed step values over `steps` steps (one device sync); raises when the
    loss is not finite."""
    means = {key: value.item() / steps for key, value in sums.items()}
    if not math.isfinite(means["loss"]):
        raise RuntimeError(f"the loss is not finite by step {step}: {means}")
    return means


def train(config: TrainConfig) -> dict:
    """Train, validate, save; returns the final metrics (also written to log_dir/metrics.json)."""
    start = time.monotonic()
    train_s = max(1e-3, config.minutes * 60.0 - config.reserve_s)
    device = torch.device(config.device)
    cuda = device.type == "cuda"
    config.log_dir.mkdir(parents=True, exist_ok=True)
    log.info("config: %s", {k: str(v) for k, v in asdict(config).items()})
    model = build_sam_tiny(config.seed)
    side = model.image_encoder.img_size
    feeder = SceneFeeder(config, side, device)  # forks the workers before the device is initialised
    model = model.to(device).train()
    val_scenes = validation_scenes(config.seed, config.val_scenes, side)
    optimizer = make_optimizer(model, config)
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, _SAMPLING_STREAM]))
    generator = torch.Generator(device=device).manual_seed(config.seed)
    pool: deque[Scene] = deque(maxlen=config.pool)
    train_log = CsvLog(config.log_dir / "train_log.csv",
                       ["step", "elapsed_s", "lr", "loss", "focal", "dice", "iou_mse", "grad_norm",
                        "steps_per_s", "scenes_generated", "pool"])
    val_log = CsvLog(config.log_dir / "val_log.csv",
                     ["step", "elapsed_s"] + [f"miou_{name}" for name in FAMILIES] + ["miou_mean"])
    sums: dict[str, torch.Tensor] = {}
    scenes_generated, step, interval_steps, interval_start = 0, 0, 0, time.monotonic()
    val_metrics: dict[str, float] = {}
    try:
        while step < config.max_steps and time.monotonic() - start < train_s:
            fresh = feeder.drain(at_least=max(0, config.batch - len(pool)))
            pool.extend(fresh)
            scenes_generated += len(fresh)
            progress = max(step / config.max_steps, (time.monotonic() - start) / train_s)
            lr = learning_rate(config, step, progress)
            for group in optimizer.param_groups:
                group["lr"] = lr
            parts = train_step(model, optimizer, make_batch(model, list(pool), config, rng, generator),
                               config.grad_clip, autocast=cuda)
            step += 1
            interval_steps += 1
            for key, value in parts.items():
                sums[key] = sums[key] + value if key in sums else value.clone()
            if step % config.log_every == 0:
                now = time.monotonic()
                row = {"step": step, "elapsed_s": now - start, "lr": lr,
                       **interval_means(sums, interval_steps, step),
                       "steps_per_s": interval_steps / (now - interval_start),
                       "scenes_generated": scenes_generated, "pool": len(pool)}
                train_log.write(row)
                log.info("step %d  %.0fs  lr %.2e  loss %.4f  focal %.4f  dice %.4f  iou_mse %.4f  "
                         "%.1f steps/s  %d scenes generated", step, row["elapsed_s"], lr, row["loss"],
                         row["focal"], row["dice"], row["iou_mse"], row["steps_per_s"], scenes_generated)
                sums, interval_steps, interval_start = {}, 0, now
            if config.val_every > 0 and step % config.val_every == 0:
                val_start = time.monotonic()
                val_metrics = validate(model, val_scenes, device)
                val_log.write({"step": step, "elapsed_s": time.monotonic() - start, **val_metrics})
                log.info("step %d validation: %s", step, {k: round(v, 2) for k, v in val_metrics.items()})
                model.train()
                interval_start += time.monotonic() - val_start  # steps/s counts training time only
        feeder.close()
        if sums:
            interval_means(sums, interval_steps, step)
        if step == 0 or config.val_every <= 0 or step % config.val_every != 0:
            val_metrics = validate(model, val_scenes, device)
            val_log.write({"step": step, "elapsed_s": time.monotonic() - start, **val_metrics})
    finally:
        feeder.close()
        train_log.close()
        val_log.close()
    model.eval()
    sha256 = save_fp16(model, config.out)
    metrics = {"steps": step, "elapsed_s": time.monotonic() - start, "scenes_generated": scenes_generated,
               "checkpoint": str(config.out), "checkpoint_bytes": config.out.stat().st_size, "sha256": sha256,
               "validation": val_metrics, "config": {k: str(v) for k, v in asdict(config).items()}}
    (config.log_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("final validation after %d steps: %s", step, {k: round(v, 2) for k, v in val_metrics.items()})
    return metrics


FLAG_HELP = {
    "device": "torch device: cuda (bf16 autocast) or cpu",
    "minutes": "wall-time budget of the whole run; training stops reserve_s before it, then validates and saves",
    "max_steps": "step cap; the cosine schedule ends at this step or at the time budget, whichever comes first",
    "batch": "scenes per step",
    "prompts": "prompts per scene (half boxes, 3/8 single points, 1/8 three points)",
    "workers": "DataLoader worker processes generating scenes (0: generate in the training loop)",
    "pool": "scenes kept on the device for replay",
    "lr": "peak AdamW learning rate",
    "min_lr_ratio": "final learning rate / peak",
    "weight_decay": "AdamW weight decay on weights (not on biases and norms)",
    "warmup_steps": "linear warm-up steps",
    "grad_clip": "gradient norm clip",
    "seed": "seed of the init, the data streams, the sampling and the validation scenes",
    "val_scenes": "held-out validation scenes per family",
    "val_every": "validate every N steps (0: only at the end)",
    "log_every": "write a train_log.csv row every N steps",
    "reserve_s": "seconds of the budget kept for the final validation and saving",
}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The command line -> TrainConfig (defaults: TrainConfig's)."""
    defaults = TrainConfig(out=Path(), log_dir=Path())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the fp16 state dict")
    parser.add_argument("--log-dir", type=Path, required=True,
                        help="folder for train_log.csv, val_log.csv and metrics.json")
    for field, text in FLAG_HELP.items():
        value = getattr(defaults, field)
        parser.add_argument("--" + field.replace("_", "-"), type=type(value), default=value,
                            help=f"{text} (default {value})")
    args = parser.parse_args(argv)
    return TrainConfig(**vars(args))


def main(argv: list[str] | None = None) -> dict:
    """Entry point: parse `argv`, train, print the checkpoint's sha256 last; returns the metrics."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = parse_args(argv)
    metrics = train(config)
    print(f"wrote {config.out} ({metrics['checkpoint_bytes']} bytes) after {metrics['steps']} steps")
    print(f"sha256 {metrics['sha256']}")
    return metrics


if __name__ == "__main__":
    main()
