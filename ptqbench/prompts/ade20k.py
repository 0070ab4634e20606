"""`ptqbench prompts ade20k`: SegFormer class maps of an ADE20K split, as the semantic prior folder.

The folder holds one `<stem>.png` per image of the split (the stems of the ADE20K task, i.e. of
`annotations/<split>/`): uint8 [H, W] at the image's size, ADE20K training ids 0..149 (255 would
mean no class; an argmax never gives it). The ADE20K task reads it in `mode=ssa`
(`--task-option mode=ssa --task-option semantic_prior=DIR`). Cached (`cache.py`) by variant,
weights sha256, split, data fingerprint (each image's name and byte size), input size and
channel order; `segformer.py` has the preprocessing (SSA's).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptqbench.prompts.cache import entry_for, hash_files, prompts_cache_dir, store
from ptqbench.prompts.detector import torch_device
from ptqbench.prompts.segformer import SegformerWeights, check_variant, class_maps, input_size, load_segformer
from ptqbench.tasks.ade20k import AdeSample, list_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GeneratedPriors:
    """A generated (or reused) prior folder; label: "segformer-<variant>@<weights sha256>"."""

    path: Path
    variant: str
    weights: SegformerWeights
    reused: bool
    meta: dict[str, Any]

    @property
    def label(self) -> str:
        return f"segformer-{self.variant}@{self.weights.sha256}"


def _write_maps(folder: Path, model: Any, samples: list[AdeSample], size: int, bgr: bool, device: Any,
                batch_size: int, progress: bool) -> None:
    """Write `<stem>.png` class maps of `samples` into `folder`."""
    from PIL import Image
    from tqdm import tqdm

    from ptqbench.tasks.images import read_image

    model = model.to(device)
    for start in tqdm(range(0, len(samples), batch_size), desc="segformer", unit="batch", disable=not progress):
        batch = samples[start:start + batch_size]
        maps = class_maps(model, [read_image(sample.image_path) for sample in batch], size, device, bgr=bgr)
        for sample, class_map in zip(batch, maps):
            Image.fromarray(class_map).save(folder / f"{sample.stem}.png")


def generate_ade20k_priors(data_root: Path, split: str, variant: str, *, weights: str | None = None,
                           size: int | None = None, bgr: bool = True, limit: int | None = None,
                           batch_size: int = 4, device: str = "cpu", progress: bool = True,
                           cache_dir: Path | None = None, config: Any = None) -> GeneratedPriors:
    """The prior folder of SegFormer `variant` on ADE20K `split` below `data_root`: from the
    cache when an entry of the same identity exists (logged as reused), else computed and stored.

    size: the square input side (default the checkpoint's); bgr: SSA's BGR input (default on);
    limit: only the first N images (name order); config: a SegformerConfig for random weights
    (tests use a small one).
    """
    variant = check_variant(variant)
    samples = list_samples(Path(data_root), split)[:limit]
    model, found = load_segformer(variant, weights, config=config)
    size = size or input_size(variant)
    digest = hashlib.sha256()
    hash_files(digest, [sample.image_path for sample in samples], contents=False)
    identity = {"task": "ade20k", "segformer": variant, "weights_sha256": found.sha256, "split": split,
                "data": digest.hexdigest()[:16], "images": len(samples),
                "settings": {"size": size, "bgr": bgr}}
    if found.source == "random-seed0":
        identity["config"] = model.config.to_json_string(use_diff=False)
    entry = entry_for(Path(cache_dir or prompts_cache_dir()) / "ade20k", f"{split}-segformer-{variant}", identity)
    if entry.exists():
        log.info("reusing the cached SegFormer-%s priors of %s (%d images): %s", variant, split, len(samples),
                 entry.path)
        return GeneratedPriors(entry.path, variant, found, True, entry.meta())
    target = torch_device(device)
    start = time.perf_counter()

    def meta() -> dict[str, Any]:
        seconds = time.perf_counter() - start
        return {"identity": identity, "weights_source": found.source, "stems": [sample.stem for sample in samples],
                "seconds": round(seconds, 3), "images_per_second": round(len(samples) / max(seconds, 1e-9), 3),
                "device": str(target)}

    written = store(entry, lambda folder: _write_maps(folder, model, samples, size, bgr, target, batch_size,
                                                      progress), meta, folder=True)
    log.info("SegFormer-%s on ADE20K %s: %d images in %.1f s (%.2f images/s on %s): %s", variant, split,
             len(samples), written["seconds"], written["images_per_second"], target, entry.path)
    return GeneratedPriors(entry.path, variant, found, False, written)
