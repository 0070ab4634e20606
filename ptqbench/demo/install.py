"""Synthetic demo data in the official COCO, DOTA-v1.0 and ADE20K layouts (tasks.md section 4).

`ensure_demo_data()` writes, once, a small seeded dataset into a folder of its own
(`$PTQBENCH_CACHE/demo-v1`, else `~/.cache/ptqbench/demo-v1`):

    coco/annotations/instances_{val2017,train2017}.json    coco/{val2017,train2017}/*.jpg
    DOTA/{val,train}/images/*.png                          DOTA/{val,train}/labelTxt/*.txt
    ADEChallengeData2016/images/{validation,training}/*.jpg
    ADEChallengeData2016/annotations/{validation,training}/*.png     (uint8, ADE ids 0..150)
    ADEChallengeData2016/ptqbench_priors/{validation,training}/*.png (uint8, 0..149, 255 none)

so that every loader and evaluator runs on the same code path as on real data. The folder is
written into a temporary sibling and renamed into place; a marker file holding the generator
version and the sizes makes later calls return at once.

Every image has its own random stream, `SeedSequence([seed, dataset, split, index])`: the
evaluation and calibration splits use different seeds, and a smaller `DemoSizes` gives a
prefix of the full demo. The scene functions (`object_scene`, `aerial_scene`, `region_scene`)
are public so that a training script can draw fresh scenes from the same distributions.

Scenes: textured backgrounds (smooth noise, gradients, stripes, blotches) with distractor blobs;
COCO-style images hold 3-8 overlapping objects of 8 real COCO categories, one shape family per
category, later objects occluding earlier ones (occluded pixels leave the occluded mask, and
no occluder may punch a hole into an earlier object since COCO polygons cannot express holes);
DOTA-style aerial scenes hold 20-40 small rotated objects (vehicles on roads and in parking
lots, ships on water, tanks, planes, courts, pools, helicopters), some low-contrast ones
flagged difficult; ADE-style scenes are layered region maps (outdoor: sky, mountain,
building, windows, ground, road, sidewalk, trees, cars, people; indoor: ceiling, wall, floor,
windows, doors, paintings, cabinets, rugs, furniture, people) with real ADE class ids and a
few `0 = other` clutter blobs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ptqbench.errors import ConfigError, DataError

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
MARKER_NAME = "ptqbench_demo.json"
DEMO_FOLDER = "demo-v1"
_SEED = 20230405
_COCO, _DOTA, _ADE = 1, 2, 3
_EVAL, _CALIB = 0, 1
_PRIOR_STREAM = 1

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

DOTA_CLASSES: tuple[str, ...] = (
    "plane", "baseball-diamond", "bridge", "ground-track-field", "small-vehicle",
    "large-vehicle", "ship", "tennis-court", "basketball-court", "storage-tank",
    "soccer-ball-field", "roundabout", "harbor", "swimming-pool", "helicopter",
)

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

# Plausible confusions of a semantic segmenter, in ADE ids (used for the demo priors).
_ADE_CONFUSIONS: dict[int, tuple[int, ...]] = {
    1: (2, 6), 2: (1, 26), 3: (6, 17), 4: (29, 7), 5: (10, 18), 6: (1, 3), 7: (12, 4),
    8: (24, 32), 9: (15, 23), 10: (5, 14), 11: (36, 15), 12: (7, 4), 13: (93,), 15: (9, 11),
    16: (34, 65), 17: (69, 2), 20: (31, 24), 21: (84, 103), 23: (101, 9), 24: (31, 8),
    29: (4, 132),
}


@dataclass(frozen=True)
class DemoSizes:
    """Number of images per split of the demo data (the defaults are the shipped demo).

    The calibration (train) splits are small on purpose: the CPU demo must finish in minutes
    even for search-heavy observers (mse), so runs on the demo calibrate on 8 images (COCO,
    ADE20K) or the windows of 2 images (DOTA): the default calibration size (32) takes every
    sample of a split that has fewer (the log says how many), without a warning.
    """

    coco_val: int = 24
    coco_train: int = 8
    dota_val: int = 4
    dota_train: int = 2
    ade_val: int = 8
    ade_train: int = 8

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"DemoSizes.{key} must be a non-negative int, got {value!r}")


def default_demo_root() -> Path:
    """`$PTQBENCH_CACHE/demo-v1` when that variable is set and not empty, else
    `~/.cache/ptqbench/demo-v1`."""
    cache = os.environ.get("PTQBENCH_CACHE")
    base = Path(cache) if cache else Path.home() / ".cache" / "ptqbench"
    return base / DEMO_FOLDER


def ensure_demo_data(root: Path | None = None, sizes: DemoSizes | None = None) -> Path:
    """Return a data root holding the complete demo, generating it first when needed.

    root: the demo folder (default `default_demo_root()`); it must be a folder of its own.
    sizes: images per split (default `DemoSizes()`).
    A folder whose marker matches (generator version and sizes) is used as is. Otherwise the
    demo is written into a temporary sibling folder and renamed onto `root` (replacing an
    older demo); leftover temporary folders of interrupted runs are removed. A process lock
    beside the folder serialises concurrent calls. Raises DataError when `root` exists, is
    not empty and is not a demo folder (it could be real data: it is never touched).
    """
    root = Path(root).expanduser() if root is not None else default_demo_root()
    sizes = sizes if sizes is not None else DemoSizes()
    stamp = _stamp(sizes)
    if _read_marker(root) == stamp:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _lock(root):
        if _read_marker(root) == stamp:
            return root
        _remove_leftovers(root)
        replace = _check_replaceable(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        log.info("writing synthetic demo data to %s (temporary folder %s)", root, tmp.name)
        try:
            _generate(tmp, sizes)
            (tmp / MARKER_NAME).write_text(json.dumps(stamp, sort_keys=True) + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if replace:
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            old.rmdir()
            root.rename(old)
            tmp.rename(root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(root)
    log.info("synthetic demo data ready at %s", root)
    return root


def _stamp(sizes: DemoSizes) -> dict:
    return {"generator": "ptqbench.tasks.synthetic", "version": GENERATOR_VERSION,
            "sizes": asdict(sizes)}


def _read_marker(root: Path) -> dict | None:
    marker = root / MARKER_NAME
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _lock(root: Path) -> Iterator[None]:
    with open(root.parent / f".{root.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(root: Path) -> None:
    """Remove temporary folders of interrupted generations (called with the lock held)."""
    for pattern in (f".{root.name}.tmp-*", f".{root.name}.old-*"):
        for leftover in sorted(root.parent.glob(pattern)):
            log.info("removing leftover temporary folder %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _check_replaceable(root: Path) -> bool:
    """True when `root` holds an older demo; removes an empty `root`; refuses anything else."""
    if not root.exists():
        return False
    if root.is_dir() and (root / MARKER_NAME).is_file():
        return True
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
        return False
    raise DataError(f"{root} exists and is not a ptqbench demo folder (no {MARKER_NAME}); "
                    "the demo needs a folder of its own: remove it or choose another root")


def _rng(dataset: int, split: int, index: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([_SEED, dataset, split, index, stream]))


def _generate(out: Path, sizes: DemoSizes) -> None:
    _write_coco(out / "coco", "val2017", _EVAL, sizes.coco_val, first_id=1)
    _write_coco(out / "coco", "train2017", _CALIB, sizes.coco_train, first_id=100001)
    _write_dota(out / "DOTA" / "val", _EVAL, sizes.dota_val, first_id=1)
    _write_dota(out / "DOTA" / "train", _CALIB, sizes.dota_train, first_id=1001)
    _write_ade(out / "ADEChallengeData2016", "validation", "val", _EVAL, sizes.ade_val)
    _write_ade(out / "ADEChallengeData2016", "training", "train", _CALIB, sizes.ade_train)


# ----------------------------------------------------------------------------- writers


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, format="JPEG", quality=92)


def _save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _write_coco(coco: Path, split: str, split_code: int, count: int, first_id: int) -> None:
    """COCO instances JSON + JPEGs; annotations are polygons of each visible mask."""
    image_dir = coco / split
    image_dir.mkdir(parents=True)
    (coco / "annotations").mkdir(exist_ok=True)
    images: list[dict] = []
    annotations: list[dict] = []
    for index in range(count):
        rng = _rng(_COCO, split_code, index)
        height, width = int(rng.integers(240, 321)), int(rng.integers(320, 401))
        if rng.random() < 0.2:
            height, width = width, height
        image, masks, category_ids = object_scene(rng, height, width)
        image_id = first_id + index
        file_name = f"{image_id:012d}.jpg"
        _save_jpeg(image_dir / file_name, image)
        images.append({"id": image_id, "file_name": file_name, "height": height,
                       "width": width, "license": 0})
        for k, (mask, category_id) in enumerate(zip(masks, category_ids)):
            annotation = _coco_annotation(mask)
            if annotation is not None:
                annotation.update(id=image_id * 100 + k, image_id=image_id,
                                  category_id=category_id, iscrowd=0)
                annotations.append(annotation)
    dataset = {
        "info": {"description": "ptqbench synthetic demo (not COCO data)",
                 "version": str(GENERATOR_VERSION), "year": 2024},
        "licenses": [{"id": 0, "name": "generated by ptqbench", "url": ""}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n, "supercategory": s} for i, n, s in COCO_CATEGORIES],
    }
    path = coco / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps(dataset, separators=(",", ":")))


def _coco_annotation(mask: np.ndarray) -> dict | None:
    """COCO polygons of a hole-free mask [H, W] bool, with the area and bbox of the mask the
    polygons decode to (what pycocotools' annToMask returns).

    Contours through boundary-pixel centres would lose about half of every boundary pixel
    when rasterised; tracing the mask upsampled 4x (nearest) puts the outline 1/8 pixel
    inside the pixel edges instead, so the polygons decode back to the mask itself.
    """
    import cv2
    from pycocotools import mask as mask_utils

    up = 4
    x0, y0, w, h = cv2.boundingRect(mask.view(np.uint8))
    crop = mask[y0:y0 + h, x0:x0 + w].view(np.uint8)
    upsampled = np.repeat(np.repeat(crop, up, axis=0), up, axis=1)
    contours, _ = cv2.findContours(upsampled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    contours = [cv2.approxPolyDP(c, 1.0, True) for c in contours]
    offset = np.array([x0, y0], dtype=np.float64)
    polygons = [((c.reshape(-1, 2) + 0.5) / up + offset).ravel().tolist()
                for c in contours if len(c) >= 3]
    if not polygons:
        return None
    height, width = mask.shape
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    area = float(mask_utils.area(rle))
    if area <= 0:
        return None
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    return {"segmentation": polygons, "area": area, "bbox": bbox}


def _write_dota(folder: Path, split_code: int, count: int, first_id: int) -> None:
    """DOTA-v1.0 PNG images + labelTxt (header lines, 4 corners, class, difficult)."""
    (folder / "images").mkdir(parents=True)
    (folder / "labelTxt").mkdir()
    for index in range(count):
        rng = _rng(_DOTA, split_code, index)
        height, width = int(rng.integers(480, 545)), int(rng.integers(480, 545))
        scene = _aerial(rng, height, width)
        stem = f"P{first_id + index:04d}"
        _save_png(folder / "images" / f"{stem}.png", scene.image)
        lines = ["imagesource:ptqbench-synthetic", f"gsd:{scene.gsd:.6f}"]
        for quad, name, difficult in zip(scene.quads, scene.class_names, scene.difficult):
            corners = " ".join(f"{v:.1f}" for v in quad.ravel())
            lines.append(f"{corners} {name} {int(difficult)}")
        (folder / "labelTxt" / f"{stem}.txt").write_text("\n".join(lines) + "\n")


def _write_ade(ade: Path, split: str, prefix: str, split_code: int, count: int) -> None:
    """ADE20K JPEGs, annotation PNGs (ADE ids) and demo semantic-prior PNGs (reduced ids)."""
    folders = [ade / kind / split for kind in ("images", "annotations", "ptqbench_priors")]
    for folder in folders:
        folder.mkdir(parents=True)
    for index in range(count):
        rng = _rng(_ADE, split_code, index)
        height, width = int(rng.integers(240, 273)), int(rng.integers(304, 337))
        image, label_map = region_scene(rng, height, width)
        prior = semantic_prior(_rng(_ADE, split_code, index, _PRIOR_STREAM), label_map)
        stem = f"ADE_{prefix}_{index + 1:08d}"
        _save_jpeg(folders[0] / f"{stem}.jpg", image)
        _save_png(folders[1] / f"{stem}.png", label_map)
        _save_png(folders[2] / f"{stem}.png", prior)


# ----------------------------------------------------------------------------- drawing


def _ellipse(ax: float, ay: float, cx: float = 0.0, cy: float = 0.0, n: int = 40) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], axis=1)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _rounded_rect(hw: float, hh: float, radius: float, cx: float = 0.0, cy: float = 0.0,
                  n_arc: int = 6) -> np.ndarray:
    radius = min(radius, hw, hh)
    points = []
    corners = ((hw - radius, hh - radius, 0.0), (-hw + radius, hh - radius, 0.5 * np.pi),
               (-hw + radius, -hh + radius, np.pi), (hw - radius, -hh + radius, 1.5 * np.pi))
    for x, y, start in corners:
        t = start + np.linspace(0.0, 0.5 * np.pi, n_arc)
        points.append(np.stack([cx + x + radius * np.cos(t), cy + y + radius * np.sin(t)], 1))
    return np.concatenate(points)


def _star(n: int, r_out: float, r_in: float, phase: float = -0.5 * np.pi) -> np.ndarray:
    t = phase + np.arange(2 * n) * np.pi / n
    r = np.where(np.arange(2 * n) % 2 == 0, r_out, r_in)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _blob(rng: np.random.Generator, radius: float, n: int = 9) -> np.ndarray:
    """A random star-shaped (never self-intersecting) polygon of about `radius`."""
    t = np.sort(rng.uniform(0.0, 2.0 * np.pi, n))
    r = radius * rng.uniform(0.55, 1.0, n)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _place(parts: list[np.ndarray], cx: float, cy: float, angle: float) -> list[np.ndarray]:
    """Rotate local part outlines [N, 2] by `angle` (radians) and move them to (cx, cy)."""
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, s], [-s, c]])
    return [p @ rotation + np.array([cx, cy]) for p in parts]


def _fill(polygon: np.ndarray, height: int, width: int) -> np.ndarray:
    """Rasterise one polygon [N, 2] (x, y) with subpixel vertices -> bool [H, W]."""
    import cv2

    canvas = np.zeros((height, width), dtype=np.uint8)
    points = np.round(polygon * 16.0).astype(np.int32)
    cv2.fillPoly(canvas, [points], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.view(bool)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Smooth random field [H, W] float32 with features about `cell` pixels wide."""
    import cv2

    grid = rng.standard_normal((max(2, int(height / cell) + 2), max(2, int(width / cell) + 2)))
    return cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)


def _texture(rng: np.random.Generator, height: int, width: int, color: np.ndarray,
             kind: str | None = None) -> np.ndarray:
    """A [H, W, 3] float32 texture around `color`: noise, gradient, stripes, blotch or plain
    (without grain: `_finish` adds sensor noise to the whole image)."""
    if kind is None:
        kind = ("noise", "gradient", "stripes", "blotch", "plain")[int(rng.integers(5))]
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    if kind == "noise":
        field = 18.0 * _smooth_noise(rng, height, width, rng.uniform(3.0, 16.0))
    elif kind == "gradient":
        angle = rng.uniform(0.0, 2.0 * np.pi)
        ramp = x * np.cos(angle) + y * np.sin(angle)
        field = rng.uniform(25.0, 60.0) * (ramp / max(height, width, 1))
    elif kind == "stripes":
        angle, period = rng.uniform(0.0, np.pi), rng.uniform(4.0, 14.0)
        phase = (x * np.cos(angle) + y * np.sin(angle)) * (2.0 * np.pi / period)
        field = rng.uniform(12.0, 30.0) * np.sin(phase)
    elif kind == "blotch":
        field = np.where(_smooth_noise(rng, height, width, rng.uniform(4.0, 12.0)) > 0.2,
                         rng.uniform(-45.0, -20.0), 0.0).astype(np.float32)
    else:
        field = np.zeros((height, width), dtype=np.float32)
    tint = rng.uniform(0.7, 1.3, 3).astype(np.float32)
    out = np.asarray(field, dtype=np.float32)[..., None] * tint
    out += color.astype(np.float32)
    return out


def _jitter(rng: np.random.Generator, color: tuple[int, int, int] | np.ndarray,
            amount: float = 18.0) -> np.ndarray:
    """`color` plus a uniform offset in [-amount, amount] per channel -> float32 [3]."""
    return np.clip(np.asarray(color, dtype=np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _pick(rng: np.random.Generator, palette: list[tuple[int, int, int]],
          amount: float = 18.0) -> np.ndarray:
    """One colour of `palette`, jittered -> float32 [3]."""
    return _jitter(rng, palette[int(rng.integers(len(palette)))], amount)


def _paint(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, color: np.ndarray,
           kind: str | None = None) -> None:
    """Fill `mask` [H, W] bool of `image` [H, W, 3] float32 with a texture, in place."""
    import cv2

    x0, y0, w, h = cv2.boundingRect(mask.view(np.uint8))
    if w == 0 or h == 0:
        return
    y1, x1 = y0 + h, x0 + w
    texture = _texture(rng, h, w, color, kind)
    np.copyto(image[y0:y1, x0:x1], texture, where=mask[y0:y1, x0:x1, None])


def _finish(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Soften edges slightly, add sensor noise (the grain of every texture) -> uint8 [H, W, 3]."""
    import cv2

    image = cv2.GaussianBlur(image, (0, 0), 0.6)
    noise = rng.standard_normal((*image.shape[:2], 1), dtype=np.float32)
    noise *= np.float32(rng.uniform(2.0, 4.5))
    image += noise
    np.rint(image, out=image)
    np.clip(image, 0, 255, out=image)
    return image.astype(np.uint8)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A textured backdrop [H, W, 3] float32: one or two textured areas split by a line."""
    image = _texture(rng, height, width, rng.uniform(40, 215, 3))
    if rng.random() < 0.6:
        y, x = np.mgrid[0:height, 0:width]
        angle = rng.uniform(-0.4, 0.4) + (0.5 * np.pi if rng.random() < 0.5 else 0.0)
        offset = rng.uniform(0.3, 0.7) * (height if abs(np.sin(angle)) < 0.5 else width)
        lower = (y * np.cos(angle) + x * np.sin(angle)) > offset
        _paint(image, lower, rng, rng.uniform(40, 215, 3))
    return image


def _has_hole(mask: np.ndarray) -> bool:
    """True when the mask [H, W] bool encloses background pixels."""
    import cv2

    _, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP,
                                    cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is not None and bool((hierarchy[0, :, 3] >= 0).any())


def _holes(mask: np.ndarray) -> np.ndarray:
    """The background pixels that the mask [H, W] bool encloses -> bool [H, W]."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros(mask.shape, dtype=np.uint8)
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    return filled.view(bool) & ~mask


# ----------------------------------------------------------------------------- COCO-style


def _coco_parts(rng: np.random.Generator, category_id: int
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Outline parts [N, 2] of one object in unit size (about [-1, 1]^2) with their colours."""
    if category_id == 1:  # person: legs, torso, head
        trousers = _pick(rng, [(40, 50, 90), (30, 30, 30), (120, 100, 80)])
        shirt = rng.uniform(30, 230, 3)
        skin = _pick(rng, [(224, 172, 105), (141, 85, 45), (255, 214, 170), (198, 134, 66)])
        return [(_rect(-0.26, 0.35, -0.05, 1.0), trousers),
                (_rect(0.05, 0.35, 0.26, 1.0), trousers), (_rounded_rect(0.32, 0.45, 0.12), shirt),
                (_ellipse(0.2, 0.22, cy=-0.68), skin)]
    if category_id == 3:  # car: cabin, body, wheels
        paint = _pick(rng, [(180, 20, 25), (25, 60, 160), (225, 225, 225), (25, 25, 28)])
        cabin = np.array([[-0.55, -0.2], [-0.32, -0.62], [0.4, -0.62], [0.62, -0.2]])
        tyre = _jitter(rng, (20, 20, 20), 8)
        return [(cabin, _jitter(rng, (90, 120, 150))), (_rounded_rect(1.0, 0.32, 0.14), paint),
                (_ellipse(0.2, 0.2, -0.6, 0.32), tyre), (_ellipse(0.2, 0.2, 0.6, 0.32), tyre)]
    if category_id == 13:  # stop sign: white-rimmed red octagon
        return [(_ellipse(1.0, 1.0, n=8), _jitter(rng, (235, 235, 235), 10)),
                (_ellipse(0.86, 0.86, n=8), _jitter(rng, (200, 20, 30), 15))]
    if category_id == 18:  # dog: legs, tail, body, head
        fur = _pick(rng, [(120, 75, 35), (30, 25, 22), (210, 170, 100), (235, 230, 220)])
        return [(_rect(-0.6, 0.1, -0.45, 0.75), fur), (_rect(0.45, 0.1, 0.6, 0.75), fur),
                (_rect(-1.0, -0.35, -0.7, -0.25), fur), (_ellipse(0.8, 0.38), fur),
                (_ellipse(0.3, 0.26, 0.85, -0.38), _jitter(rng, fur, 12))]
    if category_id == 38:  # kite: a bright star
        color = _pick(rng, [(250, 200, 20), (240, 60, 140), (40, 200, 220), (250, 120, 20)])
        return [(_star(int(rng.integers(5, 7)), 1.0, rng.uniform(0.4, 0.55)), color)]
    if category_id == 44:  # bottle: body, neck, cap
        glass = _pick(rng, [(30, 110, 50), (110, 60, 20), (150, 190, 210)])
        cap = _pick(rng, [(200, 30, 30), (220, 220, 220), (200, 170, 40)])
        return [(_rounded_rect(0.34, 0.62, 0.14, cy=0.38), glass),
                (_rect(-0.13, -0.8, 0.13, -0.2), glass), (_rect(-0.15, -1.0, 0.15, -0.8), cap)]
    if category_id == 53:  # apple: leaf, round fruit
        fruit = _pick(rng, [(190, 25, 30), (120, 190, 50), (230, 200, 60)])
        return [(_ellipse(0.16, 0.32, 0.18, -0.92), _jitter(rng, (60, 140, 40))),
                (_ellipse(0.8, 0.75, cy=0.1), fruit)]
    if category_id == 62:  # chair: back, seat, legs (non-convex)
        wood = _pick(rng, [(120, 80, 40), (35, 30, 28), (170, 130, 80)])
        return [(_rect(-0.62, -1.0, -0.42, 0.15), wood), (_rect(-0.62, 0.0, 0.62, 0.18), wood),
                (_rect(-0.62, 0.18, -0.5, 1.0), wood), (_rect(0.5, 0.18, 0.62, 1.0), wood)]
    raise ConfigError(f"no synthetic shape family for COCO category {category_id}")


_UPRIGHT = (1, 3, 18, 44, 62)  # COCO categories drawn nearly upright; the others spin freely


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
    image = _background(rng, height, width)
    for _ in range(int(rng.integers(0, 3))):
        blob = _place([_blob(rng, rng.uniform(0.05, 0.2) * min(height, width))],
                      rng.uniform(0, width), rng.uniform(0, height), 0.0)[0]
        _paint(image, _fill(blob, height, width), rng, rng.uniform(30, 225, 3))
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
        outlines = _place([p * mirror for p, _ in parts], cx, cy, angle)
        part_masks = [_fill(o, height, width) for o in outlines]
        mask = np.logical_or.reduce(part_masks)
        slivers = _holes(mask)  # gaps closed by rasterisation (between legs, ...): filled
        mask |= slivers
        if mask.sum() < 80:
            continue
        remaining = [v & ~mask for v in visible]
        if any(r.sum() < max(0.35 * a, 60) or _has_hole(r) for r, a in zip(remaining, full_areas)):
            continue
        colors = [color for _, color in parts]
        for part_mask, color in zip(part_masks + [slivers], colors + colors[:1]):
            _paint(image, part_mask, rng, color)
        visible = remaining + [mask]
        full_areas.append(int(mask.sum()))
        category_ids.append(category_id)
    return _finish(rng, image), np.stack(visible), category_ids


# ----------------------------------------------------------------------------- DOTA-style


@dataclass(frozen=True)
class _AerialScene:
    image: np.ndarray            # uint8 [H, W, 3]
    masks: np.ndarray            # bool [K, H, W], disjoint
    class_names: list[str]       # K DOTA class names
    quads: np.ndarray            # float [K, 4, 2] corners of each rotated box, clockwise
    difficult: np.ndarray        # bool [K]
    gsd: float                   # metres per pixel (for the labelTxt header)


def _aerial_parts(rng: np.random.Generator, name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Outline parts [N, 2] in pixels (local frame, x along the object) with their colours."""
    if name == "small-vehicle":
        length = rng.uniform(5.0, 8.5)
        body = _pick(rng, [(200, 200, 205), (30, 30, 35), (160, 30, 30), (40, 60, 140)], 12)
        glass = _jitter(rng, (40, 50, 60), 8)
        return [(_rounded_rect(length, 0.45 * length, 1.5), body),
                (_rect(0.1 * length, -0.35 * length, 0.45 * length, 0.35 * length), glass)]
    if name == "large-vehicle":
        length, half_w = rng.uniform(11.0, 19.0), rng.uniform(3.8, 5.5)
        trailer = _pick(rng, [(225, 225, 225), (200, 120, 40), (110, 110, 120)], 12)
        cab = _pick(rng, [(60, 60, 150), (200, 200, 200), (150, 30, 30)], 12)
        return [(_rect(-length, -half_w, 0.62 * length, half_w), trailer),
                (_rect(0.66 * length, -half_w, length, half_w), cab)]
    if name == "ship":
        length = rng.uniform(12.0, 26.0)
        half_w = 0.24 * length
        hull = np.array([[-length, -half_w], [0.55 * length, -half_w], [length, 0.0],
                         [0.55 * length, half_w], [-length, half_w]])
        deck = _rect(-0.7 * length, -0.6 * half_w, -0.1 * length, 0.6 * half_w)
        return [(hull, _pick(rng, [(230, 230, 230), (150, 150, 160), (60, 60, 70)], 12)),
                (deck, _jitter(rng, (200, 200, 190), 10))]
    if name == "storage-tank":
        radius = rng.uniform(6.0, 15.0)
        shell = _pick(rng, [(215, 215, 210), (180, 182, 178)], 12)
        return [(_ellipse(radius, radius, n=48), shell),
                (_ellipse(0.7 * radius, 0.7 * radius), _jitter(rng, (195, 195, 190), 10))]
    if name == "plane":
        span = rng.uniform(15.0, 26.0)
        white = _pick(rng, [(235, 235, 235), (200, 205, 210)], 12)
        wings = np.array([[0.35, 0.0], [-0.1, -1.0], [-0.3, -1.0], [-0.05, 0.0], [-0.3, 1.0],
                          [-0.1, 1.0]]) * span
        return [(_rect(-span, -0.12 * span, span, 0.12 * span), white), (wings, white),
                (_rect(-span, -0.4 * span, -0.8 * span, 0.4 * span), white)]
    if name == "helicopter":
        length = rng.uniform(7.0, 11.0)
        body = _pick(rng, [(60, 70, 50), (200, 200, 200), (160, 30, 30)], 12)
        rotor = _jitter(rng, (40, 40, 40), 8)
        return [(_rect(-2.0, -0.12, 0.0, 0.12) * length, body),
                (_ellipse(0.8, 0.38, 0.2, 0.0) * length, body),
                (_rect(-0.9, -0.08, 1.3, 0.08) * length, rotor),
                (_rect(0.12, -1.1, 0.28, 1.1) * length, rotor)]
    if name in ("tennis-court", "basketball-court"):
        half_l, half_w = rng.uniform(12.0, 18.0), rng.uniform(6.5, 9.5)
        if name == "tennis-court":
            surface = _pick(rng, [(60, 130, 80), (50, 90, 150), (170, 70, 60)], 12)
        else:
            surface = _pick(rng, [(190, 120, 60), (150, 90, 60)], 12)
        line = _jitter(rng, (240, 240, 240), 8)
        return [(_rect(-half_l, -half_w, half_l, half_w), line),
                (_rect(1.2 - half_l, 1.2 - half_w, half_l - 1.2, half_w - 1.2), surface),
                (_rect(-0.6, 1.2 - half_w, 0.6, half_w - 1.2), line)]
    if name == "swimming-pool":
        half_l, half_w = rng.uniform(7.0, 15.0), rng.uniform(4.5, 8.0)
        water = _pick(rng, [(40, 170, 210), (70, 200, 220)], 12)
        return [(_rounded_rect(half_l, half_w, 2.0), _jitter(rng, (225, 225, 215), 8)),
                (_rounded_rect(half_l - 1.5, half_w - 1.5, 1.5), water)]
    raise ConfigError(f"no synthetic shape family for DOTA class {name!r}")


# Objects scattered over land after the vehicles (lot, roads) and the ships (water).
_SCATTERED = ("large-vehicle", "storage-tank", "plane", "helicopter", "tennis-court",
              "basketball-court", "swimming-pool")
_SCATTERED_P = np.array([0.15, 0.22, 0.14, 0.10, 0.12, 0.10, 0.17])


def _aerial(rng: np.random.Generator, height: int, width: int) -> _AerialScene:
    """Terrain with water, roads and a parking lot; 20-40 small rotated objects, 2+ px apart."""
    soil = _pick(rng, [(110, 120, 90), (150, 140, 115), (125, 125, 120)], 15)
    image = _texture(rng, height, width, soil, "noise")
    vegetation = _smooth_noise(rng, height, width, 60.0) > 0.5
    _paint(image, vegetation, rng, _jitter(rng, (95, 125, 70), 15), "blotch")
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    water = np.zeros((height, width), dtype=bool)
    if rng.random() < 0.6:
        angle = rng.uniform(0.0, 2.0 * np.pi)
        edge = (x - width / 2) * np.cos(angle) + (y - height / 2) * np.sin(angle)
        shore = 12.0 * _smooth_noise(rng, height, width, 40.0)
        water = edge + shore > rng.uniform(0.1, 0.3) * min(height, width)
        _paint(image, water, rng, _jitter(rng, (45, 80, 110), 12), "noise")
    roads: list[tuple[np.ndarray, np.ndarray, float]] = []
    paved = np.zeros((height, width), dtype=bool)
    for _ in range(int(rng.integers(1, 3))):
        angle = rng.uniform(0.0, np.pi)
        direction = np.array([np.cos(angle), np.sin(angle)])
        point = np.array([rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height])
        half_w = rng.uniform(9.0, 14.0)
        distance = np.abs((x - point[0]) * direction[1] - (y - point[1]) * direction[0])
        road = (distance < half_w) & ~water
        _paint(image, road, rng, _jitter(rng, (80, 80, 85), 10), "noise")
        paved |= road
        roads.append((point, direction, half_w))
    lot = None
    if rng.random() < 0.7:
        lot_angle = rng.uniform(0.0, np.pi)
        lot_centre = np.array([rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75)]) * (width, height)
        half = np.array([rng.uniform(40.0, 70.0), rng.uniform(25.0, 40.0)])
        outline = _place([_rect(-half[0], -half[1], half[0], half[1])],
                         lot_centre[0], lot_centre[1], lot_angle)[0]
        lot_mask = _fill(outline, height, width) & ~water
        if lot_mask.any():
            _paint(image, lot_mask, rng, _jitter(rng, (120, 120, 125), 10), "noise")
            lot = (lot_centre, half, lot_angle)

    occupied = np.zeros((height, width), dtype=bool)
    masks: list[np.ndarray] = []
    names: list[str] = []
    quads: list[np.ndarray] = []
    difficult: list[bool] = []

    def try_place(name: str, cx: float, cy: float, angle: float,
                  surface: np.ndarray | None) -> bool:
        """Draw one object unless it leaves the image, misses `surface` or crowds another."""
        parts = _aerial_parts(rng, name)
        if name == "storage-tank":
            angle = 0.0
        local = np.concatenate([p for p, _ in parts])
        (x0, y0), (x1, y1) = local.min(axis=0), local.max(axis=0)
        quad = _place([_rect(x0, y0, x1, y1)], cx, cy, angle)[0]
        if quad.min() < 1.0 or quad[:, 0].max() > width - 2 or quad[:, 1].max() > height - 2:
            return False
        if surface is not None and not surface[int(cy), int(cx)]:
            return False
        margin = _fill(_place([_rect(x0 - 2, y0 - 2, x1 + 2, y1 + 2)], cx, cy, angle)[0],
                       height, width)
        if occupied[margin].any():
            return False
        outlines = _place([p for p, _ in parts], cx, cy, angle)
        part_masks = [_fill(o, height, width) for o in outlines]
        mask = np.logical_or.reduce(part_masks)
        if mask.sum() < 12:
            return False
        hard = bool(rng.random() < 0.1)
        before = image.copy() if hard else None
        for part_mask, (_, color) in zip(part_masks, parts):
            _paint(image, part_mask, rng, color)
        if hard:
            image[mask] = 0.35 * image[mask] + 0.65 * before[mask]
        occupied[margin] = True
        masks.append(mask)
        names.append(name)
        quads.append(quad)
        difficult.append(hard)
        return True

    target = int(rng.integers(20, 41))
    if lot is not None:
        (lcx, lcy), half, lot_angle = lot
        quota = min(target, int(rng.integers(6, 13)))
        for gx in np.arange(-half[0] + 9.0, half[0] - 8.0, 13.0):
            for gy in (-half[1] + 11.0, half[1] - 11.0):
                if len(masks) < quota and rng.random() < 0.75:
                    offset = _place([np.array([[gx, gy]])], 0.0, 0.0, lot_angle)[0][0]
                    try_place("small-vehicle", lcx + offset[0], lcy + offset[1],
                              lot_angle + 0.5 * np.pi + rng.normal(0.0, 0.05), None)
    quota = min(target, len(masks) + int(rng.integers(4, 11)))
    for _ in range(60):
        if len(masks) >= quota:
            break
        point, direction, half_w = roads[int(rng.integers(len(roads)))]
        along, across = rng.uniform(-400.0, 400.0), rng.uniform(-0.5, 0.5) * half_w
        centre = point + along * direction + across * np.array([-direction[1], direction[0]])
        name = "small-vehicle" if rng.random() < 0.75 else "large-vehicle"
        angle = np.arctan2(direction[1], direction[0]) + (np.pi if rng.random() < 0.5 else 0.0)
        try_place(name, centre[0], centre[1], angle + rng.normal(0.0, 0.04), ~water)
    quota = min(target, len(masks) + int(rng.integers(2, 7)))
    for _ in range(40 if water.any() else 0):
        if len(masks) >= quota:
            break
        try_place("ship", rng.uniform(0, width), rng.uniform(0, height),
                  rng.uniform(0.0, 2.0 * np.pi), water)
    for _ in range(300):
        if len(masks) >= target:
            break
        name = _SCATTERED[int(rng.choice(len(_SCATTERED), p=_SCATTERED_P))]
        try_place(name, rng.uniform(0, width), rng.uniform(0, height),
                  rng.uniform(0.0, 2.0 * np.pi), ~(water | paved))
    stacked = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
    quad_array = np.stack(quads) if quads else np.zeros((0, 4, 2))
    return _AerialScene(_finish(rng, image), stacked, names, quad_array,
                        np.array(difficult, dtype=bool), float(rng.uniform(0.1, 0.6)))


def aerial_scene(rng: np.random.Generator, height: int, width: int
                 ) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """A DOTA-style aerial scene with 20-40 small rotated objects (fewer if space runs out).

    Returns image uint8 [H, W, 3] RGB, masks bool [K, H, W] (disjoint), the DOTA class name
    of each object (list of K str) and quads float [K, 4, 2]: the 4 corners (x, y) of each
    object's rotated box, clockwise on screen, inside the image.
    """
    scene = _aerial(rng, height, width)
    return scene.image, scene.masks, scene.class_names, scene.quads


# ----------------------------------------------------------------------------- ADE-style


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
        color = _jitter(self.rng, base if color is None else color)
        _paint(self.image, mask, self.rng, color, kind)

    def polygon(self, points: np.ndarray, ade_id: int, color: np.ndarray | None = None) -> None:
        """Label and paint the inside of one polygon [N, 2] (x, y)."""
        self.put(_fill(points, self.height, self.width), ade_id, color)

    def union(self, polygons: list[np.ndarray], ade_id: int,
              color: np.ndarray | None = None) -> None:
        """Label and paint the union of several polygons [N, 2] in one colour."""
        masks = [_fill(p, self.height, self.width) for p in polygons]
        self.put(np.logical_or.reduce(masks), ade_id, color)


def _ade_person(canvas: _Canvas, cx: float, foot: float, size: float) -> None:
    """A standing person `2 * size` tall with feet at (cx, foot)."""
    body = [_rect(-0.22, 0.3, 0.22, 1.0), _rounded_rect(0.28, 0.4, 0.1, cy=-0.05),
            _ellipse(0.16, 0.19, cy=-0.6)]
    canvas.union(_place([b * size for b in body], cx, foot - size, 0.0), 13,
                 canvas.rng.uniform(40, 220, 3))


def _ade_clutter(canvas: _Canvas) -> None:
    """0-2 small unlabelled (`0 = other`) blobs."""
    rng = canvas.rng
    for _ in range(int(rng.integers(0, 3))):
        blob = _place([_blob(rng, rng.uniform(6.0, 18.0))], rng.uniform(0, canvas.width),
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
        canvas.polygon(_rect(x0, horizon - h, x0 + w, horizon + 2), 2)
        if rng.random() < 0.7:
            for wx in np.arange(x0 + 5, x0 + w - 10, rng.uniform(12, 18)):
                for wy in np.arange(horizon - h + 5, horizon - 10, rng.uniform(14, 20)):
                    canvas.polygon(_rect(wx, wy, wx + 6, wy + 8), 9)
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
        trunk = _rect(tx - 0.12 * size, base - 1.2 * size, tx + 0.12 * size, base)
        canvas.polygon(trunk, 5, np.array([90, 60, 35]))
        radii, dxs = rng.uniform(0.4, 0.7, 4), rng.uniform(-0.5, 0.5, 4)
        dys = rng.uniform(-0.4, 0.4, 4)
        canvas.union([_ellipse(r * size, r * size, tx + dx * size, base + (dy - 1.6) * size)
                      for r, dx, dy in zip(radii, dxs, dys)], 5)
    for _ in range(int(rng.integers(0, 4))):
        foot = rng.uniform(horizon + 0.15 * (height - horizon), height - 2)
        scale = 0.1 + 0.9 * (foot - horizon) / (height - horizon)
        cx = vanish + (centre - vanish) * scale + rng.uniform(-0.7, 0.7) * bottom_half * scale
        half_l, half_h = 30 * scale + 6, 11 * scale + 3
        body = _rounded_rect(half_l, half_h, 0.3 * half_h, cx, foot - half_h)
        cabin = _rounded_rect(0.6 * half_l, 0.7 * half_h, 0.3 * half_h, cx, foot - 2.2 * half_h)
        canvas.union([body, cabin], 21, rng.uniform(20, 230, 3))
    for _ in range(int(rng.integers(0, 4))):
        foot = rng.uniform(horizon + 0.1 * (height - horizon), height - 2)
        _ade_person(canvas, rng.uniform(0.05, 0.95) * width, foot,
                    (0.1 + 0.25 * (foot - horizon) / (height - horizon)) * height)
    _ade_clutter(canvas)


# Furniture outlines in units of its size, feet at y = 0: bed, table, chair, sofa (ADE ids).
_FURNITURE: dict[int, list[np.ndarray]] = {
    8: [_rect(-1.6, -0.7, 1.6, 0.0), _rect(1.45, -1.3, 1.7, 0.0)],
    16: [_rect(-1.2, -1.0, 1.2, -0.8), _rect(-1.1, -0.8, -0.95, 0.0), _rect(0.95, -0.8, 1.1, 0.0)],
    20: [_rect(-0.5, -1.6, -0.35, 0.0), _rect(-0.5, -0.75, 0.5, -0.6), _rect(0.38, -0.6, 0.5, 0.0)],
    24: [_rounded_rect(1.5, 0.35, 0.12, 0.0, -0.35), _rounded_rect(1.5, 0.3, 0.15, 0.0, -0.95)],
}


def _indoor(canvas: _Canvas) -> None:
    """Wall, ceiling, floor, windows, a door, a painting, a cabinet, a rug, furniture, people,
    clutter."""
    rng, height, width = canvas.rng, canvas.height, canvas.width
    canvas.put(np.ones((height, width), dtype=bool), 1)
    if rng.random() < 0.6:
        canvas.polygon(_rect(-1, -1, width + 1, rng.uniform(0.08, 0.2) * height), 6)
    floor_y = rng.uniform(0.58, 0.78) * height
    canvas.polygon(_rect(-1, floor_y, width + 1, height + 1), 4)
    for _ in range(int(rng.integers(0, 3))):
        x0, w = rng.uniform(0, 0.8) * width, rng.uniform(0.12, 0.25) * width
        y0, h = rng.uniform(0.22, 0.35) * height, rng.uniform(0.18, 0.3) * height
        canvas.polygon(_rect(x0, y0, x0 + w, y0 + h), 9)
    if rng.random() < 0.6:
        x0, w = rng.uniform(0, 0.85) * width, rng.uniform(0.12, 0.18) * width
        top = floor_y - rng.uniform(0.45, 0.6) * height
        canvas.polygon(_rect(x0, top, x0 + w, floor_y + 2), 15)
    if rng.random() < 0.6:
        x0, w = rng.uniform(0, 0.85) * width, rng.uniform(0.08, 0.18) * width
        y0 = rng.uniform(0.2, 0.35) * height
        canvas.polygon(_rect(x0, y0, x0 + w, y0 + 0.7 * w), 23, rng.uniform(40, 220, 3))
    if rng.random() < 0.5:
        x0, w = rng.uniform(0, 0.8) * width, rng.uniform(0.15, 0.3) * width
        top = floor_y - rng.uniform(0.15, 0.3) * height
        canvas.polygon(_rect(x0, top, x0 + w, floor_y + 4), 11)
    if rng.random() < 0.6:
        depth = height - floor_y
        cx, cy = rng.uniform(0.3, 0.7) * width, floor_y + rng.uniform(0.3, 0.6) * depth
        canvas.polygon(_ellipse(rng.uniform(0.2, 0.35) * width, rng.uniform(0.15, 0.3) * depth,
                                cx, cy), 29)
    for _ in range(int(rng.integers(1, 4))):
        kind = (8, 16, 20, 24)[int(rng.integers(4))]
        foot = floor_y + rng.uniform(0.2, 0.9) * (height - floor_y)
        cx, size = rng.uniform(0.1, 0.9) * width, rng.uniform(0.12, 0.22) * height
        canvas.union(_place([p * size for p in _FURNITURE[kind]], cx, foot, 0.0), kind)
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
    return _finish(rng, canvas.image), canvas.labels


def semantic_prior(rng: np.random.Generator, label_map: np.ndarray) -> np.ndarray:
    """A plausible but imperfect semantic-segmenter output for an ADE label map.

    label_map: uint8 [H, W] ADE ids 0..150. Returns uint8 [H, W] in the reduced label space
    (0..149, 255 = no prediction): the reduced GT predicted at 1/4 resolution with a random
    phase (blocky boundaries, small objects lost or grown), shifted by up to 3 pixels, with
    some connected regions relabelled to a confusable class (20% of the small ones, 5% of
    those covering >= 5% of the image) and up to two spurious blobs.
    """
    import cv2

    height, width = label_map.shape
    factor = 4
    oy, ox = (int(v) for v in rng.integers(0, factor, 2))
    dy, dx = (int(v) for v in rng.integers(-3, 4, 2))
    coarse = label_map[oy::factor, ox::factor]
    rows = np.clip((np.arange(height) - dy - oy + factor // 2) // factor, 0, coarse.shape[0] - 1)
    cols = np.clip((np.arange(width) - dx - ox + factor // 2) // factor, 0, coarse.shape[1] - 1)
    shifted = coarse[rows][:, cols]
    prior = shifted.copy()
    for ade_id in np.unique(shifted):
        if ade_id == 0:
            continue
        count, components = cv2.connectedComponents((shifted == ade_id).astype(np.uint8))
        for component in range(1, count):
            region = components == component
            if rng.random() < (0.2 if region.sum() < 0.05 * height * width else 0.05):
                choices = _ADE_CONFUSIONS.get(int(ade_id), (int(ade_id),))
                prior[region] = choices[int(rng.integers(len(choices)))]
    present = [int(v) for v in np.unique(shifted) if v != 0]
    for _ in range(int(rng.integers(0, 3))):
        if not present:
            break
        blob = _place([_blob(rng, rng.uniform(5.0, 15.0))], rng.uniform(0, width),
                      rng.uniform(0, height), 0.0)[0]
        prior[_fill(blob, height, width)] = present[int(rng.integers(len(present)))]
    reduced = prior.astype(np.int16) - 1
    reduced[prior == 0] = 255
    return reduced.astype(np.uint8)
