"""The report's gallery: what each cell keeps of its first evaluation images, drawn.

When a task scores a cell, it draws its first GALLERY_IMAGES evaluation images (the same images for
every cell of an evaluation, since the evaluation order is fixed) with that cell's predictions
overlaid: each COCO / DOTA instance mask or polygon in its own colour, ADE20K's class map in the
classes' colours, blended over the image. The drawings go to `<cell folder>/gallery/<n>.png`, at
most GALLERY_SIDE pixels on the long side, so `ptqbench report` lays the FP and quantized cells of
one image side by side without the dataset or the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

GALLERY_IMAGES = 3
GALLERY_SIDE = 320
GALLERY_DIR = "gallery"
INSTANCE_COLOURS = 64  # instance k of an image gets colour k % 64, the same in every cell
ALPHA = 0.55  # the predictions' share of a blended pixel


def palette(count: int) -> np.ndarray:
    """`count` distinct, saturated RGB colours (golden-ratio hues): uint8 [count, 3]."""
    hues = (np.arange(count) * 0.618033988749895 % 1.0 * 180).astype(np.uint8)
    hsv = np.stack([hues, np.full(count, 220, np.uint8), np.full(count, 255, np.uint8)], axis=1)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


def blend_labels(image: np.ndarray, labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """image uint8 [H, W, 3] with every pixel of label k >= 0 blended with colours[k % len];
    labels int [H, W], -1 = none. Returns uint8 [H, W, 3]."""
    out = image.astype(np.float32)
    covered = labels >= 0
    tint = colours[labels[covered] % len(colours)].astype(np.float32)
    out[covered] = (1.0 - ALPHA) * out[covered] + ALPHA * tint
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def masks_to_labels(masks: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Instance masks bool [H, W] each -> int32 [H, W]: the index of the last mask covering a
    pixel (later masks on top), -1 where none does."""
    labels = np.full(shape, -1, dtype=np.int32)
    for index, mask in enumerate(masks):
        labels[mask] = index
    return labels


def polygons_to_labels(polygons: Sequence[np.ndarray], values: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
    """Polygons float [K, 2] (x, y pixels), filled with their values (e.g. class indices; later
    polygons on top) -> int32 [H, W], -1 where none is."""
    labels = np.full(shape, -1, dtype=np.int32)
    for polygon, value in zip(polygons, values):
        cv2.fillPoly(labels, [np.rint(polygon).astype(np.int32).reshape(-1, 1, 2)], int(value))
    return labels


def save_drawing(image: np.ndarray, labels: np.ndarray, colours: np.ndarray, out_dir: Path, position: int) -> Path:
    """Blend `labels` over `image`, shrink to GALLERY_SIDE and write `<out_dir>/gallery/<position>.png`."""
    drawing = blend_labels(image, labels, colours)
    scale = GALLERY_SIDE / max(drawing.shape[:2])
    if scale < 1.0:
        size = (max(1, round(drawing.shape[1] * scale)), max(1, round(drawing.shape[0] * scale)))
        drawing = cv2.resize(drawing, size, interpolation=cv2.INTER_AREA)
    folder = Path(out_dir) / GALLERY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{position}.png"
    cv2.imwrite(str(path), cv2.cvtColor(drawing, cv2.COLOR_RGB2BGR))
    return path


def gallery_drawings(cell_dir: Path) -> list[Path]:
    """The drawings a cell kept, in evaluation order (empty when it kept none)."""
    folder = Path(cell_dir) / GALLERY_DIR
    return sorted(folder.glob("*.png"), key=lambda path: int(path.stem)) if folder.is_dir() else []
