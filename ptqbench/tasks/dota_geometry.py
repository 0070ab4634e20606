"""Geometry of the `dota` task: the sliding windows over a large aerial image, the window each
box prompt belongs to (`window_prompts`, the one place where windows and prompts meet), the
rotated box of a mask, and DOTA_devkit-style polygon NMS.

Boxes are [N, 4] xyxy float arrays in image pixels; polygons [N, 8] (x1, y1, ..., x4, y4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ptqbench.tasks.dota_eval import poly_iou_batch

NMS_IOU = 0.1


@dataclass(frozen=True)
class Window:
    """The crop image[y0:y1, x0:x1] (pixels, end-exclusive)."""

    x0: int
    y0: int
    x1: int
    y1: int

    def crop(self, image: np.ndarray) -> np.ndarray:
        """image [H, W, C] -> the window's pixels [y1 - y0, x1 - x0, C], a contiguous copy."""
        return np.ascontiguousarray(image[self.y0:self.y1, self.x0:self.x1])


@dataclass(frozen=True)
class WindowPrompts:
    """The prompts one window runs.

    window: the window; members: int64 [M], the indices of its prompts among the image's, ascending;
    boxes: float64 [M, 4] xyxy, those prompts clipped to the window, in window pixels.
    """

    window: Window
    members: np.ndarray
    boxes: np.ndarray


def window_starts(length: int, window: int, step: int) -> list[int]:
    """Window starts along one axis of `length` pixels: 0, step, ... ; the last is max(length - window, 0)."""
    starts = []
    start = 0
    while True:
        if start + window >= length:
            starts.append(max(length - window, 0))
            return starts
        starts.append(start)
        start += step


def split_windows(width: int, height: int, window: int, gap: int) -> list[Window]:
    """The windows of a width x height image, row by row (y outer, x inner)."""
    step = window - gap
    return [Window(x0, y0, min(x0 + window, width), min(y0 + window, height))
            for y0 in window_starts(height, window, step)
            for x0 in window_starts(width, window, step)]


def clip_boxes(boxes: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Clip xyxy boxes [N, 4] to the rectangle [x0, x1] x [y0, y1]."""
    return np.stack([np.clip(boxes[:, 0], x0, x1), np.clip(boxes[:, 1], y0, y1),
                     np.clip(boxes[:, 2], x0, x1), np.clip(boxes[:, 3], y0, y1)], axis=1)


def assign_windows(boxes: np.ndarray, windows: Sequence[Window]) -> np.ndarray:
    """The window index [N] (int64) each box [N, 4] xyxy runs in.

    The window with the largest intersection area; among equals (e.g. every window holding the
    whole box) the one whose centre is nearest the box centre; then the first in order.
    """
    if len(boxes) == 0:
        return np.zeros((0,), dtype=np.int64)
    rects = np.array([[w.x0, w.y0, w.x1, w.y1] for w in windows], dtype=np.float64)
    iw = np.clip(np.minimum(boxes[:, None, 2], rects[None, :, 2])
                 - np.maximum(boxes[:, None, 0], rects[None, :, 0]), 0.0, None)
    ih = np.clip(np.minimum(boxes[:, None, 3], rects[None, :, 3])
                 - np.maximum(boxes[:, None, 1], rects[None, :, 1]), 0.0, None)
    inter = iw * ih
    box_centres = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    window_centres = (rects[:, :2] + rects[:, 2:]) / 2.0
    distance = ((box_centres[:, None, :] - window_centres[None, :, :]) ** 2).sum(axis=2)
    distance[inter < inter.max(axis=1, keepdims=True)] = np.inf
    return np.argmin(distance, axis=1).astype(np.int64)


def window_prompts(boxes: np.ndarray, width: int, height: int, window: int, gap: int) -> list[WindowPrompts]:
    """The windows of a width x height image (`split_windows`) to which `assign_windows` gives at
    least one of the box prompts [N, 4] (xyxy, image pixels), in window order, with those prompts."""
    windows = split_windows(width, height, window, gap)
    assignment = assign_windows(boxes, windows)
    found = []
    for index, win in enumerate(windows):
        members = np.nonzero(assignment == index)[0]
        if members.size == 0:
            continue
        offset = np.array([win.x0, win.y0, win.x0, win.y0], dtype=np.float64)
        found.append(WindowPrompts(win, members, clip_boxes(boxes[members], win.x0, win.y0, win.x1, win.y1) - offset))
    return found


def polygon_hboxes(polygons: np.ndarray) -> np.ndarray:
    """Enclosing horizontal boxes [N, 4] xyxy of quads [N, 8]."""
    return np.stack([polygons[:, 0::2].min(axis=1), polygons[:, 1::2].min(axis=1),
                     polygons[:, 0::2].max(axis=1), polygons[:, 1::2].max(axis=1)], axis=1)


def mask_to_rbox(mask: np.ndarray) -> np.ndarray | None:
    """Rotated box of a bool mask [H, W]: float64 [8] corners (x1 y1 ... x4 y4) in cyclic order.

    `cv2.minAreaRect` over the (x, y) coordinates of every foreground pixel, then
    `cv2.boxPoints`. Returns None for an empty mask. (The pixels are listed in row-major order
    from the mask's bounding crop: the same points in the same order as `np.nonzero(mask)`.)
    """
    import cv2

    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    ys, xs = np.nonzero(mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
    points = np.stack([xs + cols[0], ys + rows[0]], axis=1).astype(np.int32)
    return cv2.boxPoints(cv2.minAreaRect(points)).reshape(8).astype(np.float64)


def _overlapping_pairs(hboxes: np.ndarray, block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i < j, of boxes [N, 4] xyxy whose intersection has positive area,
    sorted by i then j."""
    firsts, seconds = [], []
    for start in range(0, len(hboxes), block):
        rows = hboxes[start:start + block, None, :]
        others = hboxes[None, :, :]
        overlap = ((np.minimum(rows[..., 2], others[..., 2]) > np.maximum(rows[..., 0], others[..., 0]))
                   & (np.minimum(rows[..., 3], others[..., 3]) > np.maximum(rows[..., 1], others[..., 1])))
        i, j = np.nonzero(overlap)
        i = i + start
        firsts.append(i[j > i])
        seconds.append(j[j > i])
    if not firsts:
        return np.zeros((0,), dtype=np.int64), np.zeros((0,), dtype=np.int64)
    return np.concatenate(firsts), np.concatenate(seconds)


def polygon_nms(polygons: np.ndarray, scores: np.ndarray, iou_threshold: float = NMS_IOU) -> np.ndarray:
    """Greedy polygon NMS; returns kept indices (int64) in descending score order.

    polygons: float64 [N, 8]; scores: [N]. Boxes are visited in descending score (stable sort);
    a box is suppressed when its IoU (`poly_iou_batch`, the higher-scored box as first) with an
    already kept box is > iou_threshold. Only pairs whose horizontal boxes overlap with positive
    area are compared (the others have IoU 0).
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ranked = polygons[order]
    first, second = _overlapping_pairs(polygon_hboxes(ranked))
    over = poly_iou_batch(ranked[first], ranked[second]) > iou_threshold
    first, second = first[over], second[over]
    bounds = np.searchsorted(first, np.arange(len(order) + 1))
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for rank in range(len(order)):
        if not suppressed[rank]:
            keep.append(rank)
            suppressed[second[bounds[rank]:bounds[rank + 1]]] = True
    return order[np.array(keep, dtype=np.int64)]
