"""Data-parallel evaluation throughput: images/s of the `coco` task on 1, 2, 4 and 8 GPUs.

Run it under torchrun on one machine with as many processes as the largest GPU count:

    torchrun --standalone --nproc-per-node 8 benchmarks/dist_speed.py --images 512
    torchrun --standalone --nproc-per-node 2 benchmarks/dist_speed.py --model sam_tiny --device cpu \
        --images 8 --ranks 1,2                       # a smoke run on the CPU (gloo)

Every measurement takes the path of `ptqbench run` under torchrun (`ptqbench.harness`): the
first N ranks each predict a contiguous shard of the images (`Task.predict`), rank 0 gathers
the per-image results in image order and scores them (`Task.score`); ranks N and above take
part with an empty shard. The model has random weights (sam_vit_b by default; speed does not
depend on the weights); W4A4 is minmax-calibrated on rank 0 and sent to the other ranks as
its sealed state, as the harness does. The images are generated 640x480 scenes with ~20 box
prompts each (the folder of `benchmarks/eval_speed.py`), written by rank 0 into a temporary
folder, or an existing COCO layout given with --data-root.

Columns: predict s = from a common start until rank 0 holds every result; images/s = images /
predict s; with scoring = including pycocotools on rank 0 (the serial part); speed-up and
efficiency are relative to the first row of the same precision (1 rank by default).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from ptqbench.config import BitSpec
from ptqbench.distributed import DistributedContext, shard_of
from ptqbench.methods.minmax import MinMax
from ptqbench.models.sam1.calibration import build_calibration_set
from ptqbench.models.sam1.inference import BoxPredictor
from ptqbench.models.sam1.models import build_sam_official, build_sam_tiny
from ptqbench.models.sam1.quantized import quantize_sam
from ptqbench.quant.sealed_state import load_sealed_state, sealed_state
from ptqbench.quant.sites import seal_for_evaluation
from ptqbench.tasks.base import TaskConfig
from ptqbench.tasks.coco import CocoTask
from ptqbench.types import CalibrationItem

from eval_speed import write_coco_folder  # the sibling benchmark script (its folder is sys.path[0])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantized_model(ctx: DistributedContext, model, task: CocoTask, spec: BitSpec):
    """W/A fake-quantized twin of `model`: minmax on 4 images on rank 0, sealed, broadcast."""
    qmodel = quantize_sam(model, spec.w_bits, spec.a_bits).to(ctx.device)
    if ctx.is_main:
        split = task._split("val2017")
        items = [CalibrationItem(split.read_image(i), split.gt_prompts(i).boxes) for i in split.image_ids[:4]]
        MinMax().calibrate(qmodel, model, build_calibration_set(model, items, ctx.device), spec, 0)
        seal_for_evaluation(qmodel)
    state = ctx.broadcast_from_main(sealed_state(qmodel) if ctx.is_main else None)
    if not ctx.is_main:
        load_sealed_state(qmodel, state)
    return qmodel


def measure(ctx: DistributedContext, task: CocoTask, model, ranks: int, images: int,
            out_dir: Path) -> tuple[float, float]:
    """(seconds until rank 0 holds every result, seconds including scoring); rank 0's clock."""
    indices = shard_of(range(images), ctx.rank, ranks) if ctx.rank < ranks else []
    predictor = BoxPredictor(model, ctx.device)
    ctx.barrier()
    start = time.perf_counter()
    predictions = task.predict(predictor, indices)
    sync(ctx.device)
    gathered = ctx.gather_to_main(list(zip(indices, predictions)))
    gathered_s = time.perf_counter() - start
    if ctx.is_main:
        task.score([prediction for _, prediction in sorted(gathered, key=lambda pair: pair[0])], images, out_dir)
    scored_s = time.perf_counter() - start
    ctx.barrier()
    return gathered_s, scored_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sam_vit_b", help="sam_vit_b (default), sam_vit_l, sam_vit_h or sam_tiny")
    parser.add_argument("--images", type=int, default=256, help="evaluation images per measurement")
    parser.add_argument("--boxes", type=int, default=20, help="box prompts per generated image")
    parser.add_argument("--ranks", default="1,2,4,8", help="rank counts to measure (at most the world size)")
    parser.add_argument("--precisions", default="fp,w4a4", help="fp and/or bit specs such as w4a4")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-root", help="an existing COCO layout (default: generated scenes)")
    args = parser.parse_args()

    ctx = DistributedContext.from_env(torch.device(args.device))
    counts = [n for n in (int(part) for part in args.ranks.split(",")) if n <= ctx.world_size]
    scratch = tempfile.TemporaryDirectory() if ctx.is_main else None  # rank 0's, shared by every rank
    tmp = Path(ctx.broadcast_from_main(scratch.name if scratch else None))
    root = Path(args.data_root) if args.data_root else tmp / "data"
    if args.data_root is None and ctx.is_main:
        write_coco_folder(root, args.images, args.boxes)
    ctx.barrier()
    model = (build_sam_tiny() if args.model == "sam_tiny"
             else build_sam_official(args.model.removeprefix("sam_"))).to(ctx.device).eval()
    task = CocoTask(TaskConfig(data_root=root, model_input_size=model.image_encoder.img_size))
    rows = []
    for precision in args.precisions.split(","):
        spec = None if precision.strip().lower() == "fp" else BitSpec.parse(precision)
        evaluated = model if spec is None else quantized_model(ctx, model, task, spec)
        task.predict(BoxPredictor(evaluated, ctx.device), [0, 1])  # warm-up: kernels, allocator
        baseline = None
        for ranks in counts:
            gathered_s, scored_s = measure(ctx, task, evaluated, ranks, args.images, tmp / "out")
            baseline = baseline or gathered_s
            rows.append([args.model, "fp" if spec is None else spec.label, ranks, args.images,
                         f"{gathered_s:.2f}", f"{args.images / gathered_s:.2f}", f"{args.images / scored_s:.2f}",
                         f"{baseline / gathered_s:.2f}x", f"{100 * baseline / gathered_s / ranks:.0f}%"])
    if ctx.is_main:
        print(f"device {ctx.device.type}, world size {ctx.world_size}, "
              f"{torch.cuda.get_device_name(ctx.device) if ctx.device.type == 'cuda' else 'CPU'}")
        print(tabulate(rows, headers=["model", "precision", "ranks", "images", "predict s", "images/s",
                                      "with scoring", "speed-up", "efficiency"]))
        scratch.cleanup()
    ctx.destroy()


if __name__ == "__main__":
    main()
