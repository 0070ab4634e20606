"""Prompts of a training step: boxes (tight or jittered), single points and three-point prompts
sampled from the pool's scenes (`make_batch`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam

from ptqbench.errors import ConfigError
from tools.train_sam_tiny.config import (
    BOX_NOISE,
    BOX_NOISE_MAX_PX,
    BOX_SHARE,
    EXACT_BOX_SHARE,
    MULTI_POINTS,
    POINT_SHARE,
    TrainConfig,
)
from tools.train_sam_tiny.scenes import Scene


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
