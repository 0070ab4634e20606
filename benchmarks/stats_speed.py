"""Statistics calibration time: `mse` and the `ptq4sam-s` steps (BIG, activations + AGQ, weights).

The model has random weights; the calibration set is random (`--images` normalised images with
`--boxes` random boxes each, as `recon_speed.py`). Each step runs exactly as the method runs it and
is timed once, after an untimed warm-up run of every method on one image (Triton compiles its
kernels there, once per machine: they are cached on disk); with `--project-images N` the per-image
steps are scaled to N images (measuring all 32 is better: a projection scales every one-off cost
of the measured images too). Targets
(issue 16, `sam_vit_b` on one H200, 32 images): `mse` at most 30 s, `ptq4sam-s` at most 45 s.

    python benchmarks/stats_speed.py                         # sam_vit_b, paper preset, GPU
    python benchmarks/stats_speed.py --model sam_tiny --device cpu --images 2
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import replace

import torch
from tabulate import tabulate

from ptqbench.config import BitSpec
from ptqbench.methods.mse import Mse
from ptqbench.methods.ptq4sam.method import Ptq4SamS, apply_big
from ptqbench.models.calibration import CalibrationSet
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


def method_steps(method: str, qmodel: torch.nn.Module, fp_model: torch.nn.Module, calib: CalibrationSet,
                 preset: str) -> list[tuple[str, bool, Callable[[], object]]]:
    """The statistics steps of `method` on `qmodel`: (name, runs per image, step), in the method's order."""
    if method == "mse":
        return [(name, name == "activations", step)
                for name, step in Mse(Mse.presets[preset], progress=False).statistics_steps(qmodel, calib)]
    ptq4sam = Ptq4SamS(Ptq4SamS.presets[preset], progress=False)
    steps = [("BIG", False, lambda: apply_big(qmodel, fp_model, calib))]
    return steps + [(name, name == "activations", step) for name, step in ptq4sam.statistics_steps(qmodel, calib)]


def warm_up(methods: list[str], fp_model: torch.nn.Module, calib: CalibrationSet, spec: BitSpec, preset: str,
            device: torch.device) -> float:
    """Run every method's steps once on the first calibration image, untimed, so that Triton's kernels
    are compiled (and cached on disk, as for any later run) before the timed runs; returns its seconds."""
    one_image = replace(calib, samples=calib.samples[:1])
    start = time.perf_counter()
    for method in methods:
        qmodel = quantize_sam(fp_model, spec.w_bits, spec.a_bits).to(device)
        for _, _, step in method_steps(method, qmodel, fp_model, one_image, preset):
            timed(device, step)
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
    methods = args.methods.split(",")
    warm_up_s = warm_up(methods, fp_model, calib, spec, args.preset, device)
    print(f"warm-up (one image per method, untimed): {warm_up_s:.1f} s", flush=True)
    rows = []
    for method in methods:
        qmodel = quantize_sam(fp_model, spec.w_bits, spec.a_bits).to(device)
        total = 0.0
        for name, per_image, step in method_steps(method, qmodel, fp_model, calib, args.preset):
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
