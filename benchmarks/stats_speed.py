"""Statistics calibration time: `mse` and the `ptq4sam-s` steps (BIG, activations + AGQ, weights).

The model has random weights; the calibration set is random (`--images` normalised images with
`--boxes` random boxes each, as `recon_speed.py`). Each step runs exactly as the method runs it and
is timed once; with `--project-images N` the per-image steps are scaled to N images. Targets
(issue 16, `sam_vit_b` on one H200, 32 images): `mse` at most 30 s, `ptq4sam-s` at most 45 s.

    python benchmarks/stats_speed.py                         # sam_vit_b, paper preset, GPU
    python benchmarks/stats_speed.py --model sam_tiny --device cpu --images 2
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable

import torch
from tabulate import tabulate

from ptqbench.config import BitSpec
from ptqbench.methods.mse import Mse
from ptqbench.methods.ptq4sam.method import Ptq4SamS, apply_big
from ptqbench.models.sam1.quantized import quantize_sam

from recon_speed import add_calibration_arguments, build, random_calibration  # the script folder is on sys.path

TARGETS_S = {"mse": 30.0, "ptq4sam-s": 45.0}


def timed(device: torch.device, step: Callable[[], object]) -> float:
    """Seconds of one call of `step`, the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_calibration_arguments(parser)
    parser.add_argument("--methods", default="mse,ptq4sam-s")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    spec = BitSpec.parse(args.bits)
    fp_model = build(args.model).to(device)
    calib = random_calibration(fp_model.image_encoder.img_size, args.images, args.boxes, device)
    scale = (args.project_images or args.images) / args.images
    rows = []
    for method in args.methods.split(","):
        qmodel = quantize_sam(fp_model, spec.w_bits, spec.a_bits).to(device)
        if method == "mse":
            steps = [(name, name == "activations", step)
                     for name, step in Mse(Mse.presets[args.preset], progress=False).statistics_steps(qmodel, calib)]
        else:
            ptq4sam = Ptq4SamS(Ptq4SamS.presets[args.preset], progress=False)
            steps = [("BIG", False, lambda: apply_big(qmodel, fp_model, calib))]  # noqa: B023 - run in this iteration
            steps += [(name, name == "activations", step)
                      for name, step in ptq4sam.statistics_steps(qmodel, calib)]
        total = 0.0
        for name, per_image, step in steps:
            seconds = timed(device, step)
            projected = seconds * (scale if per_image else 1.0)
            total += projected
            rows.append([method, name, f"{seconds:.1f}", f"{projected:.1f}"])
            print(f"{method} {name}: {seconds:.1f} s", flush=True)
        verdict = "within" if total <= TARGETS_S[method] else "OVER"
        rows.append([method, "total", "", f"{total:.1f} ({verdict} {TARGETS_S[method]:g} s)"])
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)")
    peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    images = f"{args.images} images" + (f" (projected to {args.project_images})" if args.project_images else "")
    print(f"statistics calibration of {args.model} ({spec.label}, {args.preset} preset), "
          f"{images} x {args.boxes} boxes, {device_name}{peak}")
    print(tabulate(rows, headers=["method", "step", "measured s", "projected s"], tablefmt="github"))


if __name__ == "__main__":
    main()
