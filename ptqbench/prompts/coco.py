"""`ptqbench prompts coco`: a torchvision detector's boxes on a COCO split, as a detection file.

The file is COCO's detection results format, which `--prompts` / `--calib-prompts` read
(`tasks.prompts.read_coco_detections`): a JSON list of `{"image_id": int, "category_id": int
(COCO's 91-id scheme), "bbox": [x, y, w, h] (image pixels, floats), "score": float}`, images in
selection order, each image's boxes best first; an image without a box has no entry (the coco
task then prompts it with the reference's placeholder box).

Images: the whole split, or the first N by image id (`limit`, the order `run --limit N`
evaluates) or the first N in the annotation file's order (`first`, the order calibration reads).
Cached (`cache.py`) by detector, weights sha256, split, data fingerprint (the annotation file's
bytes and each selected image's name and byte size), selection and settings.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ptqbench.errors import ConfigError
from ptqbench.prompts.cache import CacheEntry, entry_for, memoized, prompts_cache_dir, store, write_json_atomic
from ptqbench.prompts.detector import DetectionTiming, coco_entries, detect, torch_device
from ptqbench.prompts.weights import DetectorWeights, build_detector, file_sha256, resolve_weights
from ptqbench.prompts.zoo import DetectorSettings, check_detector
from ptqbench.tasks.coco import CocoSplit, evaluation_image_ids, image_dir, load_split, require_annotation_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratedPrompts:
    """A generated (or reused) prompts file and what made it.

    label: "<detector>@<weights sha256>" as result rows record it; reused: found in the cache.
    """

    path: Path
    detector: str
    weights: DetectorWeights
    reused: bool
    meta: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.detector}@{self.weights.sha256}"


def select_image_ids(split: CocoSplit, *, limit: int | None = None, first: int | None = None) -> list[int]:
    """The images to detect: all of the split in id order, the first `limit` by id, or the first
    `first` in annotation file order (at most one of the two)."""
    _check_selection(limit, first)
    return split.image_ids[:first] if first is not None else evaluation_image_ids(split, limit)


def _check_selection(limit: int | None, first: int | None) -> None:
    if limit is not None and first is not None:
        raise ConfigError("--limit (first images by id) and --first (first images in file order) exclude each other")
    for name, value in (("--limit", limit), ("--first", first)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")


def _selection(data_root: Path, split_name: str, limit: int | None, first: int | None) -> dict[str, Any]:
    """The selected images (ids, file names) and the annotation file's sha256: what a cache
    lookup needs from the annotation file (memoized per file version, since parsing train2017's
    takes a while)."""
    split = load_split(data_root, split_name)
    image_ids = select_image_ids(split, limit=limit, first=first)
    return {"image_ids": image_ids, "file_names": [split.coco.imgs[i]["file_name"] for i in image_ids],
            "annotation_sha256": file_sha256(split.annotation_file)}


def data_fingerprint(selection: dict[str, Any], image_dir: Path) -> str:
    """16 hex digits of the sha256 of the annotation file's sha256 and each selected image's id,
    name and byte size (in selection order; -1 for a missing file)."""
    digest = hashlib.sha256(f"{selection['annotation_sha256']}\n".encode())
    for image_id, name in zip(selection["image_ids"], selection["file_names"]):
        path = Path(image_dir) / name
        digest.update(f"{image_id}\t{name}\t{path.stat().st_size if path.is_file() else -1}\n".encode())
    return digest.hexdigest()[:16]


def _identity(detector: str, weights: DetectorWeights, split_name: str, data: str, images: int,
              settings: DetectorSettings) -> dict[str, Any]:
    """The cache identity: detector, weights sha256, split, data fingerprint, image count, settings."""
    identity = {"task": "coco", "detector": detector, "weights_sha256": weights.sha256, "split": split_name,
                "data": data, "images": images, "settings": settings.as_dict()}
    if weights.is_random:  # a random initialisation is torchvision's: its version is part of it
        from importlib.metadata import version

        identity["torchvision"] = version("torchvision")
    return identity


def generate_coco_prompts(data_root: Path, split_name: str, detector: str, *, weights: str | None = None,
                          settings: DetectorSettings | None = None, limit: int | None = None,
                          first: int | None = None, device: str = "cpu", progress: bool = True,
                          cache_dir: Path | None = None,
                          before_detection: Callable[[], object] = lambda: None) -> GeneratedPrompts:
    """The detection file of `detector` on COCO split `split_name` below `data_root`: from the
    cache when an entry of the same identity exists (logged as reused), else detected and stored.

    weights: see `weights.resolve_weights`; device: a torch device string ("cpu", "cuda",
    "cuda:1"); cache_dir: default `$PTQBENCH_CACHE/prompts`. A lookup reads the annotation file
    and hashes a weights file once per version of each (`cache.memoized`), so a second run is
    immediate even on train2017. before_detection runs only when the detector has to run (the CLI
    sets torch's threads there, so that a cache hit imports no torch).
    """
    detector = check_detector(detector)
    settings = settings or DetectorSettings()
    _check_selection(limit, first)
    cache = Path(cache_dir or prompts_cache_dir())
    data_root = Path(data_root)
    annotations = require_annotation_file(data_root, split_name)
    selection = memoized(cache, annotations, {"coco_selection": [limit, first]},
                         lambda: _selection(data_root, split_name, limit, first))
    resolved = resolve_weights(detector, weights, progress=progress, memo_dir=cache)
    image_ids = selection["image_ids"]
    identity = _identity(detector, resolved, split_name, data_fingerprint(selection, image_dir(data_root, split_name)),
                         len(image_ids), settings)
    entry = entry_for(cache / "coco", f"{split_name}-{detector}", identity, ".json")
    if entry.exists():
        log.info("reusing the cached %s prompts on %s (%d images): %s", detector, split_name, len(image_ids),
                 entry.path)
        return GeneratedPrompts(entry.path, detector, resolved, True, entry.meta())
    before_detection()
    split = load_split(data_root, split_name)
    meta = _detect_and_store(entry, split, image_ids, detector, resolved, settings, device, progress, identity)
    return GeneratedPrompts(entry.path, detector, resolved, False, meta)


def _detect_and_store(entry: CacheEntry, split: CocoSplit, image_ids: list[int], detector: str,
                      weights: DetectorWeights, settings: DetectorSettings, device: str, progress: bool,
                      identity: dict[str, Any]) -> dict[str, Any]:
    """Run the detector over the images, write the entry and return its metadata."""
    import torch

    target = torch_device(device)
    model = build_detector(detector, weights, settings, progress=progress)
    timing = DetectionTiming()
    found = detect(model, [partial(split.read_image, image_id) for image_id in image_ids], target,
                   batch_size=settings.batch_size, progress=progress, desc=f"{detector} {split.name}", timing=timing)
    categories = set(split.category_ids)
    entries = [entry for image_id, result in zip(image_ids, found)
               for entry in coco_entries(image_id, result, categories)]
    meta = {"identity": identity, "weights_source": weights.source, "annotation_file": str(split.annotation_file),
            "image_ids": image_ids, "boxes": len(entries), "seconds": round(timing.seconds, 3),
            "images_per_second": round(timing.images_per_second, 3), "device": str(target),
            "torch": torch.__version__}
    store(entry, partial(write_json_atomic, value=entries), lambda: meta, folder=False)
    log.info("%s on %s: %d images, %d boxes in %.1f s (%.2f images/s on %s): %s", detector, split.name,
             len(image_ids), len(entries), timing.seconds, timing.images_per_second, target, entry.path)
    return meta
