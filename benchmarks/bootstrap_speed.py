"""Bootstrap cost against the metric it re-scores (issue 19: at most 10% of a cell's evaluation).

For each task, on synthetic data of the given size (seeded; CPU only):
  coco:   N images of 640x480, Poisson(7.3) GT boxes over 80 skewed categories (COCO val's
          density), one jittered box mask per GT as the results (the gt protocol) plus
          --coco-extra random boxes per image; timed: `score_results` (pycocotools evaluate +
          accumulate + summarize) and, apart, the statistics' extra cost (`from_evaluator`);
  dota:   N images with Poisson(60) oriented boxes over the 15 classes, one jittered detection
          per object; timed: `evaluate_task1` and the extra cost of the statistics;
  ade20k: N label/prediction pairs of 512x512 (about 30 classes per image); timed: the
          accumulator's `add` over the split (not the PNG reading) and the statistics' packing;
then the bootstrap: `resampled_metrics` with --resamples resamples on the task's default metrics
(COCO mask_AP, AP50, AP75; DOTA mAP + 15 class APs; ADE20K mIoU, aAcc, mAcc). The ratio is
against the metric alone: a cell's evaluation also runs the model over the N images (SAM-B on
an H200: 35.8 ms/image, benchmarks/README.md), which --model-ms adds to a second ratio.

The bootstrap has a size-independent part (Python loops over categories x IoU thresholds x
chunks of resamples: about 1 s for COCO), so small N overstate its share. Full val sizes
(minutes; run on a free machine):

    OMP_NUM_THREADS=1 python benchmarks/bootstrap_speed.py --coco-images 5000 --dota-images 458 --ade-images 2000
    OMP_NUM_THREADS=1 python benchmarks/bootstrap_speed.py   # the small default (about a minute)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from tabulate import tabulate

from ptqbench.tasks.ade20k_bootstrap import AdeImageStats
from ptqbench.tasks.ade20k_metric import IoUAccumulator
from ptqbench.tasks.bootstrap import resampled_metrics
from ptqbench.tasks.coco_bootstrap import CocoImageStats
from ptqbench.tasks.coco_eval import evaluate_segm, mask_results, summarize_metrics
from ptqbench.tasks.dota_bootstrap import evaluate_task1_with_statistics
from ptqbench.tasks.dota_eval import DOTA_CLASSES, DotaLabels, Task1Detections, evaluate_task1


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def _box_rle(image_id: int, boxes: np.ndarray, categories, scores, height=480, width=640) -> list[dict]:
    masks = np.zeros((len(boxes), height, width), dtype=bool)
    for mask, (x, y, w, h) in zip(masks, boxes.astype(int)):
        mask[y:y + h, x:x + w] = True
    return mask_results(image_id, masks, np.asarray(categories), np.asarray(scores))


def coco_case(images: int, extra: int, rng: np.random.Generator):
    """(COCO ground truth, results entries, image ids) of the synthetic split."""
    from pycocotools.coco import COCO

    weights = np.r_[0.3, np.full(79, 0.7 / 79)]
    annotations, results = [], []
    for image_id in range(1, images + 1):
        count = max(1, rng.poisson(7.3))
        wh = rng.uniform(8, 200, (count, 2))
        boxes = np.c_[rng.uniform(0, 640 - wh[:, 0]), rng.uniform(0, 480 - wh[:, 1]), wh]
        categories = rng.choice(80, count, p=weights) + 1
        for box, entry in zip(boxes, _box_rle(image_id, boxes, categories, np.ones(count))):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": entry["category_id"],
                                "iscrowd": 0, "bbox": box.tolist(), "area": float(box[2] * box[3]),
                                "segmentation": entry["segmentation"]})
        jitter = boxes + rng.normal(0, 0.08, boxes.shape) * boxes[:, [2, 3, 2, 3]]
        results += _box_rle(image_id, np.clip(jitter, 1, None), categories, rng.random(count))
        if extra:
            wh = rng.uniform(8, 200, (extra, 2))
            noise = np.c_[rng.uniform(0, 640 - wh[:, 0]), rng.uniform(0, 480 - wh[:, 1]), wh]
            results += _box_rle(image_id, noise, rng.choice(80, extra, p=weights) + 1, rng.random(extra) * 0.5)
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "height": 480, "width": 640} for i in range(1, images + 1)],
                    "categories": [{"id": c, "name": str(c)} for c in range(1, 81)], "annotations": annotations}
    coco.createIndex()
    return coco, results, list(range(1, images + 1))


def bench_coco(images: int, extra: int, resamples: int, rng: np.random.Generator) -> tuple:
    coco, results, image_ids = coco_case(images, extra, rng)
    evaluator, evaluate_s = timed(evaluate_segm, coco, results, image_ids)
    stats, stats_s = timed(CocoImageStats.from_evaluator, evaluator)
    _, summarize_s = timed(summarize_metrics, evaluator)
    _, boot_s = timed(resampled_metrics, stats, resamples)
    return "coco", images, len(results), evaluate_s + summarize_s, stats_s, boot_s, stats.to_arrays()


def dota_case(images: int, rng: np.random.Generator):
    labels, lines = {}, {name: ([], [], []) for name in DOTA_CLASSES}
    for i in range(images):
        count = max(1, rng.poisson(60))
        centres, sizes = rng.uniform(50, 950, (count, 2)), rng.uniform(8, 60, (count, 2))
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) / 2
        polygons = (centres[:, None] + corners[None] * sizes[:, None]).reshape(count, 8)
        names = tuple(rng.choice(DOTA_CLASSES, count))
        labels[f"P{i:04d}"] = DotaLabels(polygons, names, rng.random(count) < 0.1)
        moved = polygons + np.repeat(rng.normal(0, 0.15, (count, 2)) * sizes, 4, axis=0).reshape(count, 8)
        for name, polygon in zip(names, moved):
            lines[name][0].append(f"P{i:04d}")
            lines[name][1].append(rng.random())
            lines[name][2].append(polygon)
    detections = {name: Task1Detections(tuple(found[0]), np.array(found[1]), np.array(found[2]).reshape(-1, 8))
                  for name, found in lines.items()}
    return labels, detections


def bench_dota(images: int, resamples: int, rng: np.random.Generator) -> tuple:
    labels, detections = dota_case(images, rng)
    _, metric_s = timed(evaluate_task1, labels, detections)
    (_, stats), both_s = timed(evaluate_task1_with_statistics, labels, detections)
    _, boot_s = timed(resampled_metrics, stats, resamples)
    total = sum(len(found) for found in detections.values())
    return "dota", images, total, metric_s, max(both_s - metric_s, 0.0), boot_s, stats.to_arrays()


def bench_ade(images: int, resamples: int, rng: np.random.Generator) -> tuple:
    accumulator = IoUAccumulator(keep_images=True)
    metric_s = 0.0
    for _ in range(images):
        classes = rng.choice(150, 30, replace=False)
        label = classes[rng.integers(0, 30, (32, 32))].repeat(16, 0).repeat(16, 1).astype(np.uint8)
        noise = classes[rng.integers(0, 30, label.shape)]
        pred = np.where(rng.random(label.shape) < 0.7, label, noise).astype(np.uint8)
        _, seconds = timed(accumulator.add, pred, label)
        metric_s += seconds
    stats, stats_s = timed(AdeImageStats.from_accumulator, accumulator, [str(i) for i in range(images)])
    _, boot_s = timed(resampled_metrics, stats, resamples)
    return "ade20k", images, images, metric_s, stats_s, boot_s, stats.to_arrays()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--coco-images", type=int, default=200)
    parser.add_argument("--coco-extra", type=int, default=0, help="random extra detections per COCO image")
    parser.add_argument("--dota-images", type=int, default=40)
    parser.add_argument("--ade-images", type=int, default=200)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--model-ms", type=float, default=35.8, help="model ms/image for the second ratio")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for row in (bench_coco(args.coco_images, args.coco_extra, args.resamples, rng),
                bench_dota(args.dota_images, args.resamples, rng), bench_ade(args.ade_images, args.resamples, rng)):
        task, images, outputs, metric_s, stats_s, boot_s, arrays = row
        stored = sum(value.nbytes for value in arrays.values())
        with_model = metric_s + images * args.model_ms / 1000.0
        rows.append([task, images, outputs, f"{metric_s:.2f}", f"{stats_s:.2f}", f"{boot_s:.2f}",
                     f"{100 * (stats_s + boot_s) / metric_s:.1f}%", f"{100 * (stats_s + boot_s) / with_model:.1f}%",
                     f"{stored / 1e3:.0f} kB"])
    headers = ["task", "images", "detections", "metric s", "stats s", f"bootstrap s ({args.resamples})",
               "/ metric", f"/ metric + model ({args.model_ms} ms/img)", "stored"]
    print(tabulate(rows, headers=headers))


if __name__ == "__main__":
    main()
