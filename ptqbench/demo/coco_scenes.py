"""COCO-style demo scenes: 3-8 overlapping objects of 8 real COCO categories.

A textured backdrop with distractor blobs holds the objects, one shape family per category;
later objects occlude earlier ones (occluded pixels leave the occluded mask), and no occluder
may punch a hole into an earlier object, since COCO polygons cannot express holes.
"""

from __future__ import annotations

import numpy as np

from ptqbench.demo import drawing as draw
from ptqbench.errors import ConfigError

# (id, name, supercategory): real COCO categories, one shape family each.
COCO_CATEGORIES: tuple[tuple[int, str, str], ...] = (
    (1, "person", "person"),
    (3, "car", "vehicle"),
    (13, "stop sign", "outdoor"),
    (18, "dog", "animal"),
    (38, "kite", "sports"),
    (44, "bottle", "kitchen"),
    (53, "apple", "food"),
    (62, "chair", "furniture"),
)

_UPRIGHT = (1, 3, 18, 44, 62)  # COCO categories drawn nearly upright; the others spin freely


def _coco_parts(rng: np.random.Generator, category_id: int
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Outline parts [N, 2] of one object in unit size (about [-1, 1]^2) with their colours."""
    if category_id == 1:  # person: legs, torso, head
        trousers = draw.pick(rng, [(40, 50, 90), (30, 30, 30), (120, 100, 80)])
        shirt = rng.uniform(30, 230, 3)
        skin = draw.pick(rng, [(224, 172, 105), (141, 85, 45), (255, 214, 170), (198, 134, 66)])
        return [(draw.rect(-0.26, 0.35, -0.05, 1.0), trousers),
                (draw.rect(0.05, 0.35, 0.26, 1.0), trousers),
                (draw.rounded_rect(0.32, 0.45, 0.12), shirt),
                (draw.ellipse(0.2, 0.22, cy=-0.68), skin)]
    if category_id == 3:  # car: cabin, body, wheels
        paint = draw.pick(rng, [(180, 20, 25), (25, 60, 160), (225, 225, 225), (25, 25, 28)])
        cabin = np.array([[-0.55, -0.2], [-0.32, -0.62], [0.4, -0.62], [0.62, -0.2]])
        tyre = draw.jitter(rng, (20, 20, 20), 8)
        return [(cabin, draw.jitter(rng, (90, 120, 150))),
                (draw.rounded_rect(1.0, 0.32, 0.14), paint),
                (draw.ellipse(0.2, 0.2, -0.6, 0.32), tyre),
                (draw.ellipse(0.2, 0.2, 0.6, 0.32), tyre)]
    if category_id == 13:  # stop sign: white-rimmed red octagon
        return [(draw.ellipse(1.0, 1.0, n=8), draw.jitter(rng, (235, 235, 235), 10)),
                (draw.ellipse(0.86, 0.86, n=8), draw.jitter(rng, (200, 20, 30), 15))]
    if category_id == 18:  # dog: legs, tail, body, head
        fur = draw.pick(rng, [(120, 75, 35), (30, 25, 22), (210, 170, 100), (235, 230, 220)])
        return [(draw.rect(-0.6, 0.1, -0.45, 0.75), fur), (draw.rect(0.45, 0.1, 0.6, 0.75), fur),
                (draw.rect(-1.0, -0.35, -0.7, -0.25), fur), (draw.ellipse(0.8, 0.38), fur),
                (draw.ellipse(0.3, 0.26, 0.85, -0.38), draw.jitter(rng, fur, 12))]
    if category_id == 38:  # kite: a bright star
        color = draw.pick(rng, [(250, 200, 20), (240, 60, 140), (40, 200, 220), (250, 120, 20)])
        return [(draw.star(int(rng.integers(5, 7)), 1.0, rng.uniform(0.4, 0.55)), color)]
    if category_id == 44:  # bottle: body, neck, cap
        glass = draw.pick(rng, [(30, 110, 50), (110, 60, 20), (150, 190, 210)])
        cap = draw.pick(rng, [(200, 30, 30), (220, 220, 220), (200, 170, 40)])
        return [(draw.rounded_rect(0.34, 0.62, 0.14, cy=0.38), glass),
                (draw.rect(-0.13, -0.8, 0.13, -0.2), glass),
                (draw.rect(-0.15, -1.0, 0.15, -0.8), cap)]
    if category_id == 53:  # apple: leaf, round fruit
        fruit = draw.pick(rng, [(190, 25, 30), (120, 190, 50), (230, 200, 60)])
        return [(draw.ellipse(0.16, 0.32, 0.18, -0.92), draw.jitter(rng, (60, 140, 40))),
                (draw.ellipse(0.8, 0.75, cy=0.1), fruit)]
    if category_id == 62:  # chair: back, seat, legs (non-convex)
        wood = draw.pick(rng, [(120, 80, 40), (35, 30, 28), (170, 130, 80)])
        return [(draw.rect(-0.62, -1.0, -0.42, 0.15), wood),
                (draw.rect(-0.62, 0.0, 0.62, 0.18), wood),
                (draw.rect(-0.62, 0.18, -0.5, 1.0), wood),
                (draw.rect(0.5, 0.18, 0.62, 1.0), wood)]
    raise ConfigError(f"no synthetic shape family for COCO category {category_id}")


def object_scene(rng: np.random.Generator, height: int, width: int
                 ) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """A COCO-style scene: a textured backdrop, distractor blobs and 3-8 overlapping objects.

    Returns image uint8 [H, W, 3] RGB, visible masks bool [K, H, W] (K >= 1, in painting
    order; occluded pixels are removed; every mask is hole-free and keeps >= 35% of its own
    shape) and the COCO category id of each mask (list of K ints from COCO_CATEGORIES).
    Both sides must be at least 64 pixels.
    """
    if min(height, width) < 64:
        raise ConfigError(f"object_scene needs images of at least 64x64, got {height}x{width}")
    image = draw.background(rng, height, width)
    for _ in range(int(rng.integers(0, 3))):
        blob = draw.place([draw.blob(rng, rng.uniform(0.05, 0.2) * min(height, width))],
                          rng.uniform(0, width), rng.uniform(0, height), 0.0)[0]
        draw.paint(image, draw.fill(blob, height, width), rng, rng.uniform(30, 225, 3))
    full_areas: list[int] = []
    visible: list[np.ndarray] = []
    category_ids: list[int] = []
    target = int(rng.integers(3, 9))
    attempts = 0
    while len(visible) < target and (attempts < 6 * target or not visible):
        attempts += 1
        category_id = COCO_CATEGORIES[int(rng.integers(len(COCO_CATEGORIES)))][0]
        parts = _coco_parts(rng, category_id)
        scale = min(height, width) * float(np.exp(rng.uniform(np.log(0.05), np.log(0.36))))
        spin = 0.25 if category_id in _UPRIGHT else np.pi
        angle = rng.uniform(-spin, spin)
        mirror = np.array([-scale if rng.random() < 0.5 else scale, scale])
        cx, cy = rng.uniform(0.08, 0.92) * width, rng.uniform(0.08, 0.92) * height
        outlines = draw.place([p * mirror for p, _ in parts], cx, cy, angle)
        part_masks = [draw.fill(o, height, width) for o in outlines]
        mask = np.logical_or.reduce(part_masks)
        slivers = draw.holes(mask)  # gaps closed by rasterisation (between legs, ...): filled
        mask |= slivers
        if mask.sum() < 80:
            continue
        remaining = [v & ~mask for v in visible]
        if any(r.sum() < max(0.35 * a, 60) or draw.has_hole(r)
               for r, a in zip(remaining, full_areas)):
            continue
        colors = [color for _, color in parts]
        for part_mask, color in zip(part_masks + [slivers], colors + colors[:1]):
            draw.paint(image, part_mask, rng, color)
        visible = remaining + [mask]
        full_areas.append(int(mask.sum()))
        category_ids.append(category_id)
    return draw.finish(rng, image), np.stack(visible), category_ids
