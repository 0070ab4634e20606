"""Evaluation speed: segment_anything's own predictor loop vs ptqbench FP vs ptqbench W4A4.

For each model (random weights), on a COCO-layout folder of real-size images (640x480, random
smooth colour fields) with ~20 box prompts each:
  (a) a plain loop over segment_anything's SamPredictor: read image, set_image, predict_torch
      with all boxes, upscaled masks to the CPU, RLE-encode every mask;
  (b) ptqbench's FP evaluation as a run does it: the `coco` task's prediction phase (`task.predict`,
      from reading the images to RLE-encoded results entries) with a `BoxPredictor` over
      `fp_twin(model)`, the quantizable twin with every site off;
  (c) ptqbench's W4A4 evaluation: the same after `minmax` calibration with every site on.
Prints images/s, peak GPU memory, the ratios (b)/(a) speed-up and (c)/(b) time, the encoder batch
size (b) and (c) ended with (it drops to 1 if a batch was not bit-identical to single images) and,
apart, the time of the metric (`task.score`: pycocotools' COCOeval), which (a) does not compute.
The warm-up of (b) and (c) covers their first batch, so its one-time bit check is not timed.

    python benchmarks/eval_speed.py --models sam_vit_b,sam_vit_l,sam_vit_h --images 64 --device cuda
    python benchmarks/eval_speed.py --models sam_tiny --images 8 --device cpu
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tabulate import tabulate

from ptqbench.methods.minmax import MinMax
from ptqbench.models.sam1.calibration import build_calibration_set
from ptqbench.models.sam1.inference import BoxPredictor
from ptqbench.models.sam1.models import build_sam_official, build_sam_tiny
from ptqbench.models.sam1.quantized import fp_twin, quantize_sam
from ptqbench.quant.sites import seal_for_evaluation
from ptqbench.tasks.base import TaskConfig
from ptqbench.tasks.coco import CocoTask
from ptqbench.types import CalibrationItem


def write_coco_folder(root: Path, images: int, boxes: int, height: int = 480, width: int = 640) -> None:
    """A COCO val2017 layout of random images; every image gets `boxes` random box annotations."""
    from pycocotools import mask as mask_utils

    (root / "coco" / "val2017").mkdir(parents=True)
    (root / "coco" / "annotations").mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries, annotations = [], []
    for index in range(images):
        coarse = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
        image = np.array(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
        name = f"{index:012d}.jpg"
        Image.fromarray(image).save(root / "coco" / "val2017" / name, quality=90)
        entries.append({"id": index + 1, "file_name": name, "height": height, "width": width})
        for _ in range(boxes):
            x, y = rng.uniform(0, width * 0.7), rng.uniform(0, height * 0.7)
            w, h = rng.uniform(16, width * 0.3), rng.uniform(16, height * 0.3)
            box_mask = np.zeros((height, width), dtype=np.uint8)
            box_mask[int(y):int(y + h), int(x):int(x + w)] = 1
            rle = mask_utils.encode(np.asfortranarray(box_mask))
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": 1,
                                "bbox": [x, y, w, h], "area": float(box_mask.sum()), "iscrowd": 0,
                                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    dataset = {"images": entries, "annotations": annotations,
               "categories": [{"id": 1, "name": "object", "supercategory": "object"}]}
    (root / "coco" / "annotations" / "instances_val2017.json").write_text(json.dumps(dataset))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predictor_loop(model, root: Path, device: torch.device) -> int:
    """(a): segment_anything's SamPredictor, image by image, masks RLE-encoded on the CPU."""
    from pycocotools import mask as mask_utils
    from segment_anything import SamPredictor

    dataset = json.loads((root / "coco" / "annotations" / "instances_val2017.json").read_text())
    boxes_by_image: dict[int, list] = {}
    for ann in dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        boxes_by_image.setdefault(ann["image_id"], []).append([x, y, x + w, y + h])
    predictor = SamPredictor(model)
    encoded = 0
    for entry in dataset["images"]:
        image = np.array(Image.open(root / "coco" / "val2017" / entry["file_name"]).convert("RGB"))
        predictor.set_image(image)
        boxes = torch.as_tensor(boxes_by_image[entry["id"]], dtype=torch.float, device=device)
        boxes = predictor.transform.apply_boxes_torch(boxes, image.shape[:2])
        masks, _, _ = predictor.predict_torch(None, None, boxes=boxes, multimask_output=False)
        for mask in masks[:, 0].cpu().numpy():
            mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            encoded += 1
    return encoded


def timed(fn, device: torch.device) -> tuple[float, float | None]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak


def bench_model(name: str, root: Path, images: int, device: torch.device, out_dir: Path) -> list[list]:
    model = (build_sam_tiny() if name == "sam_tiny" else build_sam_official(name.removeprefix("sam_"))).to(device)
    task = CocoTask(TaskConfig(data_root=root, model_input_size=model.image_encoder.img_size))
    indices = list(range(task.eval_image_count(None)))
    task.predict(BoxPredictor(model, device), indices[:2])  # warm-up: kernels, allocator
    a_s, a_mem = timed(lambda: predictor_loop(model, root, device), device)
    fp_predictor = BoxPredictor(fp_twin(model), device)  # the model of a run's FP row
    warm_up = indices[:fp_predictor.encoder_batch]  # kernels, allocator, and the batch's bit check
    task.predict(fp_predictor, warm_up)
    results: list = []
    b_s, b_mem = timed(lambda: results.extend(task.predict(fp_predictor, indices)), device)
    metric_s, _ = timed(lambda: task.score(results, None, out_dir), device)
    qmodel = quantize_sam(model, 4, 4).to(device)
    split = task._split("val2017")
    items = [CalibrationItem(split.read_image(i), split.gt_prompts(i).boxes) for i in split.image_ids[:4]]
    MinMax().calibrate(qmodel, model, build_calibration_set(model, items, device), None, 0)
    seal_for_evaluation(qmodel)
    q_predictor = BoxPredictor(qmodel, device)
    task.predict(q_predictor, warm_up)
    c_s, c_mem = timed(lambda: task.predict(q_predictor, indices), device)
    rows = []
    for label, seconds, peak in (("(a) SamPredictor loop", a_s, a_mem), ("(b) ptqbench FP", b_s, b_mem),
                                 ("(c) ptqbench W4A4", c_s, c_mem)):
        rows.append([name, label, f"{images / seconds:.2f}", f"{1000 * seconds / images:.1f}",
                     "-" if peak is None else f"{peak:.2f}"])
    rows[1].append(f"speed-up vs (a): {a_s / b_s:.2f}x")
    rows[2].append(f"time vs (b): {c_s / b_s:.2f}x")
    for row, predictor in ((rows[1], fp_predictor), (rows[2], q_predictor)):
        row.append(predictor.encoder_batch)
    rows.append([name, "metric (COCOeval segm)", "-", f"{1000 * metric_s / images:.1f}", "-", "not in (a)"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sam_tiny")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--boxes", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_coco_folder(root, args.images, args.boxes)
        for name in args.models.split(","):
            rows += bench_model(name.strip(), root, args.images, device, root / "out")
    print(tabulate(rows, headers=["model", "path", "images/s", "ms/image", "peak GiB", "ratio", "encoder batch"]))


if __name__ == "__main__":
    main()
