"""DOTA-style aerial demo scenes: 20-40 small rotated objects on terrain.

The terrain holds vegetation, maybe water, one or two roads and maybe a parking lot; the
objects are vehicles in the lot and on the roads, ships on the water, then tanks, planes,
helicopters, courts and pools scattered over land, each at least 2 pixels from the others.
About one object in ten is drawn with low contrast and flagged difficult.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ptqbench.demo import drawing as draw
from ptqbench.errors import ConfigError

# Objects scattered over land after the vehicles (lot, roads) and the ships (water).
_SCATTERED = ("large-vehicle", "storage-tank", "plane", "helicopter", "tennis-court",
              "basketball-court", "swimming-pool")
_SCATTERED_P = np.array([0.15, 0.22, 0.14, 0.10, 0.12, 0.10, 0.17])

Road = tuple[np.ndarray, np.ndarray, float]  # a point [2] on it, unit direction [2], half width
Lot = tuple[np.ndarray, np.ndarray, float]   # centre [2], half sizes [2], angle (radians)


@dataclass(frozen=True)
class AerialScene:
    """One aerial scene with everything a DOTA labelTxt file says about it."""

    image: np.ndarray            # uint8 [H, W, 3]
    masks: np.ndarray            # bool [K, H, W], disjoint
    class_names: list[str]       # K DOTA class names
    quads: np.ndarray            # float [K, 4, 2] corners of each rotated box, clockwise
    difficult: np.ndarray        # bool [K]
    gsd: float                   # metres per pixel (for the labelTxt header)


@dataclass(frozen=True)
class _Terrain:
    """The ground of a scene, painted into `image` float32 [H, W, 3] (modified in place by
    the objects drawn later)."""

    image: np.ndarray
    water: np.ndarray            # bool [H, W]
    paved: np.ndarray            # bool [H, W]: the roads
    roads: list[Road]
    lot: Lot | None              # the parking lot, if there is one


def _aerial_parts(rng: np.random.Generator, name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Outline parts [N, 2] in pixels (local frame, x along the object) with their colours."""
    if name == "small-vehicle":
        length = rng.uniform(5.0, 8.5)
        body = draw.pick(rng, [(200, 200, 205), (30, 30, 35), (160, 30, 30), (40, 60, 140)], 12)
        glass = draw.jitter(rng, (40, 50, 60), 8)
        return [(draw.rounded_rect(length, 0.45 * length, 1.5), body),
                (draw.rect(0.1 * length, -0.35 * length, 0.45 * length, 0.35 * length), glass)]
    if name == "large-vehicle":
        length, half_w = rng.uniform(11.0, 19.0), rng.uniform(3.8, 5.5)
        trailer = draw.pick(rng, [(225, 225, 225), (200, 120, 40), (110, 110, 120)], 12)
        cab = draw.pick(rng, [(60, 60, 150), (200, 200, 200), (150, 30, 30)], 12)
        return [(draw.rect(-length, -half_w, 0.62 * length, half_w), trailer),
                (draw.rect(0.66 * length, -half_w, length, half_w), cab)]
    if name == "ship":
        length = rng.uniform(12.0, 26.0)
        half_w = 0.24 * length
        hull = np.array([[-length, -half_w], [0.55 * length, -half_w], [length, 0.0],
                         [0.55 * length, half_w], [-length, half_w]])
        deck = draw.rect(-0.7 * length, -0.6 * half_w, -0.1 * length, 0.6 * half_w)
        return [(hull, draw.pick(rng, [(230, 230, 230), (150, 150, 160), (60, 60, 70)], 12)),
                (deck, draw.jitter(rng, (200, 200, 190), 10))]
    if name == "storage-tank":
        radius = rng.uniform(6.0, 15.0)
        shell = draw.pick(rng, [(215, 215, 210), (180, 182, 178)], 12)
        return [(draw.ellipse(radius, radius, n=48), shell),
                (draw.ellipse(0.7 * radius, 0.7 * radius), draw.jitter(rng, (195, 195, 190), 10))]
    if name == "plane":
        span = rng.uniform(15.0, 26.0)
        white = draw.pick(rng, [(235, 235, 235), (200, 205, 210)], 12)
        wings = np.array([[0.35, 0.0], [-0.1, -1.0], [-0.3, -1.0], [-0.05, 0.0], [-0.3, 1.0],
                          [-0.1, 1.0]]) * span
        return [(draw.rect(-span, -0.12 * span, span, 0.12 * span), white), (wings, white),
                (draw.rect(-span, -0.4 * span, -0.8 * span, 0.4 * span), white)]
    if name == "helicopter":
        length = rng.uniform(7.0, 11.0)
        body = draw.pick(rng, [(60, 70, 50), (200, 200, 200), (160, 30, 30)], 12)
        rotor = draw.jitter(rng, (40, 40, 40), 8)
        return [(draw.rect(-2.0, -0.12, 0.0, 0.12) * length, body),
                (draw.ellipse(0.8, 0.38, 0.2, 0.0) * length, body),
                (draw.rect(-0.9, -0.08, 1.3, 0.08) * length, rotor),
                (draw.rect(0.12, -1.1, 0.28, 1.1) * length, rotor)]
    if name in ("tennis-court", "basketball-court"):
        half_l, half_w = rng.uniform(12.0, 18.0), rng.uniform(6.5, 9.5)
        if name == "tennis-court":
            surface = draw.pick(rng, [(60, 130, 80), (50, 90, 150), (170, 70, 60)], 12)
        else:
            surface = draw.pick(rng, [(190, 120, 60), (150, 90, 60)], 12)
        line = draw.jitter(rng, (240, 240, 240), 8)
        return [(draw.rect(-half_l, -half_w, half_l, half_w), line),
                (draw.rect(1.2 - half_l, 1.2 - half_w, half_l - 1.2, half_w - 1.2), surface),
                (draw.rect(-0.6, 1.2 - half_w, 0.6, half_w - 1.2), line)]
    if name == "swimming-pool":
        half_l, half_w = rng.uniform(7.0, 15.0), rng.uniform(4.5, 8.0)
        water = draw.pick(rng, [(40, 170, 210), (70, 200, 220)], 12)
        return [(draw.rounded_rect(half_l, half_w, 2.0), draw.jitter(rng, (225, 225, 215), 8)),
                (draw.rounded_rect(half_l - 1.5, half_w - 1.5, 1.5), water)]
    raise ConfigError(f"no synthetic shape family for DOTA class {name!r}")


# ----------------------------------------------------------------------------- terrain


def _terrain(rng: np.random.Generator, height: int, width: int) -> _Terrain:
    """Soil with vegetation, then water, roads and a parking lot, painted in that order."""
    soil = draw.pick(rng, [(110, 120, 90), (150, 140, 115), (125, 125, 120)], 15)
    image = draw.texture(rng, height, width, soil, "noise")
    vegetation = draw.smooth_noise(rng, height, width, 60.0) > 0.5
    draw.paint(image, vegetation, rng, draw.jitter(rng, (95, 125, 70), 15), "blotch")
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    water = _water(rng, image, y, x)
    roads, paved = _roads(rng, image, y, x, water)
    lot = _parking_lot(rng, image, water)
    return _Terrain(image, water, paved, roads, lot)


def _water(rng: np.random.Generator, image: np.ndarray, y: np.ndarray, x: np.ndarray
           ) -> np.ndarray:
    """Water beyond a wavy shore line in 60% of the scenes (painted into `image`) -> bool
    [H, W]; y, x: float32 [H, W] pixel coordinates."""
    height, width = y.shape
    water = np.zeros((height, width), dtype=bool)
    if rng.random() < 0.6:
        angle = rng.uniform(0.0, 2.0 * np.pi)
        edge = (x - width / 2) * np.cos(angle) + (y - height / 2) * np.sin(angle)
        shore = 12.0 * draw.smooth_noise(rng, height, width, 40.0)
        water = edge + shore > rng.uniform(0.1, 0.3) * min(height, width)
        draw.paint(image, water, rng, draw.jitter(rng, (45, 80, 110), 12), "noise")
    return water


def _roads(rng: np.random.Generator, image: np.ndarray, y: np.ndarray, x: np.ndarray,
           water: np.ndarray) -> tuple[list[Road], np.ndarray]:
    """One or two straight roads across the land (painted into `image`) -> the roads and
    the paved pixels bool [H, W]; y, x: float32 [H, W] pixel coordinates."""
    height, width = y.shape
    roads: list[Road] = []
    paved = np.zeros((height, width), dtype=bool)
    for _ in range(int(rng.integers(1, 3))):
        angle = rng.uniform(0.0, np.pi)
        direction = np.array([np.cos(angle), np.sin(angle)])
        point = np.array([rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height])
        half_w = rng.uniform(9.0, 14.0)
        distance = np.abs((x - point[0]) * direction[1] - (y - point[1]) * direction[0])
        road = (distance < half_w) & ~water
        draw.paint(image, road, rng, draw.jitter(rng, (80, 80, 85), 10), "noise")
        paved |= road
        roads.append((point, direction, half_w))
    return roads, paved


def _parking_lot(rng: np.random.Generator, image: np.ndarray, water: np.ndarray) -> Lot | None:
    """A rotated rectangular lot in 70% of the scenes, painted into `image` where it is on
    land; None when there is none or it lies wholly on water."""
    height, width = water.shape
    if rng.random() >= 0.7:
        return None
    lot_angle = rng.uniform(0.0, np.pi)
    lot_centre = np.array([rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75)]) * (width, height)
    half = np.array([rng.uniform(40.0, 70.0), rng.uniform(25.0, 40.0)])
    outline = draw.place([draw.rect(-half[0], -half[1], half[0], half[1])],
                         lot_centre[0], lot_centre[1], lot_angle)[0]
    lot_mask = draw.fill(outline, height, width) & ~water
    if not lot_mask.any():
        return None
    draw.paint(image, lot_mask, rng, draw.jitter(rng, (120, 120, 125), 10), "noise")
    return lot_centre, half, lot_angle


# ----------------------------------------------------------------------------- objects


class _Placer:
    """Draws objects into a terrain image one at a time and keeps the labels of those drawn."""

    def __init__(self, rng: np.random.Generator, image: np.ndarray) -> None:
        self.rng, self.image = rng, image
        self.height, self.width = image.shape[:2]
        self.occupied = np.zeros((self.height, self.width), dtype=bool)
        self.masks: list[np.ndarray] = []
        self.names: list[str] = []
        self.quads: list[np.ndarray] = []
        self.difficult: list[bool] = []

    def __len__(self) -> int:
        return len(self.masks)

    def place(self, name: str, cx: float, cy: float, angle: float,
              surface: np.ndarray | None) -> bool:
        """Draw one object unless it leaves the image, misses `surface` (bool [H, W], checked
        at the centre) or comes within 2 pixels of another; True when drawn."""
        rng, image, height, width = self.rng, self.image, self.height, self.width
        parts = _aerial_parts(rng, name)
        if name == "storage-tank":
            angle = 0.0
        local = np.concatenate([p for p, _ in parts])
        (x0, y0), (x1, y1) = local.min(axis=0), local.max(axis=0)
        quad = draw.place([draw.rect(x0, y0, x1, y1)], cx, cy, angle)[0]
        if quad.min() < 1.0 or quad[:, 0].max() > width - 2 or quad[:, 1].max() > height - 2:
            return False
        if surface is not None and not surface[int(cy), int(cx)]:
            return False
        margin = draw.fill(draw.place([draw.rect(x0 - 2, y0 - 2, x1 + 2, y1 + 2)],
                                      cx, cy, angle)[0], height, width)
        if self.occupied[margin].any():
            return False
        outlines = draw.place([p for p, _ in parts], cx, cy, angle)
        part_masks = [draw.fill(o, height, width) for o in outlines]
        mask = np.logical_or.reduce(part_masks)
        if mask.sum() < 12:
            return False
        hard = bool(rng.random() < 0.1)
        before = image.copy() if hard else None
        for part_mask, (_, color) in zip(part_masks, parts):
            draw.paint(image, part_mask, rng, color)
        if hard:
            image[mask] = 0.35 * image[mask] + 0.65 * before[mask]
        self.occupied[margin] = True
        self.masks.append(mask)
        self.names.append(name)
        self.quads.append(quad)
        self.difficult.append(hard)
        return True


def _park_in_lot(rng: np.random.Generator, placer: _Placer, lot: Lot, target: int) -> None:
    """6-12 small vehicles (at most `target`) in two rows of bays along the lot's long sides."""
    (lcx, lcy), half, lot_angle = lot
    quota = min(target, int(rng.integers(6, 13)))
    for gx in np.arange(-half[0] + 9.0, half[0] - 8.0, 13.0):
        for gy in (-half[1] + 11.0, half[1] - 11.0):
            if len(placer) < quota and rng.random() < 0.75:
                offset = draw.place([np.array([[gx, gy]])], 0.0, 0.0, lot_angle)[0][0]
                placer.place("small-vehicle", lcx + offset[0], lcy + offset[1],
                             lot_angle + 0.5 * np.pi + rng.normal(0.0, 0.05), None)


def _drive_on_roads(rng: np.random.Generator, placer: _Placer, terrain: _Terrain,
                    target: int) -> None:
    """4-10 more vehicles (75% small) along the roads, either way, off the water."""
    quota = min(target, len(placer) + int(rng.integers(4, 11)))
    for _ in range(60):
        if len(placer) >= quota:
            break
        point, direction, half_w = terrain.roads[int(rng.integers(len(terrain.roads)))]
        along, across = rng.uniform(-400.0, 400.0), rng.uniform(-0.5, 0.5) * half_w
        centre = point + along * direction + across * np.array([-direction[1], direction[0]])
        name = "small-vehicle" if rng.random() < 0.75 else "large-vehicle"
        angle = np.arctan2(direction[1], direction[0]) + (np.pi if rng.random() < 0.5 else 0.0)
        placer.place(name, centre[0], centre[1], angle + rng.normal(0.0, 0.04), ~terrain.water)


def _float_ships(rng: np.random.Generator, placer: _Placer, water: np.ndarray,
                 target: int) -> None:
    """2-6 more ships at random spots and headings on the water (bool [H, W]), if any."""
    quota = min(target, len(placer) + int(rng.integers(2, 7)))
    for _ in range(40 if water.any() else 0):
        if len(placer) >= quota:
            break
        placer.place("ship", rng.uniform(0, placer.width), rng.uniform(0, placer.height),
                     rng.uniform(0.0, 2.0 * np.pi), water)


def _scatter_on_land(rng: np.random.Generator, placer: _Placer, terrain: _Terrain,
                     target: int) -> None:
    """Tanks, planes, courts, ... at random spots on unpaved land until `target` objects."""
    for _ in range(300):
        if len(placer) >= target:
            break
        name = _SCATTERED[int(rng.choice(len(_SCATTERED), p=_SCATTERED_P))]
        placer.place(name, rng.uniform(0, placer.width), rng.uniform(0, placer.height),
                     rng.uniform(0.0, 2.0 * np.pi), ~(terrain.water | terrain.paved))


def labelled_aerial_scene(rng: np.random.Generator, height: int, width: int) -> AerialScene:
    """An aerial scene with all of its DOTA labels: terrain, then 20-40 objects (fewer if
    space runs out) in the lot, on the roads, on the water and over land, in that order."""
    terrain = _terrain(rng, height, width)
    placer = _Placer(rng, terrain.image)
    target = int(rng.integers(20, 41))
    if terrain.lot is not None:
        _park_in_lot(rng, placer, terrain.lot, target)
    _drive_on_roads(rng, placer, terrain, target)
    _float_ships(rng, placer, terrain.water, target)
    _scatter_on_land(rng, placer, terrain, target)
    masks = np.stack(placer.masks) if placer.masks else np.zeros((0, height, width), dtype=bool)
    quads = np.stack(placer.quads) if placer.quads else np.zeros((0, 4, 2))
    return AerialScene(draw.finish(rng, terrain.image), masks, placer.names, quads,
                       np.array(placer.difficult, dtype=bool), float(rng.uniform(0.1, 0.6)))


def aerial_scene(rng: np.random.Generator, height: int, width: int
                 ) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """A DOTA-style aerial scene with 20-40 small rotated objects (fewer if space runs out).

    Returns image uint8 [H, W, 3] RGB, masks bool [K, H, W] (disjoint), the DOTA class name
    of each object (list of K str) and quads float [K, 4, 2]: the 4 corners (x, y) of each
    object's rotated box, clockwise on screen, inside the image.
    """
    scene = labelled_aerial_scene(rng, height, width)
    return scene.image, scene.masks, scene.class_names, scene.quads
