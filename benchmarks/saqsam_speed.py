"""SAQ-SAM calibration time: every step of `saqsam` timed, PAR projected to its preset's iterations.

The model has random weights (segment_anything's builder with checkpoint=None, or sam_tiny's seeded
init); the calibration set is random: `--images` normalised images at the model's input size with
`--boxes` random box prompts each. The steps run exactly as `saqsam` runs them (BIG, PCC, weight
ranges, AGQ, activation ranges, PAR), each timed once. PAR trains every unit for only
`--iterations` steps, then once more with twice as many; its projected time per unit is the
measured capture time plus the preset's iterations times the steady-state step time, the difference
of the two runs' training times over the extra steps (the capture of the steps' CUDA graphs is in
both and cancels). Every step runs once on one image first (untimed; PAR with 2 steps per unit),
so that the one-off compilation of the Triton kernels is in no measured time (in the first PAR
run's, it would make the difference of the two runs negative). With `--project-images N` the steps that
visit every calibration image (AGQ, the activation statistics, PAR's input capture) are scaled from
`--images` to N images, for a short run, and so is the largest PAR unit cache in the projected peak
GPU memory (measured peak + that cache's growth). The total is compared with a target (8 minutes by
default, issue 16).

    python benchmarks/saqsam_speed.py                                   # sam_vit_b, paper, GPU
    python benchmarks/saqsam_speed.py --model sam_tiny --device cpu --preset fast --iterations 5
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace

import torch
from tabulate import tabulate

from ptqbench.config import BitSpec
from ptqbench.methods.saqsam.method import SaqSam, reference_order
from ptqbench.methods.saqsam.par import par_reconstruct, par_units, with_iterations
from ptqbench.models.sam1.quantized import quantize_sam

from recon_speed import add_calibration_arguments, build, random_calibration  # the script folder is on sys.path

PER_IMAGE_STEPS = ("AGQ", "activations")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(method: SaqSam, fp_model, calib, spec: BitSpec) -> None:
    """Every step once on the first image, on a throwaway twin, PAR with 2 steps per unit: the
    one-off compilation of the Triton kernels (once per machine) is then in no measured time."""
    twin = quantize_sam(fp_model, spec.w_bits, spec.a_bits).to(calib.samples[0].image.device)
    one_image = replace(calib, samples=calib.samples[:1])
    short = SaqSam(replace(method.config, par=with_iterations(method.config.par, 2)), progress=False)
    for _, step in short.steps(twin, fp_model, one_image, spec, seed=0):
        step()
    synchronize(calib.samples[0].image.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_calibration_arguments(parser)
    parser.add_argument("--iterations", type=int, default=20, help="PAR steps measured per unit")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--target-minutes", type=float, default=8.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = BitSpec.parse(args.bits)

    fp_model = build(args.model).to(device)
    calib = random_calibration(fp_model.image_encoder.img_size, args.images, args.boxes, device)
    preset = SaqSam.presets[args.preset]
    target = preset.par
    method = SaqSam(replace(preset, par=with_iterations(target, args.iterations)), progress=False)
    warm_up(method, fp_model, calib, spec)
    qmodel = quantize_sam(fp_model, spec.w_bits, spec.a_bits).to(device)

    image_scale = (args.project_images or args.images) / args.images
    rows, total_s = [], 0.0
    reports = []
    for name, step in method.steps(qmodel, fp_model, calib, spec, seed=0):
        synchronize(device)
        start = time.perf_counter()
        result = step()
        synchronize(device)
        elapsed = time.perf_counter() - start
        print(f"{name}: {elapsed:.1f} s", flush=True)
        if name == "PAR":
            reports = result
            continue
        projected = elapsed * (image_scale if name in PER_IMAGE_STEPS else 1.0)
        rows.append([name, "", f"{elapsed:.1f}", f"{projected:.1f}"])
        total_s += projected

    # PAR again with twice the steps (on the reconstructed model: only the time matters); the
    # difference is the steady-state time of the extra steps, without the graphs' capture
    longer = par_reconstruct(qmodel, fp_model, reference_order(calib), with_iterations(target, 2 * args.iterations),
                             seed=0, progress=False)
    preset_iterations = {unit.name: unit.config.iterations for unit in par_units(qmodel, fp_model, target)}
    for report, long_report in zip(reports, longer):
        steps = preset_iterations[report.name]
        per_step = (long_report.train_s - report.train_s) / max(long_report.iterations - report.iterations, 1)
        projected = report.capture_s * image_scale + per_step * steps
        rows.append([f"PAR {report.name}", f"{1000 * per_step:.1f} ms/step x {steps}",
                     f"{report.capture_s + report.train_s:.1f}", f"{projected:.1f}"])
        total_s += projected

    peak = ""
    if device.type == "cuda":
        measured = torch.cuda.max_memory_allocated(device)
        cache_growth = max((r.cache_bytes for r in reports if r.cache_on_device), default=0) * (image_scale - 1)
        peak = f", peak memory {measured / 2**30:.1f} GiB"
        if image_scale != 1:
            peak += f" (projected to {args.project_images} images: {(measured + cache_growth) / 2**30:.1f} GiB)"
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)")
    images = f"{args.images} images" + (f" (projected to {args.project_images})" if args.project_images else "")
    print(f"saqsam on {args.model} ({spec.label}, {args.preset} preset), {images} x {args.boxes} boxes, "
          f"{device_name}{peak}")
    print(tabulate(rows, headers=["step", "PAR rate", "measured s", "projected s"], tablefmt="github"))
    verdict = "within" if total_s <= 60 * args.target_minutes else "OVER"
    print(f"projected total: {total_s / 60:.1f} min ({verdict} the {args.target_minutes:g}-minute target)")


if __name__ == "__main__":
    main()
