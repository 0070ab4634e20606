"""Reconstruction speed: steps per second of each SAM unit type, and the projected paper-preset time.

For each model (random weights; segment_anything's builders with checkpoint=None), W4A4 with
min/max ranges, one representative unit of each type is reconstructed with the QDrop settings
(AdaRound + LSQ + drop 0.5: the heaviest step of brecq / qdrop / ptq4sam), after a short warm-up.
Per type it prints ms per step (steady state: the time of 2N steps less that of N, so the
capture of the step's CUDA graphs is left out), steps/s, peak device memory of the step, and
where the cache lived; per model the projected wall time of the paper preset (20,000 steps for every unit, plus
capturing 32 calibration images per unit, scaled from the measured capture).

    python benchmarks/recon_speed.py --models sam_vit_b,sam_vit_l,sam_vit_h --iters 50
    python benchmarks/recon_speed.py --models sam_tiny --iters 10 --device cpu

`--softmax log2` puts every softmax site on PTQ4SAM's AGQ log2 grid (tau 2, its scale learned),
as `ptq4sam`'s units train, instead of the uniform grid of `qdrop`; `--profile KIND` prints the
GPU kernels that take the time in the timed steps of that unit type (e.g. "encoder attn (global)").
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from segment_anything.modeling import Sam
from tabulate import tabulate

from ptqbench.methods.qdrop import PAPER_ITERATIONS, qdrop_config
from ptqbench.methods.ranges import observe_activations, set_weight_ranges
from ptqbench.models.calibration import CalibrationSample, CalibrationSet
from ptqbench.models.sam1.attention_groups import softmax_attentions
from ptqbench.models.sam1.calibration import sample_forward
from ptqbench.models.sam1.models import build_sam_official, build_sam_tiny
from ptqbench.models.sam1.quantized import quantize_sam
from ptqbench.models.sam1.units import sam_units
from ptqbench.quant.observers import make_observer
from ptqbench.recon.engine import ReconstructionSettings, reconstruct
from ptqbench.recon.unit import Unit

PAPER_CALIBRATION_IMAGES = 32
WARMUP_STEPS = 5


def build(name: str) -> Sam:
    return build_sam_tiny() if name == "sam_tiny" else build_sam_official(name.removeprefix("sam_"))


def random_calibration(size: int, images: int, boxes: int, device: torch.device) -> CalibrationSet:
    """Random normalised images [1, 3, size, size] and `boxes` random boxes each."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(images):
        corner = torch.rand(boxes, 2, generator=generator) * size * 0.6
        extent = size * (0.05 + 0.3 * torch.rand(boxes, 2, generator=generator))
        samples.append(CalibrationSample(torch.randn(1, 3, size, size, generator=generator).to(device),
                                         torch.cat([corner, corner + extent], 1).to(device)))
    return CalibrationSet(samples=tuple(samples), fingerprint="random")


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of a whole-calibration benchmark (`saqsam_speed.py`, `stats_speed.py`): model,
    device, preset, bits, random calibration images and boxes, and the projection to N images."""
    parser.add_argument("--model", default="sam_vit_b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="paper", choices=("paper", "fast"))
    parser.add_argument("--bits", default="4")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--boxes", type=int, default=16)
    parser.add_argument("--project-images", type=int, default=None,
                        help="scale the per-image steps to this many calibration images")


def unit_type(model: Sam, unit: Unit) -> str:
    """A unit's kind: encoder attention (window / global), encoder MLP, neck, or the decoder sub-block."""
    parts = unit.name.split(".")
    if parts[0] == "image_encoder" and parts[1] == "blocks":
        if parts[3] == "mlp":
            return "encoder mlp"
        window = model.image_encoder.blocks[int(parts[2])].window_size
        return f"encoder attn ({'window' if window else 'global'})"
    if parts[0] == "image_encoder":
        return "neck"
    return f"decoder {parts[-1]}"


def bench_model(name: str, iterations: int, images: int, boxes: int, device: torch.device,
                settings: ReconstructionSettings, softmax: str = "uniform",
                profile: tuple[str, ...] = ()) -> tuple[list[list], float]:
    fp = build(name).to(device)
    qmodel = quantize_sam(fp, 4, 4).to(device)
    calib = random_calibration(fp.image_encoder.img_size, images, boxes, device)
    set_weight_ranges(qmodel, "minmax")
    observe_activations(qmodel, calib, lambda site, bits: make_observer("minmax", bits=bits), progress=False)
    if softmax == "log2":
        for attention in softmax_attentions(qmodel).values():
            attention.softmax_quantizer.set_log2(2, torch.tensor(1.0, device=device))
    units = sam_units(qmodel, qdrop_config(PAPER_ITERATIONS))
    counts = Counter(unit_type(qmodel, unit) for unit in units)
    representatives: dict[str, Unit] = {}
    for unit in units:
        representatives.setdefault(unit_type(qmodel, unit), unit)
    rows, projected_s = [], 0.0
    for kind, unit in representatives.items():
        reconstruct([replace(unit, config=replace(unit.config, iterations=WARMUP_STEPS))], qmodel, fp, calib,
                    settings, progress=False)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        reports = []
        for steps in (iterations, 2 * iterations):  # the difference leaves out the graphs' capture
            timed = replace(unit, config=replace(unit.config, iterations=steps))
            with kernel_profile(kind in profile and device.type == "cuda" and steps == iterations):
                reports += reconstruct([timed], qmodel, fp, calib, settings, progress=False)
        report = reports[0]
        step_s = (reports[1].train_s - reports[0].train_s) / iterations
        capture_s = report.capture_s * PAPER_CALIBRATION_IMAGES / images
        projected_s += counts[kind] * (PAPER_ITERATIONS * step_s + capture_s)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows.append([name, kind, counts[kind], f"{1000 * step_s:.2f}", f"{1 / step_s:.1f}", f"{peak:.1f}",
                     "device" if report.cache_on_device else "pinned CPU", f"{capture_s:.1f}"])
    return rows, projected_s


@contextmanager
def kernel_profile(enabled: bool) -> Iterator[None]:
    """Inside the block, when enabled, record the GPU kernels and print the 15 that take the most time."""
    if not enabled:
        yield
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        yield
    print(profiler.key_averages().table(sort_by="self_cuda_time_total", row_limit=15), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sam_vit_b",
                        help="comma-separated: sam_tiny, sam_vit_b, sam_vit_l, sam_vit_h")
    parser.add_argument("--iters", type=int, default=50, help="timed steps per unit type")
    parser.add_argument("--images", type=int, default=4, help="calibration images (random) to capture")
    parser.add_argument("--boxes", type=int, default=8, help="box prompts per image")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cache", default="auto", choices=("auto", "device", "cpu"))
    parser.add_argument("--softmax", default="uniform", choices=("uniform", "log2"),
                        help="the softmax sites' grid: qdrop's uniform one, or ptq4sam's AGQ log2 one")
    parser.add_argument("--profile", default="", help="comma-separated unit types whose GPU kernels to print")
    args = parser.parse_args()
    device = torch.device(args.device)
    settings = ReconstructionSettings(forward=sample_forward, cache=args.cache)
    totals = []
    for name in args.models.split(","):
        rows, projected_s = bench_model(name.strip(), args.iters, args.images, args.boxes, device, settings,
                                        args.softmax, tuple(filter(None, args.profile.split(","))))
        totals.append([name, f"{projected_s / 60:.1f} min"])
        print(tabulate(rows, headers=["model", "unit type", "units", "ms/step", "steps/s", "peak GiB",
                                      "cache", "capture s (32 img)"]), end="\n\n", flush=True)
    print(tabulate(totals, headers=["model", f"projected paper preset ({PAPER_ITERATIONS} steps/unit)"]))


if __name__ == "__main__":
    main()
