"""ADE20K-style demo scenes: layered region maps with real ADE20K class ids.

Outdoor streets (sky, mountain, building, windows, ground, road, sidewalk, trees, cars,
people) and indoor rooms (ceiling, wall, floor, windows, doors, paintings, cabinets, rugs,
furniture, people), each with a few `0 = other` clutter blobs. Every class is painted with a
class-typical colour and texture (`ADE_STYLE`), later layers occluding earlier ones.
"""

from __future__ import annotations

import numpy as np

from ptqbench.demo import drawing as draw

# Real ADE20K ids (objectInfo150.csv) -> (class-typical RGB colour, texture kind).
ADE_STYLE: dict[int, tuple[tuple[int, int, int], str]] = {
    1: ((196, 186, 166), "noise"),        # wall
    2: ((146, 136, 128), "stripes"),      # building
    3: ((128, 170, 226), "gradient"),     # sky
    4: ((156, 116, 78), "stripes"),       # floor
    5: ((52, 102, 44), "blotch"),         # tree
    6: ((232, 230, 224), "noise"),        # ceiling
    7: ((88, 88, 94), "noise"),           # road
    8: ((190, 172, 204), "noise"),        # bed
    9: ((116, 158, 192), "gradient"),     # windowpane
    10: ((82, 150, 62), "blotch"),        # grass
    11: ((128, 88, 58), "stripes"),       # cabinet
    12: ((172, 166, 154), "stripes"),     # sidewalk
    13: ((176, 120, 98), "blotch"),       # person
    15: ((108, 74, 50), "stripes"),       # door
    16: ((148, 100, 62), "stripes"),      # table
    17: ((108, 110, 124), "gradient"),    # mountain
    20: ((88, 58, 40), "noise"),          # chair
    21: ((170, 32, 34), "gradient"),      # car
    23: ((198, 158, 62), "blotch"),       # painting
    24: ((98, 62, 112), "noise"),         # sofa
    29: ((150, 42, 52), "stripes"),       # rug
}

# Furniture outlines in units of its size, feet at y = 0: bed, table, chair, sofa (ADE ids).
_FURNITURE: dict[int, list[np.ndarray]] = {
    8: [draw.rect(-1.6, -0.7, 1.6, 0.0), draw.rect(1.45, -1.3, 1.7, 0.0)],
    16: [draw.rect(-1.2, -1.0, 1.2, -0.8), draw.rect(-1.1, -0.8, -0.95, 0.0),
         draw.rect(0.95, -0.8, 1.1, 0.0)],
    20: [draw.rect(-0.5, -1.6, -0.35, 0.0), draw.rect(-0.5, -0.75, 0.5, -0.6),
         draw.rect(0.38, -0.6, 0.5, 0.0)],
    24: [draw.rounded_rect(1.5, 0.35, 0.12, 0.0, -0.35),
         draw.rounded_rect(1.5, 0.3, 0.15, 0.0, -0.95)],
}


class _Canvas:
    """A label map and an image painted together, layer by layer (later layers occlude)."""

    def __init__(self, rng: np.random.Generator, height: int, width: int) -> None:
        self.rng, self.height, self.width = rng, height, width
        self.labels = np.zeros((height, width), dtype=np.uint8)
        self.image = np.zeros((height, width, 3), dtype=np.float32)

    def put(self, mask: np.ndarray, ade_id: int, color: np.ndarray | None = None) -> None:
        """Label `mask` [H, W] bool as `ade_id` and paint it with the class-typical texture."""
        base, kind = ADE_STYLE.get(ade_id, ((128, 128, 128), None))
        self.labels[mask] = ade_id
        color = draw.jitter(self.rng, base if color is None else color)
        draw.paint(self.image, mask, self.rng, color, kind)

    def polygon(self, points: np.ndarray, ade_id: int, color: np.ndarray | None = None) -> None:
        """Label and paint the inside of one polygon [N, 2] (x, y)."""
        self.put(draw.fill(points, self.height, self.width), ade_id, color)

    def union(self, polygons: list[np.ndarray], ade_id: int,
              color: np.ndarray | None = None) -> None:
        """Label and paint the union of several polygons [N, 2] in one colour."""
        masks = [draw.fill(p, self.height, self.width) for p in polygons]
        self.put(np.logical_or.reduce(masks), ade_id, color)


def _ade_person(canvas: _Canvas, cx: float, foot: float, size: float) -> None:
    """A standing person `2 * size` tall with feet at (cx, foot)."""
    body = [draw.rect(-0.22, 0.3, 0.22, 1.0), draw.rounded_rect(0.28, 0.4, 0.1, cy=-0.05),
            draw.ellipse(0.16, 0.19, cy=-0.6)]
    canvas.union(draw.place([b * size for b in body], cx, foot - size, 0.0), 13,
                 canvas.rng.uniform(40, 220, 3))


def _ade_clutter(canvas: _Canvas) -> None:
    """0-2 small unlabelled (`0 = other`) blobs."""
    rng = canvas.rng
    for _ in range(int(rng.integers(0, 3))):
        blob = draw.place([draw.blob(rng, rng.uniform(6.0, 18.0))], rng.uniform(0, canvas.width),
                          rng.uniform(0.3, 1.0) * canvas.height, 0.0)[0]
        canvas.polygon(blob, 0, rng.uniform(30, 225, 3))


def _outdoor(canvas: _Canvas) -> None:
    """Sky, mountains, buildings with windows, grass, a road with sidewalks, trees, cars,
    people, clutter."""
    rng, height, width = canvas.rng, canvas.height, canvas.width
    horizon = int(rng.uniform(0.38, 0.55) * height)
    canvas.put(np.ones((height, width), dtype=bool), 3)
    if rng.random() < 0.5:
        xs = np.linspace(-1, width + 1, 9)
        ridge = horizon - rng.uniform(0.05, 0.22, 9) * height
        foot = [[width + 1, horizon + 2], [-1, horizon + 2]]
        canvas.polygon(np.concatenate([np.stack([xs, ridge], 1), foot]), 17)
    ground = np.zeros((height, width), dtype=bool)
    ground[horizon:] = True
    canvas.put(ground, 10)
    for _ in range(int(rng.integers(1, 5))):
        x0 = rng.uniform(-0.1, 0.9) * width
        w, h = rng.uniform(0.12, 0.35) * width, rng.uniform(0.15, 0.4) * height
        canvas.polygon(draw.rect(x0, horizon - h, x0 + w, horizon + 2), 2)
        if rng.random() < 0.7:
            for wx in np.arange(x0 + 5, x0 + w - 10, rng.uniform(12, 18)):
                for wy in np.arange(horizon - h + 5, horizon - 10, rng.uniform(14, 20)):
                    canvas.polygon(draw.rect(wx, wy, wx + 6, wy + 8), 9)
    vanish = rng.uniform(0.3, 0.7) * width
    bottom_half = rng.uniform(0.25, 0.45) * width
    centre = rng.uniform(0.3, 0.7) * width
    walk = 0.18 * bottom_half
    for ade_id, top, bottom in ((12, 6, bottom_half + walk), (7, 4, bottom_half)):
        band = [[vanish - top, horizon], [vanish + top, horizon], [centre + bottom, height + 1],
                [centre - bottom, height + 1]]
        canvas.polygon(np.array(band), ade_id)
    for _ in range(int(rng.integers(1, 4))):
        tx, size = rng.uniform(0, width), rng.uniform(0.08, 0.16) * height
        base = horizon + rng.uniform(0.0, 0.15) * height
        trunk = draw.rect(tx - 0.12 * size, base - 1.2 * size, tx + 0.12 * size, base)
        canvas.polygon(trunk, 5, np.array([90, 60, 35]))
        radii, dxs = rng.uniform(0.4, 0.7, 4), rng.uniform(-0.5, 0.5, 4)
        dys = rng.uniform(-0.4, 0.4, 4)
        canvas.union([draw.ellipse(r * size, r * size, tx + dx * size, base + (dy - 1.6) * size)
                      for r, dx, dy in zip(radii, dxs, dys)], 5)
    for _ in range(int(rng.integers(0, 4))):
        foot = rng.uniform(horizon + 0.15 * (height - horizon), height - 2)
        scale = 0.1 + 0.9 * (foot - horizon) / (height - horizon)
        cx = vanish + (centre - vanish) * scale + rng.uniform(-0.7, 0.7) * bottom_half * scale
        half_l, half_h = 30 * scale + 6, 11 * scale + 3
        body = draw.rounded_rect(half_l, half_h, 0.3 * half_h, cx, foot - half_h)
        cabin = draw.rounded_rect(0.6 * half_l, 0.7 * half_h, 0.3 * half_h, cx,
                                  foot - 2.2 * half_h)
        canvas.union([body, cabin], 21, rng.uniform(20, 230, 3))
    for _ in range(int(rng.integers(0, 4))):
        foot = rng.uniform(horizon + 0.1 * (height - horizon), height - 2)
        _ade_person(canvas, rng.uniform(0.05, 0.95) * width, foot,
                    (0.1 + 0.25 * (foot - horizon) / (height - horizon)) * height)
    _ade_clutter(canvas)


def _indoor(canvas: _Canvas) -> None:
    """Wall, ceiling, floor, windows, a door, a painting, a cabinet, a rug, furniture, people,
    clutter."""
    rng, height, width = canvas.rng, canvas.height, canvas.width
    canvas.put(np.ones((height, width), dtype=bool), 1)
    if rng.random() < 0.6:
        canvas.polygon(draw.rect(-1, -1, width + 1, rng.uniform(0.08, 0.2) * height), 6)
    floor_y = rng.uniform(0.58, 0.78) * height
    canvas.polygon(draw.rect(-1, floor_y, width + 1, height + 1), 4)
    for _ in range(int(rng.integers(0, 3))):
        x0, w = rng.uniform(0, 0.8) * width, rng.uniform(0.12, 0.25) * width
        y0, h = rng.uniform(0.22, 0.35) * height, rng.uniform(0.18, 0.3) * height
        canvas.polygon(draw.rect(x0, y0, x0 + w, y0 + h), 9)
    if rng.random() < 0.6:
        x0, w = rng.uniform(0, 0.85) * width, rng.uniform(0.12, 0.18) * width
        top = floor_y - rng.uniform(0.45, 0.6) * height
        canvas.polygon(draw.rect(x0, top, x0 + w, floor_y + 2), 15)
    if rng.random() < 0.6:
        x0, w = rng.uniform(0, 0.85) * width, rng.uniform(0.08, 0.18) * width
        y0 = rng.uniform(0.2, 0.35) * height
        canvas.polygon(draw.rect(x0, y0, x0 + w, y0 + 0.7 * w), 23, rng.uniform(40, 220, 3))
    if rng.random() < 0.5:
        x0, w = rng.uniform(0, 0.8) * width, rng.uniform(0.15, 0.3) * width
        top = floor_y - rng.uniform(0.15, 0.3) * height
        canvas.polygon(draw.rect(x0, top, x0 + w, floor_y + 4), 11)
    if rng.random() < 0.6:
        depth = height - floor_y
        cx, cy = rng.uniform(0.3, 0.7) * width, floor_y + rng.uniform(0.3, 0.6) * depth
        canvas.polygon(draw.ellipse(rng.uniform(0.2, 0.35) * width,
                                    rng.uniform(0.15, 0.3) * depth, cx, cy), 29)
    for _ in range(int(rng.integers(1, 4))):
        kind = (8, 16, 20, 24)[int(rng.integers(4))]
        foot = floor_y + rng.uniform(0.2, 0.9) * (height - floor_y)
        cx, size = rng.uniform(0.1, 0.9) * width, rng.uniform(0.12, 0.22) * height
        canvas.union(draw.place([p * size for p in _FURNITURE[kind]], cx, foot, 0.0), kind)
    for _ in range(int(rng.integers(0, 3))):
        foot = floor_y + rng.uniform(0.1, 1.0) * (height - floor_y)
        size = rng.uniform(0.25, 0.4) * height
        _ade_person(canvas, rng.uniform(0.05, 0.95) * width, foot, size)
    _ade_clutter(canvas)


def region_scene(rng: np.random.Generator, height: int, width: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """An ADE20K-style layered scene (outdoor street or indoor room).

    Returns image uint8 [H, W, 3] RGB and label_map uint8 [H, W] of real ADE20K ids
    (0 = other, 1..150; see ADE_STYLE for the ids used).
    """
    canvas = _Canvas(rng, height, width)
    if rng.random() < 0.5:
        _outdoor(canvas)
    else:
        _indoor(canvas)
    return draw.finish(rng, canvas.image), canvas.labels
