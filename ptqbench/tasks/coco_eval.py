"""COCO segmentation results entries and their scoring, as mmdetection's CocoDataset scores them.

The reference (SAQ-SAM / PTQ4SAM) evaluates with mmdetection 2.x `CocoDataset.evaluate(metric="segm")`
(`mmdet/datasets/coco.py`, `evaluate_det_segm`), which runs pycocotools' `COCOeval(iouType="segm")`
with `params.maxDets = [100, 300, 1000]` (its default `proposal_nums`) and the default IoU
thresholds 0.50:0.05:0.95, then `summarize()`. With those maxDets, pycocotools' `summarize` computes:

    stats[0]  mask_AP  AP over IoU 0.50:0.95, maxDets 100 (its `_summarize` default; the headline)
    stats[1]  AP50     AP at IoU 0.50, maxDets 1000 (`summarize` takes maxDets[2] for these five)
    stats[2]  AP75     AP at IoU 0.75, maxDets 1000
    stats[3]  APs      small objects (area < 32^2), maxDets 1000
    stats[4]  APm      medium (32^2 .. 96^2), maxDets 1000
    stats[5]  APl      large (> 96^2), maxDets 1000
    stats[6]  AR100    AR over IoU 0.50:0.95, maxDets 100
    stats[7]  AR300    maxDets 300
    stats[8]  AR1000   maxDets 1000
    stats[9]  ARs      small, maxDets 1000
    stats[10] ARm      medium, maxDets 1000
    stats[11] ARl      large, maxDets 1000

mmdetection returns stats[0..5] rounded to three decimals of a fraction and prints all twelve;
here all twelve are returned unrounded, x 100, exactly as pycocotools computes them. pycocotools
writes -1 for a size range without ground truth among the evaluated images (possible with a
small `limit`); that value is reported as NaN rather than -100. An empty results list
(pycocotools' `loadRes` cannot take one; mmdetection logs an error and reports nothing) scores 0
on every metric.

Results entries carry no `bbox` key, as mmdetection deletes it before `loadRes` for segm: with
one, `loadRes` takes each detection's area from its box instead of its mask, which moves
detections between the small/medium/large ranges and changes APs/APm/APl (and ARs/m/l).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import math
import multiprocessing
import os
import signal
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

log = logging.getLogger(__name__)

MAX_DETS = (100, 300, 1000)
METRICS = ("mask_AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "AR300", "AR1000", "ARs", "ARm", "ARl")


@contextlib.contextmanager
def stdout_into_log() -> Iterator[None]:
    """Capture what pycocotools prints and send it to this module's debug log instead."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        text = buffer.getvalue().strip()
        if text:
            log.debug("pycocotools:\n%s", text)


def mask_results(image_id: int, masks: np.ndarray, category_ids: np.ndarray,
                 scores: np.ndarray) -> list[dict[str, Any]]:
    """COCO segm results entries for one image.

    masks: bool [N, H, W] at the image's original size; category_ids: int [N]; scores: float [N].
    Each entry is {image_id, category_id, segmentation: compressed RLE with str counts, score};
    deliberately without `bbox` (see the module docstring).
    """
    from pycocotools import mask as mask_utils

    if not len(masks) == len(category_ids) == len(scores):
        raise ValueError(f"{len(masks)} masks, {len(category_ids)} categories and {len(scores)} scores")
    entries = []
    for mask, category_id, score in zip(masks, category_ids, scores):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        entries.append({
            "image_id": int(image_id),
            "category_id": int(category_id),
            "segmentation": {"size": [int(side) for side in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "score": float(score),
        })
    return entries


_MASK_ENCODERS: dict[bool, Executor] = {}


def mask_encoder(in_processes: bool) -> Executor:
    """The pool that RLE-encodes masks (`mask_results`) while the model runs, one per process.

    pycocotools holds the GIL while it encodes (about 0.35 ms per 640x480 mask, up to 2 ms for a
    speckled one), which stalls a host thread that should be launching GPU work; so with
    `in_processes` (evaluation on a GPU) the masks go to worker processes (up to 4, half the
    cores), otherwise to two threads. The workers are forked, as PyTorch's DataLoader workers
    are, when the pool is made: they run numpy and pycocotools only, never CUDA, and unlike
    spawned workers they do not re-run the caller's script (which may lack a `__main__` guard).
    """
    if in_processes not in _MASK_ENCODERS:
        if in_processes:
            workers = min(4, max(1, (os.cpu_count() or 2) // 2))
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                       initializer=_quiet_on_signals)
            with warnings.catch_warnings():  # "this process is multi-threaded": CUDA's own threads
                warnings.simplefilter("ignore", DeprecationWarning)
                pool.submit(os.getpid).result()  # fork every worker now, before the loader threads start
            _MASK_ENCODERS[True] = pool
        else:
            _MASK_ENCODERS[False] = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rle")
    return _MASK_ENCODERS[in_processes]


@atexit.register
def _close_mask_encoders() -> None:
    """At interpreter exit: shut the encoder pools down (their workers finish and are joined)."""
    while _MASK_ENCODERS:
        _, pool = _MASK_ENCODERS.popitem()
        pool.shutdown(wait=True)


def _quiet_on_signals() -> None:
    """In an encoder worker: SIGTERM ends it silently (the default action, not the CLI's handler
    inherited through the fork, which would print a traceback) and Ctrl-C is left to the parent."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stat_percent(stat: float) -> float:
    """A COCOeval stat as a percentage; its -1 (no ground truth in that range) becomes NaN."""
    return float(stat * 100.0) if stat >= 0 else math.nan


def evaluate_segm(coco_gt: COCO, results: list[dict[str, Any]], image_ids: Sequence[int]) -> COCOeval:
    """COCOeval(segm) of non-empty `results` against `coco_gt` on `image_ids` with maxDets
    MAX_DETS, after its per-image `evaluate()` (not yet accumulated)."""
    from pycocotools.cocoeval import COCOeval

    with stdout_into_log():
        # loadRes writes area/bbox/id/iscrowd into the entries it gets: hand it copies.
        coco_dt = coco_gt.loadRes([dict(entry) for entry in results])
        evaluator = COCOeval(coco_gt, coco_dt, iouType="segm")
        evaluator.params.imgIds = list(image_ids)
        evaluator.params.maxDets = list(MAX_DETS)
        evaluator.evaluate()
    return evaluator


def summarize_metrics(evaluator: COCOeval) -> dict[str, float]:
    """`accumulate()` and `summarize()` an evaluated COCOeval; the METRICS x 100."""
    with stdout_into_log():
        evaluator.accumulate()
    with stdout_into_log():
        evaluator.summarize()
    return {key: stat_percent(stat) for key, stat in zip(METRICS, evaluator.stats, strict=True)}


def score_results(coco_gt: COCO, results: list[dict[str, Any]], image_ids: Sequence[int]) -> dict[str, float]:
    """COCOeval(segm) of `results` against `coco_gt` on `image_ids` with maxDets MAX_DETS;
    returns the METRICS x 100 (see the module docstring)."""
    if not results:
        log.warning("no segmentation results: every COCO metric is 0")
        return {key: 0.0 for key in METRICS}
    return summarize_metrics(evaluate_segm(coco_gt, results, image_ids))


def write_results(results: list[dict[str, Any]], path: Path) -> None:
    """Write COCO segm results entries as one JSON list."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        json.dump(results, handle)
