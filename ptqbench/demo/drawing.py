"""Drawing for the demo scenes: polygons, rasterisation, textures and the finished image.

Polygons are float64 [N, 2] arrays of (x, y) vertices; masks are bool [H, W]; images are
painted as float32 [H, W, 3] RGB and turned into uint8 [H, W, 3] by `finish`. Every random
choice comes from the `rng` passed in, so a scene is a function of its random stream.
"""

from __future__ import annotations

import numpy as np


def ellipse(ax: float, ay: float, cx: float = 0.0, cy: float = 0.0, n: int = 40) -> np.ndarray:
    """An ellipse with half-axes (ax, ay) around (cx, cy) as a polygon [n, 2]."""
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], axis=1)


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """The axis-aligned rectangle from (x0, y0) to (x1, y1) as a polygon [4, 2]."""
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def rounded_rect(hw: float, hh: float, radius: float, cx: float = 0.0, cy: float = 0.0,
                 n_arc: int = 6) -> np.ndarray:
    """A rectangle of half-sizes (hw, hh) around (cx, cy) with corners rounded by `radius`
    (at most the smaller half-size) as a polygon [4 * n_arc, 2]."""
    radius = min(radius, hw, hh)
    points = []
    corners = ((hw - radius, hh - radius, 0.0), (-hw + radius, hh - radius, 0.5 * np.pi),
               (-hw + radius, -hh + radius, np.pi), (hw - radius, -hh + radius, 1.5 * np.pi))
    for x, y, start in corners:
        t = start + np.linspace(0.0, 0.5 * np.pi, n_arc)
        points.append(np.stack([cx + x + radius * np.cos(t), cy + y + radius * np.sin(t)], 1))
    return np.concatenate(points)


def star(n: int, r_out: float, r_in: float, phase: float = -0.5 * np.pi) -> np.ndarray:
    """An `n`-pointed star around the origin, tips at `r_out`, notches at `r_in`, the first
    tip at angle `phase` -> polygon [2 * n, 2]."""
    t = phase + np.arange(2 * n) * np.pi / n
    r = np.where(np.arange(2 * n) % 2 == 0, r_out, r_in)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def blob(rng: np.random.Generator, radius: float, n: int = 9) -> np.ndarray:
    """A random star-shaped (never self-intersecting) polygon [n, 2] of about `radius`."""
    t = np.sort(rng.uniform(0.0, 2.0 * np.pi, n))
    r = radius * rng.uniform(0.55, 1.0, n)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def place(parts: list[np.ndarray], cx: float, cy: float, angle: float) -> list[np.ndarray]:
    """Rotate local part outlines [N, 2] by `angle` (radians) and move them to (cx, cy)."""
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, s], [-s, c]])
    return [p @ rotation + np.array([cx, cy]) for p in parts]


def fill(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """Rasterise one polygon [N, 2] (x, y) with subpixel vertices -> bool [H, W]."""
    import cv2

    canvas = np.zeros((height, width), dtype=np.uint8)
    points = np.round(polygon * 16.0).astype(np.int32)
    cv2.fillPoly(canvas, [points], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.view(bool)


def smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Smooth random field [H, W] float32 with features about `cell` pixels wide."""
    import cv2

    grid = rng.standard_normal((max(2, int(height / cell) + 2), max(2, int(width / cell) + 2)))
    return cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)


def texture(rng: np.random.Generator, height: int, width: int, color: np.ndarray,
            kind: str | None = None) -> np.ndarray:
    """A [H, W, 3] float32 texture around `color`: noise, gradient, stripes, blotch or plain
    (without grain: `finish` adds sensor noise to the whole image)."""
    if kind is None:
        kind = ("noise", "gradient", "stripes", "blotch", "plain")[int(rng.integers(5))]
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    if kind == "noise":
        field = 18.0 * smooth_noise(rng, height, width, rng.uniform(3.0, 16.0))
    elif kind == "gradient":
        angle = rng.uniform(0.0, 2.0 * np.pi)
        ramp = x * np.cos(angle) + y * np.sin(angle)
        field = rng.uniform(25.0, 60.0) * (ramp / max(height, width, 1))
    elif kind == "stripes":
        angle, period = rng.uniform(0.0, np.pi), rng.uniform(4.0, 14.0)
        phase = (x * np.cos(angle) + y * np.sin(angle)) * (2.0 * np.pi / period)
        field = rng.uniform(12.0, 30.0) * np.sin(phase)
    elif kind == "blotch":
        field = np.where(smooth_noise(rng, height, width, rng.uniform(4.0, 12.0)) > 0.2,
                         rng.uniform(-45.0, -20.0), 0.0).astype(np.float32)
    else:
        field = np.zeros((height, width), dtype=np.float32)
    tint = rng.uniform(0.7, 1.3, 3).astype(np.float32)
    out = np.asarray(field, dtype=np.float32)[..., None] * tint
    out += color.astype(np.float32)
    return out


def jitter(rng: np.random.Generator, color: tuple[int, int, int] | np.ndarray,
           amount: float = 18.0) -> np.ndarray:
    """`color` plus a uniform offset in [-amount, amount] per channel -> float32 [3]."""
    return np.clip(np.asarray(color, dtype=np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def pick(rng: np.random.Generator, palette: list[tuple[int, int, int]],
         amount: float = 18.0) -> np.ndarray:
    """One colour of `palette`, jittered -> float32 [3]."""
    return jitter(rng, palette[int(rng.integers(len(palette)))], amount)


def paint(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, color: np.ndarray,
          kind: str | None = None) -> None:
    """Fill `mask` [H, W] bool of `image` [H, W, 3] float32 with a texture, in place."""
    import cv2

    x0, y0, w, h = cv2.boundingRect(mask.view(np.uint8))
    if w == 0 or h == 0:
        return
    y1, x1 = y0 + h, x0 + w
    patch = texture(rng, h, w, color, kind)
    np.copyto(image[y0:y1, x0:x1], patch, where=mask[y0:y1, x0:x1, None])


def finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Soften edges slightly, add sensor noise (the grain of every texture) -> uint8 [H, W, 3]."""
    import cv2

    image = cv2.GaussianBlur(image, (0, 0), 0.6)
    noise = rng.standard_normal((*image.shape[:2], 1), dtype=np.float32)
    noise *= np.float32(rng.uniform(2.0, 4.5))
    image += noise
    np.rint(image, out=image)
    np.clip(image, 0, 255, out=image)
    return image.astype(np.uint8)


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A textured backdrop [H, W, 3] float32: one or two textured areas split by a line."""
    image = texture(rng, height, width, rng.uniform(40, 215, 3))
    if rng.random() < 0.6:
        y, x = np.mgrid[0:height, 0:width]
        angle = rng.uniform(-0.4, 0.4) + (0.5 * np.pi if rng.random() < 0.5 else 0.0)
        offset = rng.uniform(0.3, 0.7) * (height if abs(np.sin(angle)) < 0.5 else width)
        lower = (y * np.cos(angle) + x * np.sin(angle)) > offset
        paint(image, lower, rng, rng.uniform(40, 215, 3))
    return image


def has_hole(mask: np.ndarray) -> bool:
    """True when the mask [H, W] bool encloses background pixels."""
    import cv2

    _, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP,
                                    cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is not None and bool((hierarchy[0, :, 3] >= 0).any())


def holes(mask: np.ndarray) -> np.ndarray:
    """The background pixels that the mask [H, W] bool encloses -> bool [H, W]."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros(mask.shape, dtype=np.uint8)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.view(bool) & ~mask
